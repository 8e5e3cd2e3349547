"""Shared fixtures: tiny ImageFolder trees built in tmp_path, and helpers to run the commands."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]

# Two cores: one thread per process keeps multi-process tests from fighting over them.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def write_image_folder(root: Path, classes: dict[str, int], size: int = 16, seed: int = 0,
                       ext: str = ".png") -> Path:
    """Write ``count`` images per class; each class has its own colour so a network can learn it."""
    rng = np.random.default_rng(seed)
    for c, (name, count) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array([(c * 97) % 256, (c * 181 + 60) % 256, (c * 53 + 120) % 256], dtype=np.float64)
        for i in range(count):
            noise = rng.normal(0, 25, (size, size, 3))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}{ext}")
    return root


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """DATA/train and DATA/test, 3 classes, 16x16 colour images."""
    data = tmp_path / "data"
    write_image_folder(data / "train", {"cat": 12, "dog": 12, "hot dog": 12}, seed=0)
    write_image_folder(data / "test", {"cat": 5, "dog": 5, "hot dog": 5}, seed=1)
    return data


# Small, fast settings shared by the end-to-end runs (flags are the public contract).
FAST = ["--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--batch-size", "8",
        "--epochs", "1", "--num-workers", "0"]


def run_cmd(args: list[str], env: dict[str, str | None] | None = None, timeout: int = 300,
            cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run a command of the project as a user would, with a timeout."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None removes a variable
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def python_cmd(script: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / script), *args]


def write_truncated_jpeg(path: Path) -> Path:
    """A JPEG whose header is intact but whose scan data is cut: only a full decode fails."""
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:30000])
    return path


def write_checkpoint(path: Path, classes: list[str], model: str = "mobilenet_v3_small", image_size: int = 32,
                     seed: int = 0, weights: str = "none", **meta: object) -> Path:
    """A checkpoint as train.py writes it, for a model not fine-tuned (its new head random): fast to
    make. ``meta`` overrides metadata entries (e.g. ``interpolation="bicubic"``)."""
    import torch

    from finetune.config import TrainConfig
    from finetune.models.build import build_classifier, describe_checkpoint
    from finetune.models.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    clf = build_classifier(model, weights, classes, image_size=image_size)
    config = TrainConfig(model=model, weights=weights, image_size=image_size)
    description = describe_checkpoint(config, clf, classes, {})
    save_checkpoint(path, clf.net.state_dict(), {**description, **meta})
    return path


def free_port() -> int:
    """A TCP port nothing listens on now, for a launcher's rendezvous (fixed ports collide when
    tests run side by side)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_until_stopped(argv: list[str], monkeypatch: pytest.MonkeyPatch, *, optimizer_step: int | None = None,
                        epoch: int | None = None) -> None:
    """Run train.py's main in-process as if a stop signal came at optimizer step ``optimizer_step``
    of the run, or during the evaluation of ``epoch`` (from 0): it saves its state there and stops."""
    import contextlib
    import io

    import finetune.training.loop as loop
    from finetune.commands import train
    from finetune.errors import Stopped

    with monkeypatch.context() as patch:
        patch.setattr(loop, "stop_agreed", lambda _, step: step == optimizer_step)
        patch.setattr(loop, "stop_agreed_at_epoch_end", lambda _, done: done == epoch)
        with pytest.raises(Stopped, match="--resume"), contextlib.redirect_stdout(io.StringIO()):
            train.main(argv)


def within_rounding(ours: torch.Tensor, reference: torch.Tensor, std: Sequence[float]) -> bool:
    """Whether two normalised images (C, H, W) are the same uint8 image but for at most 5% of the
    values (on noise, the worst case; about 0.1% on photos), each off by a level (two with bicubic's
    sharper filter): the eval preset's bilinear resize is torch's uint8 one, which rounds a few
    values the other way from Pillow's; bicubic resamples only the crop (Pillow's ``box``), whose
    float corners do the same."""
    import torch

    level = 1 / (255 * torch.tensor(std).view(-1, 1, 1))
    off = (ours - reference).abs() > level * 0.01
    return bool(((ours - reference).abs() <= level * 2.01).all()) and off.float().mean().item() <= 0.05
