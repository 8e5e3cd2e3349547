"""ImageFolder datasets, data loaders, and a resumable, seeded sampling order.

Randomness in the data pipeline is a pure function of ``(seed, epoch, sample index)``: the
sampler's order comes from ``(seed, epoch)`` and each sample's augmentation is drawn after
seeding from ``(seed, epoch, index)``. So the images a step sees do not depend on the number
of processes or workers, and a run resumed mid-epoch sees exactly what an uninterrupted one saw.
Decoding lives in ``images``, the transforms in ``presets``.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info
from torchvision import datasets

from finetune.decoding import Encoded, EncodedBatch, stack_channels_last
from finetune.errors import UserError
from finetune.images import BadImageError, load_rgb
from finetune.preemption import ignore_stop_signals
from finetune.presets import Preprocessing, TrainPreset



def _pillow_extensions() -> tuple[str, ...]:
    """File extensions of every format Pillow opens and decodes by itself (GIF, AVIF, ICO, ...).

    Left out: stub formats that need a plugin Pillow lacks (BUFR, GRIB, HDF5, WMF), EPS (it
    needs Ghostscript) and MPEG (Pillow reads only its header).
    """
    from PIL import Image, ImageFile

    Image.init()
    decodable = {fmt for fmt, (factory, _) in Image.OPEN.items()
                 if fmt not in ("EPS", "MPEG")
                 and not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))}
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in decodable))


IMAGE_EXTENSIONS = _pillow_extensions()
EVAL_SPLITS = ("test", "val")


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
    left_out: list[str] = []  # files Pillow cannot open, to say what was left out and why

    def usable(path: str) -> bool:
        if Path(path).suffix.lower() not in IMAGE_EXTENSIONS:
            if not Path(path).name.startswith("."):  # .DS_Store and the like are nobody's images
                left_out.append(path)
            return False
        return path not in exclude

    ds = _ImageFolder(str(root), loader=load_rgb, allow_empty=True, is_valid_file=usable)
    ds.left_out = left_out
    counts = Counter(ds.targets)
    empty = [c for i, c in enumerate(ds.classes) if counts[i] == 0]
    if empty:
        inside = [p for p in left_out if Path(p).parent.relative_to(root).parts[:1] == (empty[0],)]
        why = f" ({len(inside)} file(s) of types Pillow cannot open: {_suffixes(inside)})" if inside else ""
        raise UserError(f"class '{empty[0]}' in {root} has no images{why}")
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


def _suffixes(paths: Sequence[str]) -> str:
    counts = Counter(Path(p).suffix.lower() or "no extension" for p in paths)
    return ", ".join(f"{ext} x{n}" for ext, n in sorted(counts.items()))


def left_out_note(ds: datasets.ImageFolder) -> str | None:
    """A warning naming the files of ``ds``'s folders that were left out as not images, or None."""
    left_out = getattr(ds, "left_out", [])
    if not left_out:
        return None
    return (f"left out {len(left_out)} file(s) in {ds.root} of types Pillow cannot open ({_suffixes(left_out)}), "
            f"e.g. {left_out[0]}")


def missing_classes(classes: Sequence[str], ds: datasets.ImageFolder) -> list[str]:
    """Classes of the training list that have no image in ``ds``."""
    present = set(ds.targets)
    return [c for i, c in enumerate(classes) if i not in present]


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    # Large odd multipliers keep nearby (epoch, index) pairs far apart in seed space.
    return (seed * 1_000_003 + epoch * 7_919 * 1_000_033 + index * 2_654_435_761) % (2**63)


class SkippedImages:
    """Images that failed to decode while a run used them, under ``--bad-data skip``.

    Loader workers are other processes: they send what they skip through a queue, and the run
    names each image once (``new``) and counts them in its summary (``named``).
    """

    def __init__(self) -> None:
        import multiprocessing

        self._owner = os.getpid()
        self._queue = multiprocessing.Queue()
        self._here: list[tuple[str, str]] = []  # skipped in this process (no workers): no queue latency
        self.named: dict[str, str] = {}  # path -> why, in the order they were first met

    def record(self, path: str, why: str) -> None:
        if os.getpid() == self._owner:
            self._here.append((path, why))
        else:
            self._queue.put((path, why))

    def new(self) -> list[tuple[str, str]]:
        """Skipped images not yet returned by an earlier call (call it in the run's own process)."""
        import queue

        found, self._here = self._here, []
        try:
            while True:
                found.append(self._queue.get(timeout=0.05))
        except queue.Empty:
            pass
        fresh = [(path, why) for path, why in dict(found).items() if path not in self.named]
        self.named.update(fresh)
        return fresh

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_here": []}


class SeededDataset(Dataset):
    """Wraps a dataset whose transform is random: item ``(epoch, i)`` is augmented reproducibly.

    The seed of each sample's augmentation is a function of ``(seed, epoch, i)`` only, so it
    does not matter which worker or process loads it, or whether the run was resumed.

    Args:
        skipped: under ``--bad-data skip``, where images that fail to decode are recorded; the
            next image in the dataset that decodes stands in for one (a function of the index,
            so batches keep their size and a resumed run sees what an uninterrupted one saw).
            None: a decoding failure stops the run, naming the image.
    """

    def __init__(self, dataset: datasets.ImageFolder, transform: Any, seed: int,
                 skipped: SkippedImages | None = None):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, epoch: int, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.dataset.samples[index]
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only, which the presets draw from: torch.manual_seed also queues
            # seeds for every CUDA device, at 0.25 ms per image (bench/loader_speed.py).
            torch.default_generator.manual_seed(_sample_seed(self.seed, epoch, index))
            return self.transform(path), target

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        for step in range(len(self)):
            stand_in = (index + step) % len(self)
            try:
                return self._load(epoch, stand_in)
            except BadImageError as err:
                if self.skipped is None:
                    raise
                self.skipped.record(self.dataset.samples[stand_in][0], str(err))
        raise UserError(f"no image of {self.dataset.root} can be decoded")


