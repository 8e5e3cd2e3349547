"""The transform presets: a file path in, a uint8 CHW tensor out; normalisation of whole batches.

Random choices are drawn from torch's global RNG, which the dataset seeds per sample (see
``data.SeededDataset``), so each image's augmentation is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image
from torchvision import transforms as v1
from torchvision.transforms.v2 import functional as F

from finetune.images import load_rgb, oriented_size


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


class RandomCropPreset:
    """BiT-style training: resize the short side to ``resize_size``, take a random ``size`` x ``size``
    crop, flip horizontally with probability ``hflip_prob``: a uint8 tensor.

    Keeps the whole object at one scale (unlike RandomResizedCrop's zoom), which suits small
    datasets. The crop position is drawn from the header size before decoding, as in ``TrainPreset``.
    """

    def __init__(self, *, size: int, resize_size: int, hflip_prob: float = 0.5):
        if resize_size < size:
            raise ValueError(f"resize_size ({resize_size}) must be at least the crop size ({size})")
        self.size = size
        self.resize_size = resize_size
        self.hflip_prob = hflip_prob

    def __call__(self, path: str) -> torch.Tensor:
        width, height = oriented_size(path)
        shrink = self.resize_size / min(width, height)
        img = load_rgb(path, reduce_to=(math.ceil(width * shrink), math.ceil(height * shrink)))
        img = F.resize(img, self.resize_size, antialias=True)
        top, left, h, w = v1.RandomCrop.get_params(img, (self.size, self.size))
        img = F.crop(img, top, left, h, w)
        if torch.rand(1).item() < self.hflip_prob:
            img = F.horizontal_flip(img)
        return F.pil_to_tensor(img)


class EvalPreset:
    """Resize the short side to ``resize_size``, center-crop ``crop_size``: a uint8 tensor.

    Args:
        interpolation: of the resize, ``bilinear``, ``bicubic`` or ``nearest``: the one the
            pretrained weights were evaluated with (several torchvision and timm weights say bicubic).
    """

    def __init__(self, *, crop_size: int, resize_size: int, interpolation: str = "bilinear"):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        self.crop_size = crop_size
        self.resize_size = resize_size
        self.interpolation = interpolation

    def __call__(self, path: str) -> torch.Tensor:
        width, height = oriented_size(path)
        shrink = self.resize_size / min(width, height)
        return self.from_image(load_rgb(path, reduce_to=(math.ceil(width * shrink), math.ceil(height * shrink))))

    def from_image(self, img: Image.Image) -> torch.Tensor:
        """The same resize and crop of an RGB image already decoded."""
        img = F.resize(img, self.resize_size, interpolation=F.InterpolationMode(self.interpolation), antialias=True)
        return F.pil_to_tensor(F.center_crop(img, [self.crop_size, self.crop_size]))


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
