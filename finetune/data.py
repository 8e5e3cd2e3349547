"""ImageFolder datasets, the classic transform presets, and a resumable, seeded sampling order.

Randomness in the data pipeline is a pure function of ``(seed, epoch, sample index)``: the
sampler's order comes from ``(seed, epoch)`` and each sample's augmentation is drawn after
seeding from ``(seed, epoch, index)``. So the images a step sees do not depend on the number
of processes or workers, and a run resumed mid-epoch sees exactly what an uninterrupted one saw.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets
from torchvision import transforms as v1
from torchvision.transforms.v2 import functional as F

from finetune.errors import UserError

IMAGE_EXTENSIONS = datasets.folder.IMG_EXTENSIONS
EVAL_SPLITS = ("test", "val")


class BadImageError(UserError):
    """An image that cannot be decoded, named by path."""


def load_rgb(path: str, reduce_to: tuple[int, int] | None = None) -> Image.Image:
    """Open any image as 8-bit RGB, whatever its mode (L, LA, P, RGBA, CMYK, 16-bit, float).

    EXIF orientation is applied; transparency is composited on white rather than dropped,
    which would expose whatever colour hides under transparent pixels.

    Args:
        path: the image file.
        reduce_to: (width, height), in the oriented image's pixels, that the caller needs at
            least: a JPEG is then decoded at 1/2, 1/4 or 1/8 scale where that still covers it
            (Pillow's draft mode), which makes large photos several times cheaper to decode.
    """
    try:
        with Image.open(path) as img:
            if reduce_to is not None and img.format == "JPEG":
                width, height = reduce_to
                if _orientation(img) in (5, 6, 7, 8):  # stored rotated by 90 degrees
                    width, height = height, width
                img.draft(img.mode, (max(1, width), max(1, height)))
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImageError(f"cannot decode image {path}: {err}") from None


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except (ValueError, TypeError, SyntaxError):
        return 1


def oriented_size(path: str) -> tuple[int, int]:
    """(width, height) of an image as shown (EXIF rotation applied), from its header only."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            return (height, width) if _orientation(img) in (5, 6, 7, 8) else (width, height)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImageError(f"cannot decode image {path}: {err}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to 8-bit RGB."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


@dataclass(frozen=True)
class Preprocessing:
    """What the model expects: crop size, eval resize, and normalisation."""

    image_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class TrainPreset:
    """The classic training recipe, RandomResizedCrop + horizontal flip, as a uint8 tensor.

    The crop is drawn from the image's header size before decoding, so a JPEG is decoded only
    at the scale the crop needs: on large photos the model sees the same crops, resampled.
    Normalisation happens later, on whole batches (``ModelInput``).
    """

    def __init__(self, *, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip_prob: float = 0.5):
        self.size = size
        self.scale = scale
        self.ratio = ratio
        self.hflip_prob = hflip_prob

    def __call__(self, path: str) -> torch.Tensor:
        width, height = oriented_size(path)
        # torchvision's own sampler, on a zero-cost stand-in of the image's shape.
        top, left, h, w = v1.RandomResizedCrop.get_params(
            torch.zeros(1, 1, 1).expand(1, height, width), list(self.scale), list(self.ratio))
        shrink = max(self.size / h, self.size / w)
        img = load_rgb(path, reduce_to=(math.ceil(width * shrink), math.ceil(height * shrink)))
        factor = img.width / width  # 1, 1/2, 1/4 or 1/8 after draft decoding
        img = F.resized_crop(img, round(top * factor), round(left * factor), max(1, round(h * factor)),
                             max(1, round(w * factor)), [self.size, self.size], antialias=True)
        if torch.rand(1).item() < self.hflip_prob:
            img = F.horizontal_flip(img)
        return F.pil_to_tensor(img)


class EvalPreset:
    """Resize the short side to ``resize_size``, center-crop ``crop_size``: a uint8 tensor."""

    def __init__(self, *, crop_size: int, resize_size: int):
        self.crop_size = crop_size
        self.resize_size = resize_size

    def __call__(self, path: str) -> torch.Tensor:
        width, height = oriented_size(path)
        shrink = self.resize_size / min(width, height)
        img = load_rgb(path, reduce_to=(math.ceil(width * shrink), math.ceil(height * shrink)))
        img = F.center_crop(F.resize(img, self.resize_size, antialias=True), [self.crop_size, self.crop_size])
        return F.pil_to_tensor(img)


class ModelInput:
    """Turns a batch of uint8 images into the model's normalised float input, on the device.

    Normalising whole batches where the model runs is cheaper than per image in the loader
    workers, and uint8 batches cross from the workers with a quarter of the bytes.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels_last: bool = False):
        self.mean = torch.tensor(mean).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std).view(1, -1, 1, 1) * 255
        self.channels_last = channels_last

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean.device != images.device:
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        x = (images.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def find_split(data_dir: str | Path, names: Sequence[str]) -> Path | None:
    """The first existing sub-folder of ``data_dir`` among ``names``."""
    for name in names:
        if (Path(data_dir) / name).is_dir():
            return Path(data_dir) / name
    return None


def check_split_folder(root: Path) -> None:
    """A UserError naming what is wrong with a split folder's layout: missing, not a folder, or
    without class sub-folders."""
    if not root.exists():
        raise UserError(f"data folder not found: {root}")
    if not root.is_dir():
        raise UserError(f"not a folder: {root}")
    if not class_folders(root):
        has_images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir())
        hint = " (images must sit in one sub-folder per class)" if has_images else ""
        raise UserError(f"{root} has no class sub-folders{hint}")


def class_folders(root: Path) -> list[str]:
    """Names of the class sub-folders of an ImageFolder split, sorted (hidden folders left out)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def image_files(folder: Path) -> list[Path]:
    """Image files below ``folder`` (by extension, any case), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class _ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder with this project's class folders: hidden folders such as
    ``.ipynb_checkpoints`` are not classes (torchvision's own listing takes them for one)."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = class_folders(Path(directory))
        return classes, {c: i for i, c in enumerate(classes)}


def image_folder(root: str | Path, classes: Sequence[str] | None = None,
                 exclude: frozenset[str] = frozenset()) -> datasets.ImageFolder:
    """A torchvision ImageFolder over ``root`` with RGB loading; a UserError names a bad layout.

    Args:
        root: the split folder, one sub-folder per class.
        classes: the class list to index by (the train split's); ``root`` must not hold others.
        exclude: paths of files to leave out (see ``preflight``).
    """
    root = Path(root)
    check_split_folder(root)
    ds = _ImageFolder(str(root), loader=load_rgb, allow_empty=True,
                      is_valid_file=lambda p: Path(p).suffix.lower() in IMAGE_EXTENSIONS and p not in exclude)
    counts = Counter(ds.targets)
    empty = [c for i, c in enumerate(ds.classes) if counts[i] == 0]
    if empty:
        raise UserError(f"class '{empty[0]}' in {root} has no images")
    if classes is not None:
        extra = sorted(set(ds.classes) - set(classes))
        if extra:
            raise UserError(f"{root} has classes the training set lacks: {', '.join(extra)}")
        # Index by the train list so a class missing here does not shift the labels.
        index = {c: i for i, c in enumerate(classes)}
        ds.samples = [(p, index[ds.classes[t]]) for p, t in ds.samples]
        ds.targets = [t for _, t in ds.samples]
        ds.imgs = ds.samples
        ds.classes = list(classes)
        ds.class_to_idx = index
    return ds


def missing_classes(classes: Sequence[str], ds: datasets.ImageFolder) -> list[str]:
    """Classes of the training list that have no image in ``ds``."""
    present = set(ds.targets)
    return [c for i, c in enumerate(classes) if i not in present]


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    # Large odd multipliers keep nearby (epoch, index) pairs far apart in seed space.
    return (seed * 1_000_003 + epoch * 7_919 * 1_000_033 + index * 2_654_435_761) % (2**63)


class SeededDataset(Dataset):
    """Wraps a dataset whose transform is random: item ``(epoch, i)`` is augmented reproducibly.

    The seed of each sample's augmentation is a function of ``(seed, epoch, i)`` only, so it
    does not matter which worker or process loads it, or whether the run was resumed.
    """

    def __init__(self, dataset: datasets.ImageFolder, transform: Any, seed: int):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        path, target = self.dataset.samples[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_sample_seed(self.seed, epoch, index))
            return self.transform(path), target


class IndexedDataset(Dataset):
    """A deterministic view of an ImageFolder that also returns each sample's index."""

    def __init__(self, dataset: datasets.ImageFolder, transform: Any):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        path, target = self.dataset.samples[index]
        return self.transform(path), target, index


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` keys in an order fixed by ``(seed, epoch)``.

    Accelerate shards the batches of this global order across processes, so processes see
    disjoint parts of one permutation, whatever their number.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(epoch, i) for i in self.order(epoch)])

    def __len__(self) -> int:
        return self.num_samples


@dataclass
class Splits:
    """The train and evaluation ImageFolders of a dataset folder, sharing one class list."""

    train: datasets.ImageFolder
    test: datasets.ImageFolder
    classes: list[str]
    warnings: list[str]


def load_splits(data_dir: str | Path, exclude: frozenset[str] = frozenset()) -> Splits:
    """``DATA/train`` and ``DATA/test`` (or ``DATA/val``); the class list is train's.

    A class in test that train lacks is an error; a train class missing from test a warning.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data folder not found: {data_dir}")
    train_dir = find_split(data_dir, ("train",))
    test_dir = find_split(data_dir, EVAL_SPLITS)
    if train_dir is None or test_dir is None:
        missing = "train/" if train_dir is None else "test/ (or val/)"
        raise UserError(f"{data_dir} has no {missing} folder; expected DATA/train/CLASS/*.jpg and DATA/test/CLASS/*.jpg")
    train = image_folder(train_dir, exclude=exclude)
    test = image_folder(test_dir, train.classes, exclude)
    notes = [f"class '{c}' has no images in {test_dir}" for c in missing_classes(train.classes, test)]
    return Splits(train, test, list(train.classes), notes)


def make_train_loader(ds: datasets.ImageFolder, pre: Preprocessing, *, batch_size: int, seed: int,
                      num_workers: int, augment: bool = True, pin_memory: bool = False) -> DataLoader:
    """The training DataLoader: classic augmentation seeded per sample, order fixed per epoch.

    Call ``set_epoch`` on it (or on what Accelerate made of it) before each epoch.

    Args:
        augment: the classic random augmentation; False: the eval preprocessing.
        pin_memory: batches in page-locked memory, for a CUDA device to copy in while it computes
            (with Accelerate's non_blocking, see runtime.build_accelerator); CPUs have nothing to overlap.
    """
    preset = TrainPreset(size=pre.image_size) if augment else \
        EvalPreset(crop_size=pre.image_size, resize_size=pre.resize_size)
    return DataLoader(SeededDataset(ds, preset, seed), batch_size=batch_size,
                      sampler=EpochSampler(len(ds), seed), **_worker_options(num_workers, pin_memory))


def make_eval_loader(ds: datasets.ImageFolder, pre: Preprocessing, *, batch_size: int,
                     num_workers: int, pin_memory: bool = False) -> DataLoader:
    """An evaluation DataLoader yielding ``(images, targets, dataset indices)`` in order (``pin_memory``:
    see ``make_train_loader``)."""
    return DataLoader(IndexedDataset(ds, EvalPreset(crop_size=pre.image_size, resize_size=pre.resize_size)),
                      batch_size=batch_size, shuffle=False,
                      **_worker_options(num_workers, pin_memory))


def _worker_options(num_workers: int, pin_memory: bool) -> dict[str, Any]:
    pin = {"pin_memory": pin_memory}
    if num_workers <= 0:
        return {"num_workers": 0, **pin}
    # Persistent workers keep their start-up cost out of every epoch; 4 batches in flight each
    # hide decode jitter behind compute.
    return {"num_workers": num_workers, "persistent_workers": True, "prefetch_factor": 4, **pin}
