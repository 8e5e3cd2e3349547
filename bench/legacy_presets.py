"""The transform presets as they were before issue 13 (commit 5a85e8d), kept callable so that
bench/loader_speed.py measures before and after side by side in one run. Not used by the project.

Each opens the file twice (header, then decode), reads EXIF three times, copies the image in
``exif_transpose`` and ``convert("RGB")``, and crops and resizes with Pillow in separate passes.
"""

from __future__ import annotations

import math

import torch
from torchvision import transforms as v1
from torchvision.transforms.v2 import functional as F

from finetune.data import loader as data
from finetune.data.images import load_rgb, oriented_size


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


class SeededDataset(data.SeededDataset):
    """The per-sample seeding as it was: ``torch.manual_seed``, which also queues a seed for every
    CUDA device (a traceback is recorded for each), 0.25 ms per image."""

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        path, target = self.dataset.samples[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(data._sample_seed(self.seed, epoch, index))
            return self.transform(path), target
