"""The point of the tool: real ImageNet weights fine-tuned beat training from scratch, with the
default recipe, on data nobody tuned it for."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from finetune.commands import train
from finetune.data.demo import demo_dataset
from finetune.data.fashion import FASHION_DIR, fashion_mnist

pytestmark = pytest.mark.slow  # real fine-tuning runs to an accuracy


def final_accuracy(argv: list[str]) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        return train.main(argv).history[-1]["test_acc"]


def test_pretrained_beats_scratch_on_the_demo_by_a_wide_margin(tmp_path: Path):
    budget = ["--image-size", "64", "--epochs", "5", "--seed", "0"]
    data = str(demo_dataset(tmp_path / "lfw"))
    pretrained = final_accuracy(["--data", data, *budget, "--output-dir", str(tmp_path / "ft")])
    scratch = final_accuracy(["--data", data, *budget, "--weights", "none", "--output-dir", str(tmp_path / "sc")])
    assert pretrained >= 0.95
    # Measured here: 0.967 against 0.850. Faces against scenery at 25 px is an easy task: with
    # no augmentation of such small images and BatchNorm measured on what the network trained on
    # (the defaults since the 3-seed sweep), scratch no longer sits near chance as it did before.
    assert pretrained - scratch >= 0.1, (pretrained, scratch)


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="apt package dataset-fashion-mnist is not installed")
def test_defaults_work_on_small_upscaled_images(tmp_path: Path):
    data = fashion_mnist(tmp_path / "fashion", n_train=500, n_test=200)
    accuracy = final_accuracy(["--data", str(data), "--image-size", "32", "--output-dir", str(tmp_path / "run")])
    # 10 classes, chance 0.1. Measured here: defaults 0.64; the classic --lr 0.01 (head 0.1) gives 0.145.
    assert accuracy >= 0.5
