"""Small real datasets written as ImageFolders, for benchmarks and default-picking sweeps.

All install offline: scikit-image (LFW faces), Debian's dataset-fashion-mnist, scikit-learn
(8x8 digits).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

# Two classes of photo-sized JPEGs cut from scikit-image's sample photos.
PHOTO_CLASSES = {"cat_coffee": ("chelsea", "coffee"), "space": ("astronaut", "rocket")}
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle_boot")


def write_folder(root: Path, split: str, images: np.ndarray, labels: np.ndarray, classes) -> None:
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / split / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:05d}.png")


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def fashion_mnist(root: Path, n_train: int = 1000, n_test: int = 500, seed: int = 0) -> Path:
    """A class-balanced random subset of Fashion-MNIST (28x28 gray, 10 classes)."""
    if (root / "train").is_dir():
        return root
    rng = np.random.default_rng(seed)
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = _idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = _idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz", 8)
        chosen = rng.choice(len(labels), n, replace=False)
        write_folder(root, split, images[chosen], labels[chosen], FASHION_CLASSES)
    return root


def digits(root: Path, seed: int = 0) -> Path:
    """scikit-learn's 8x8 digits (1797 images, 10 classes), 70/30 split."""
    if (root / "train").is_dir():
        return root
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255 / 16)).round().astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    cut = int(0.7 * len(order))
    names = [str(i) for i in range(10)]
    write_folder(root, "train", images[order[:cut]], d.target[order[:cut]], names)
    write_folder(root, "test", images[order[cut:]], d.target[order[cut:]], names)
    return root


def photo_folder(root: Path, n_train: int, n_test: int, seed: int = 0, size: tuple[int, int] = (500, 375)) -> Path:
    """Jittered JPEG crops of skimage photos (``size`` pixels), half the images in each of 2 classes."""
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    photos = {name: getattr(skdata, name)() for names in PHOTO_CLASSES.values() for name in names}
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            cls = list(PHOTO_CLASSES)[i % len(PHOTO_CLASSES)]
            src = photos[str(rng.choice(PHOTO_CLASSES[cls]))]
            h, w = src.shape[:2]
            ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            crop = src[y:y + ch, x:x + cw] * rng.uniform(0.8, 1.2, size=3)  # per-channel colour jitter
            img = Image.fromarray(crop.clip(0, 255).astype(np.uint8)).resize(size)
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            img.save(root / split / cls / f"{i:05d}.jpg", quality=90)
    return root
