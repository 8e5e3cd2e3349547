"""The built-in demo dataset: faces vs not faces from scikit-image's LFW subset, offline.

Like the classic hotdog / not-hotdog task, a small binary problem that an ImageNet network
learns in seconds. 200 real 25x25 grayscale crops (100 faces, 100 not faces) are written once
as an ImageFolder (PNG) into a cache folder; 70% of each class trains, 30% tests.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.errors import UserError

CLASSES = ("face", "not_face")
TEST_FRACTION = 0.3
SPLIT_SEED = 0


def cache_dir() -> Path:
    """``$FINETUNE_CACHE``, else ``$XDG_CACHE_HOME/finetune``, else ``~/.cache/finetune``."""
    if os.environ.get("FINETUNE_CACHE"):
        return Path(os.environ["FINETUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "finetune"


def demo_dataset(root: Path | None = None) -> Path:
    """The demo ImageFolder (``train/`` and ``test/``), written on first use.

    Call it on one process a node (``local_main_process_first``): each node keeps its own cache.
    Where several nodes share one home folder, they may write it at once; the first to finish wins.
    """
    root = root or cache_dir() / "lfw-faces"
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root
    try:
        from skimage.data import lfw_subset  # scikit-image loads in about a second: only the demo needs it
    except ImportError:
        raise UserError("the demo dataset needs scikit-image: pip install scikit-image "
                        "(or pass --data DIR)") from None
    images = lfw_subset()  # (200, 25, 25) floats in [0, 1]; the first 100 are faces
    labels = np.array([0] * 100 + [1] * 100)
    rng = np.random.default_rng(SPLIT_SEED)
    root.parent.mkdir(parents=True, exist_ok=True)
    # Written beside its final place and renamed, so a killed first run leaves no half dataset.
    staging = Path(tempfile.mkdtemp(prefix=".lfw-", dir=root.parent))
    try:
        for label, name in enumerate(CLASSES):
            members = rng.permutation(np.flatnonzero(labels == label))
            n_test = round(len(members) * TEST_FRACTION)
            for split, chosen in (("test", members[:n_test]), ("train", members[n_test:])):
                folder = staging / split / name
                folder.mkdir(parents=True)
                for i in chosen:
                    pixels = (images[i] * 255).round().astype(np.uint8)
                    Image.fromarray(pixels, mode="L").save(folder / f"{i:03d}.png")
        try:
            os.replace(staging, root)
        except OSError:  # another process (another node's, on a shared home) finished first
            if not ((root / "train").is_dir() and (root / "test").is_dir()):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