class IndexedDataset(Dataset):
    """A deterministic view of an ImageFolder that also returns each sample's index.

    Args:
        skipped: see ``SeededDataset``; here an image that fails to decode comes back blank
            with index -1, and ``engine.evaluate`` leaves it out.
    """

    def __init__(self, dataset: datasets.ImageFolder, transform: Any, skipped: SkippedImages | None = None):
        self.dataset = dataset
        self.transform = transform
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        path, target = self.dataset.samples[index]
        try:
            return self.transform(path), target, index
        except BadImageError as err:
            size = getattr(self.transform, "crop_size", None)  # None: workers hand over bytes, not images
            if self.skipped is None or size is None:
                raise
            self.skipped.record(path, str(err))
            return torch.zeros(3, size, size, dtype=torch.uint8), target, -1


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` keys in an order fixed by ``(seed, epoch)``.

    Accelerate shards the batches of this global order across processes, so processes see
    disjoint parts of one permutation, whatever their number.

    Args:
        global_batch: images per step over all processes; where an epoch would end on a batch
            of one image, that image (the last of the epoch's order, a different one each
            epoch) is left out, since BatchNorm cannot train on one. 0: keep every image.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True, global_batch: int = 0):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.leaves_out_one = bool(global_batch) and num_samples > 1 and num_samples % global_batch == 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(epoch, i) for i in self.order(epoch)[:len(self)]])

    def __len__(self) -> int:
        return self.num_samples - self.leaves_out_one


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
    notes += [note for note in (left_out_note(train), left_out_note(test)) if note]
    return Splits(train, test, list(train.classes), notes)


def collate(batch: list[tuple]) -> tuple:
    """A loader batch: images stacked channels-last (in shared memory in a worker, like torch's
    default collate), or an ``EncodedBatch`` when workers hand over bytes; targets (and indices)
    as torch collates them."""
    images = [item[0] for item in batch]
    rest = default_collate([item[1:] for item in batch])
    if isinstance(images[0], Encoded):
        return (EncodedBatch(images), *rest)
    return (stack_channels_last(images, shared=get_worker_info() is not None), *rest)


def make_train_loader(ds: datasets.ImageFolder, pre: Preprocessing, *, batch_size: int, seed: int,
                      num_workers: int, augment: bool = True, pin_memory: bool = False,
                      decode_in_workers: bool = True, global_batch: int = 0,
                      skipped: SkippedImages | None = None) -> DataLoader:
    """The training DataLoader: classic augmentation seeded per sample, order fixed per epoch.

    Call ``set_epoch`` on it (or on what Accelerate made of it) before each epoch.

    Args:
        augment: the classic random augmentation; False: the eval preprocessing.
        pin_memory: batches in page-locked memory, for a CUDA device to copy in while it computes
            (with Accelerate's non_blocking, see runtime.build_accelerator); CPUs have nothing to overlap.
        decode_in_workers: False: workers read each file and draw its crop, and hand over the bytes
            (``decoding.EncodedBatch``) for ``presets.ModelInput`` to decode where the model runs.
        global_batch: see ``EpochSampler``: give it when the model trains BatchNorm layers.
        skipped: see ``SeededDataset`` (``--bad-data skip``).
    """
    preset = TrainPreset(size=pre.image_size) if augment else \
        pre.eval_preset()
    return DataLoader(SeededDataset(ds, preset if decode_in_workers else preset.encode, seed, skipped),
                      batch_size=batch_size, sampler=EpochSampler(len(ds), seed, global_batch=global_batch),
                      collate_fn=collate, **_worker_options(num_workers, pin_memory))


def make_eval_loader(ds: datasets.ImageFolder, pre: Preprocessing, *, batch_size: int,
                     num_workers: int, pin_memory: bool = False, decode_in_workers: bool = True,
                     skipped: SkippedImages | None = None) -> DataLoader:
    """An evaluation DataLoader yielding ``(images, targets, dataset indices)`` in order (``pin_memory``,
    ``decode_in_workers``: see ``make_train_loader``; ``skipped``: see ``IndexedDataset``)."""
    preset = pre.eval_preset()
    return DataLoader(IndexedDataset(ds, preset if decode_in_workers else preset.encode, skipped),
                      batch_size=batch_size, shuffle=False, collate_fn=collate,
                      **_worker_options(num_workers, pin_memory))


def _worker_options(num_workers: int, pin_memory: bool) -> dict[str, Any]:
    pin = {"pin_memory": pin_memory}
    if num_workers <= 0:
        return {"num_workers": 0, **pin}
    # Persistent workers keep their start-up cost out of every epoch; 4 batches in flight each
    # hide decode jitter behind compute. Workers leave stop signals to their parent (preemption).
    return {"num_workers": num_workers, "persistent_workers": True, "prefetch_factor": 4,
            "worker_init_fn": ignore_stop_signals, **pin}
