"""The transform presets: a file path in, a uint8 (3, H, W) tensor out; normalisation of whole batches.

Each preset draws its random crop from the image's header alone (``plan``), then decodes the
file once, cutting and resampling that crop in one pass (``decoding.decode_crop``). Random
choices are drawn from torch's global RNG, with torchvision's own samplers, in the same order as
torchvision's reference transforms; the dataset seeds it per sample (``data.SeededDataset``), so
each image's augmentation is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as v1

from finetune.data.decoding import CpuDecoder, Crop, Encoded, EncodedBatch, decode_crop, resample, resample_pillow
from finetune.data.images import Header, read_header, read_image_bytes

# A zero-cost stand-in of an image's shape for torchvision's samplers (expanded, never allocated).
_PIXEL = torch.zeros(1, 1, 1)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class Preprocessing:
    """What the model expects: crop size, eval resize and its interpolation, and normalisation."""

    image_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"  # of the eval resize: what the pretrained weights were evaluated with

    def eval_preset(self) -> "EvalPreset":
        """The eval transform of these settings."""
        return EvalPreset(crop_size=self.image_size, resize_size=self.resize_size, interpolation=self.interpolation)


class _Preset:
    """A file in, a crop drawn from its header, the file decoded once."""

    def plan(self, header: Header) -> Crop:
        raise NotImplementedError

    def encode(self, path: str) -> Encoded:
        """The file's bytes (or a dataset row's, ``images.register_rows``), its header and the crop drawn
        for it: decoding left to a later stage."""
        data = read_image_bytes(path)
        header = read_header(data, path)
        return Encoded(data, header, self.plan(header), path)

    def __call__(self, path: str) -> torch.Tensor:
        return decode_crop(self.encode(path))


def _flip(prob: float) -> bool:
    # Drawn as torchvision's RandomHorizontalFlip does, after the crop.
    return torch.rand(1).item() < prob


def _resized_size(header: Header, short: int) -> tuple[int, int]:
    """(height, width) after torchvision's Resize(short): the short side ``short``, the long one truncated."""
    w, h = header.width, header.height
    if w <= h:
        return int(short * h / w), short
    return short, int(short * w / h)


def _whole(header: Header, out: tuple[int, int], cut: tuple[int, int, int, int], flip: bool = False,
           pillow: str | None = None) -> Crop:
    return Crop(0, 0, header.height, header.width, out[0], out[1], cut, flip, pillow)


class TrainPreset(_Preset):
    """The classic training recipe, RandomResizedCrop + horizontal flip, as a uint8 tensor.

    The crop is drawn from the image's header size before decoding (torchvision's own sampler),
    then cut and resampled from the file in one pass, from a JPEG decoded at 1/2, 1/4 or 1/8
    scale where that still covers it. Normalisation happens later, on whole batches (``ModelInput``).

    Args:
        size: the output side, in pixels.
        scale: the crop's area as a fraction of the image's, drawn uniformly in this range.
        ratio: the crop's aspect ratio range (drawn log-uniformly).
        hflip_prob: the probability of a horizontal flip.
    """

    def __init__(self, *, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip_prob: float = 0.5):
        self.size = size
        self.scale = scale
        self.ratio = ratio
        self.hflip_prob = hflip_prob

    def plan(self, header: Header) -> Crop:
        top, left, h, w = v1.RandomResizedCrop.get_params(
            _PIXEL.expand(1, header.height, header.width), list(self.scale), list(self.ratio))
        return Crop(top, left, h, w, self.size, self.size, flip=_flip(self.hflip_prob))


class RandomCropPreset(_Preset):
    """BiT-style training: resize the short side to ``resize_size``, take a random ``size`` x ``size``
    crop, flip horizontally with probability ``hflip_prob``: a uint8 tensor.

    Keeps the whole object at one scale (unlike RandomResizedCrop's zoom), which suits small
    datasets. The crop is drawn as torchvision's Resize + RandomCrop would, from the header size;
    the image is resampled once, at the resized size, and the crop cut from that.
    """

    def __init__(self, *, size: int, resize_size: int, hflip_prob: float = 0.5):
        if resize_size < size:
            raise ValueError(f"resize_size ({resize_size}) must be at least the crop size ({size})")
        self.size = size
        self.resize_size = resize_size
        self.hflip_prob = hflip_prob

    def plan(self, header: Header) -> Crop:
        resized = _resized_size(header, self.resize_size)
        top, left, h, w = v1.RandomCrop.get_params(_PIXEL.expand(1, *resized), (self.size, self.size))
        return _whole(header, resized, (top, left, h, w), _flip(self.hflip_prob))


