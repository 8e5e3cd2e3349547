"""--bad-data during the run: an image that fails only when decoded follows the policy too."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from conftest import FAST, write_truncated_jpeg

from finetune.commands import train
from finetune.models.checkpoint import read_metadata
from finetune.training.session import inverse_frequency_weights


def test_images_that_fail_during_the_run_are_skipped_named_once_and_counted(tiny_data: Path, tmp_path: Path):
    """The header-only preflight passes a truncated JPEG; `--bad-data skip` used to stop on it anyway."""
    bad_train = write_truncated_jpeg(tiny_data / "train" / "cat" / "broken.jpg")
    bad_test = write_truncated_jpeg(tiny_data / "test" / "dog" / "broken.jpg")
    (tiny_data / "train" / "dog" / "empty.jpg").write_bytes(b"")  # found before the run: the header check
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = train.main(["--data", str(tiny_data), "--output-dir", str(tmp_path / "run"), *FAST,
                             "--epochs", "2", "--num-workers", "1", "--bad-data", "skip", "--class-weights", "auto",
                             "--log-with", "none", "--no-plots"])
    text = out.getvalue()
    assert sorted(result.skipped) == sorted([str(bad_train), str(bad_test)])
    for bad in (bad_train, bad_test):
        assert text.count(f"cannot decode image {bad}") == 1, text  # named once over both epochs
    assert text.count("empty.jpg") == 1, text
    assert "left out 1 image(s) found before the run and 2 this process could not decode during it" in text
    meta = read_metadata(result.run_dir / "model.safetensors")
    assert meta["metrics"]["num_test_samples"] == 15  # the broken test image is left out, not counted
    assert meta["config"]["class_weights"] == "auto"
    assert all("lr_backbone" in row for row in result.history)


def test_inverse_frequency_weights_balance_the_classes():
    weights = inverse_frequency_weights([0, 0, 0, 1, 2, 2], 3)
    assert torch.allclose(weights, torch.tensor([6 / 9, 6 / 3, 6 / 6]))
    counts = torch.tensor([3.0, 1.0, 2.0])
    assert torch.allclose(weights * counts, torch.full((3,), 2.0))  # every class weighs the same in total
