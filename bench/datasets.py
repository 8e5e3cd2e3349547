"""Small real datasets written as ImageFolders, for benchmarks and default-picking sweeps.

All install offline: scikit-image (LFW faces), Debian's dataset-fashion-mnist, scikit-learn
(8x8 digits).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from finetune.data.fashion import FASHION_DIR, fashion_mnist, write_folder  # noqa: F401 (the benchmarks' names)
from finetune.data.shapes import SHAPE_KINDS, shapes  # noqa: F401 (the benchmarks' names)

# Two classes of photo-sized JPEGs cut from scikit-image's sample photos.
PHOTO_CLASSES = {"cat_coffee": ("chelsea", "coffee"), "space": ("astronaut", "rocket")}


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


def boxes_file(root: Path) -> Path:
    """Where ``textures`` and ``photos`` record each patch's source square, beside the dataset: a
    CSV of path (relative to ``root``), source, y, x, side."""
    return root.parent / f"{root.name}.boxes.csv"


def patch_boxes(root: Path) -> dict[str, tuple[str, int, int, int]]:
    """Each patch's (source, y, x, side), by path relative to ``root`` (``boxes_file``)."""
    rows = [line.split(",") for line in boxes_file(root).read_text().splitlines()[1:]]
    return {path: (source, int(y), int(x), int(s)) for path, source, y, x, s in rows}


def _patches(root: Path, split: str, sources: dict[str, np.ndarray], n: int, size: tuple[int, int],
             side: tuple[float, float], region: tuple[float, float], rng: np.random.Generator, ext: str) -> None:
    """``n`` patches per class: a random square of ``side`` (fractions of the source's short side)
    from the horizontal ``region`` (fractions of its width), resized to ``size``; each square is
    appended to ``boxes_file(root)`` (overlapping patches of one source are near-duplicates)."""
    boxes = boxes_file(root)
    if not boxes.exists():
        boxes.write_text("path,source,y,x,side\n")
    lines = []
    for name, src in sources.items():
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        h, w = src.shape[:2]
        x0, x1 = int(region[0] * w), int(region[1] * w)
        for i in range(n):
            s = int(min(h, x1 - x0) * rng.uniform(*side))
            y, x = rng.integers(0, h - s + 1), rng.integers(x0, x1 - s + 1)
            Image.fromarray(src[y:y + s, x:x + s]).resize(size, Image.BILINEAR).save(
                folder / f"{i:05d}{ext}", **({"quality": 90} if ext == ".jpg" else {}))
            lines.append(f"{split}/{name}/{i:05d}{ext},{name},{y},{x},{s}\n")
    with open(boxes, "a") as f:
        f.writelines(lines)


def textures(root: Path, n_train: int = 50, n_val: int = 20, n_test: int = 40, seed: int = 0) -> Path:
    """6 classes of 96x96 grayscale patches cut from scikit-image's texture and photo images; train
    patches come from the left 60% of each image, val and test from the right 40%."""
    if (root / "train").is_dir():
        return root
    from skimage import data as skdata

    sources = {name: getattr(skdata, name)() for name in ("brick", "grass", "gravel", "moon", "camera", "cell")}
    boxes_file(root).unlink(missing_ok=True)  # left by an interrupted run
    rng = np.random.default_rng(seed)
    for split, n, region in (("train", n_train, (0, 0.6)), ("val", n_val, (0.6, 1)), ("test", n_test, (0.6, 1))):
        _patches(root, split, sources, n, (96, 96), (0.3, 0.7), region, rng, ".png")
    return root


def photos(root: Path, n_train: int = 20, n_val: int = 10, n_test: int = 20, seed: int = 0) -> Path:
    """6 classes of 256x256 JPEG views of scikit-image's colour photographs (astronaut, cat, coffee, rocket,
    galaxies, tissue): each a random square crop of 40-90% of the short side; train crops from the left
    65% of each photo, val and test from the right 65%."""
    if (root / "train").is_dir():
        return root
    from skimage import data as skdata

    names = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
    sources = {name: getattr(skdata, name)()[..., :3] for name in names}
    boxes_file(root).unlink(missing_ok=True)  # left by an interrupted run
    rng = np.random.default_rng(seed)
    for split, n, region in (("train", n_train, (0, 0.65)), ("val", n_val, (0.35, 1)), ("test", n_test, (0.35, 1))):
        _patches(root, split, sources, n, (256, 256), (0.4, 0.9), region, rng, ".jpg")
    return root


def carve_val(root: Path, out: Path, n_val_per_class: int, seed: int = 0, n_train_per_class: int | None = None) -> Path:
    """``out/train`` and ``out/val`` carved from ``root/train`` (symlinks to its files):
    ``n_val_per_class`` images of each class go to val, up to ``n_train_per_class`` of the rest to train."""
    if (out / "train").is_dir():
        return out
    rng = np.random.default_rng(seed)
    for cls in sorted(p.name for p in (root / "train").iterdir() if p.is_dir()):
        files = sorted((root / "train" / cls).iterdir())
        order = rng.permutation(len(files))
        val, train = order[:n_val_per_class], order[n_val_per_class:]
        if n_train_per_class is not None:
            train = train[:n_train_per_class]
        for split, chosen in (("val", val), ("train", train)):
            (out / split / cls).mkdir(parents=True, exist_ok=True)
            for i in chosen:
                (out / split / cls / files[i].name).symlink_to(files[i].resolve())
    return out


def fit_folder(root: Path) -> Path:
    """``root/fit`` with ``train`` and ``val`` linked from ``root``: what a sweep run trains and
    validates on, leaving ``root/test`` unseen."""
    fit = root / "fit"
    if not fit.is_dir():
        fit.mkdir()
        for split in ("train", "val"):
            (fit / split).symlink_to((root / split).resolve())
    return fit