class EvalPreset(_Preset):
    """Resize the short side to ``resize_size``, center-crop ``crop_size``: a uint8 tensor as
    torchvision's Resize + CenterCrop make it from a PIL image (the weights' own ``transforms()``),
    from a JPEG decoded at reduced scale where that still covers the resize.

    A bilinear resize is torch's uint8 antialiased one, which follows Pillow's filter: it differs by
    one level in about 0.1% of the values of a photo, in a third of the time of Pillow resampling
    only the crop (0.27 ms against 0.78 ms on a 500x375 photo). Bicubic and nearest resample with
    Pillow (only the crop, from its box in the source: its float corners round a few values a
    level or two the other way).

    Args:
        interpolation: of the resize, ``bilinear``, ``bicubic`` or ``nearest``: the one the
            pretrained weights were evaluated with (several torchvision and timm weights say bicubic).
    """

    def __init__(self, *, crop_size: int, resize_size: int, interpolation: str = "bilinear",
                 hflip_prob: float = 0.0):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        self.crop_size = crop_size
        self.resize_size = resize_size
        self.interpolation = interpolation
        self.hflip_prob = hflip_prob  # the ``flip`` augmentation; evaluation never flips (and draws nothing)

    def plan(self, header: Header) -> Crop:
        resized = _resized_size(header, self.resize_size)
        # torchvision's center_crop offsets.
        top = int(round((resized[0] - self.crop_size) / 2.0))
        left = int(round((resized[1] - self.crop_size) / 2.0))
        flip = _flip(self.hflip_prob) if self.hflip_prob else False
        pillow = None if self.interpolation == "bilinear" else self.interpolation
        return _whole(header, resized, (top, left, self.crop_size, self.crop_size), flip, pillow=pillow)

    def from_image(self, img: Image.Image) -> torch.Tensor:
        """The same resize and crop of an RGB image already decoded."""
        crop = self.plan(Header(img.width, img.height))
        if crop.pillow is not None:
            return resample_pillow(img, crop)
        return resample(np.asarray(img), 1, (img.height, img.width), crop)


class ModelInput:
    """Turns a batch of uint8 images into the model's normalised float input, on the device.

    Normalising whole batches where the model runs is cheaper than per image in the loader
    workers, and uint8 batches cross from the workers with a quarter of the bytes. Batches come
    channels-last from the loader (``data.collate``), so with ``channels_last`` nothing is
    transposed here. A batch of ``Encoded`` items (workers that hand over bytes) is decoded first.

    Args:
        mean, std: per-channel normalisation, on a 0-1 scale.
        channels_last: return the channels-last memory format, else the default one.
        decoder: turns a list of ``Encoded`` items into a uint8 batch (default: ``CpuDecoder``).
        device: where a decoded batch goes (default: the CPU).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels_last: bool = False,
                 decoder=None, device: torch.device | str | None = None):
        self.mean = torch.tensor(mean).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std).view(1, -1, 1, 1) * 255
        self.channels_last = channels_last
        self.decoder = decoder or CpuDecoder()
        self.device = device

    def __call__(self, images: torch.Tensor | EncodedBatch) -> torch.Tensor:
        if isinstance(images, EncodedBatch):
            images = self.decoder(images.items)
            if self.device is not None:
                images = images.to(self.device, non_blocking=True)
        if self.mean.device != images.device:
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        x = (images.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)


# RandomResizedCrop's area range per augmentation name: the classic recipe's, and a milder floor
# (fastai's min_scale of about 0.35) that keeps most of a small or low-resolution object in view.
CROP_SCALES = {"classic": (0.08, 1.0), "mild": (0.35, 1.0)}


def train_preset(augment: str, pre: Preprocessing, hflip: bool = True):
    """The training transform for an ``--augment`` choice (``classic``, ``mild``, ``crop``, ``flip``, ``none``).

    Args:
        augment: the augmentation name (``auto`` must be resolved by the recipe first).
        pre: crop size, eval resize and normalisation of the model.
        hflip: flip horizontally at random (``none`` never flips).
    """
    p = 0.5 if hflip else 0.0
    if augment in CROP_SCALES:
        return TrainPreset(size=pre.image_size, scale=CROP_SCALES[augment], hflip_prob=p)
    if augment == "crop":
        return RandomCropPreset(size=pre.image_size, resize_size=pre.resize_size, hflip_prob=p)
    if augment in ("flip", "none"):
        return EvalPreset(crop_size=pre.image_size, resize_size=pre.resize_size, interpolation=pre.interpolation,
                          hflip_prob=p if augment == "flip" else 0.0)
    raise ValueError(f"unknown augmentation {augment!r}")
