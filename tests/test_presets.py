"""The transform presets against torchvision's reference transforms, on real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as v1

from finetune.images import load_rgb
from finetune.presets import RandomCropPreset

# Resampling differences only (the JPEG decoder's DCT scaling, then an antialiased resize, against a
# full decode and the resize): mean absolute difference per pixel, on a 0-255 scale.
MEAN_TOLERANCE = 2.0


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Real photos shipped with scikit-image, as JPEGs: landscape, portrait and square."""
    from skimage import data as skdata
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("chelsea", "coffee", "rocket", "astronaut"):
        path = folder / f"{name}.jpg"
        Image.fromarray(getattr(skdata, name)()).save(path, quality=90)
        paths.append(path)
    return paths


def reference(transform, path: Path, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return v1.PILToTensor()(transform(load_rgb(str(path))))


def run(preset, path: Path, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return preset(str(path))


def test_random_crop_preset_matches_resize_then_random_crop_then_flip(photos: list[Path]):
    preset = RandomCropPreset(size=160, resize_size=192)
    ref = v1.Compose([v1.Resize(192, antialias=True), v1.RandomCrop(160), v1.RandomHorizontalFlip(0.5)])
    flips = 0
    for path in photos:
        for seed in range(4):
            ours, theirs = run(preset, path, seed), reference(ref, path, seed)
            assert ours.shape == theirs.shape == (3, 160, 160) and ours.dtype == torch.uint8
            assert (ours.float() - theirs.float()).abs().mean() < MEAN_TOLERANCE, (path.name, seed)
            flips += not torch.equal(ours, run(RandomCropPreset(size=160, resize_size=192, hflip_prob=0.0), path, seed))
    assert 0 < flips < 16  # some crops flipped, some not


def test_random_crop_preset_rejects_a_resize_below_the_crop():
    with pytest.raises(ValueError, match="resize_size"):
        RandomCropPreset(size=224, resize_size=200)
