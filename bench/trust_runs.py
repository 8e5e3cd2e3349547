"""Short training runs on several kinds of small real data, shared by bench.calibration_quality and
bench.ood_quality: each kind written as a folder with train/, val/ and test/, one mobilenet_v2 run
per kind (ImageNet weights, offline), and the logits and penultimate features of image lists."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from bench import datasets
from bench.common import quietly
from finetune.commands import train
from finetune.data.demo import demo_dataset
from finetune.data.inputs import image_paths
from finetune.models.inference import LoadedClassifier, load_classifier

KINDS: dict[str, Callable[[Path], Path]] = {
    # LFW faces vs not faces (25x25 gray): the demo's own train/test; val carved from its train.
    "faces": lambda root: datasets.carve_val(demo_dataset(root / "lfw-src"), root / "faces", 15),
    "fashion": lambda root: datasets.carve_val(datasets.fashion_mnist(root / "fashion-src", 600, 300),
                                               root / "fashion", 10),
    "textures": lambda root: datasets.textures(root / "textures"),
    "photos": lambda root: datasets.photos(root / "photos"),
}


def prepare(kind: str, root: Path) -> Path:
    """The dataset folder of ``kind`` (train/, val/, test/) under ``root``, written once."""
    data = KINDS[kind](root)
    test = data / "test"
    if not test.exists():  # carve_val links train/ and val/: the test split comes from the source
        test.symlink_to((root / {"faces": "lfw-src", "fashion": "fashion-src"}[kind] / "test").resolve())
    return data


def train_run(kind: str, root: Path, epochs: int = 3, image_size: int = 64, extra: tuple[str, ...] = ()) -> Path:
    """Train mobilenet_v2 on ``kind`` once (reused when its folder holds a model); the run folder."""
    out = root / "runs" / kind
    if (out / "model.safetensors").is_file():
        return out
    data = prepare(kind, root)
    quietly(train.main, ["--data", str(data), "--model", "mobilenet_v2", "--image-size", str(image_size),
                         "--epochs", str(epochs), "--batch-size", "32", "--num-workers", "0", "--log-with", "none",
                         "--no-plots", "--output-dir", str(out), "--overwrite", *extra])
    return out


def outputs(clf: LoadedClassifier, paths: list[Path], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw logits and penultimate features (the head's input) of ``paths``."""
    head = clf.model.get_submodule(clf.meta["head"])
    seen: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach().float().flatten(1)))
    logits = []
    try:
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([clf.uint8_image(p) for p in paths[start:start + batch_size]])
            logits.append(clf.logits(batch))
    finally:
        hook.remove()
    return torch.cat(logits), torch.cat(seen)


def split_paths(data: Path, split: str, limit: int | None = None) -> tuple[list[Path], list[str]]:
    """The images of ``data/split`` and their class names (the folder above each), up to ``limit``
    spread over the classes."""
    paths = sorted(image_paths([data / split]))
    if limit is not None and len(paths) > limit:
        step = len(paths) / limit
        paths = [paths[int(i * step)] for i in range(limit)]
    return paths, [p.parent.name for p in paths]


def load(run: Path) -> LoadedClassifier:
    return load_classifier(run / "model.safetensors", mixed_precision="no")
