"""Fashion-MNIST as an ImageFolder, from Debian's ``dataset-fashion-mnist`` package: a real dataset
of another kind than the demo's photos (28x28 gray clothes, 10 classes) that installs offline.

    apt-get install dataset-fashion-mnist
    python -c "from finetune.data.fashion import fashion_mnist; print(fashion_mnist(Path('fashion')))"

The tests and the benchmarks use it; so may anyone trying the tool without data of their own.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle_boot")


def write_folder(root: Path, split: str, images: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> None:
    """``images`` as PNG files in ``root/split/CLASS/``, named by their position."""
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
