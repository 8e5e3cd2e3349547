"""What a run leaves to look at, end to end: TensorBoard event files (read back with TensorBoard's
own reader), the PNG pictures, and progress lines in a piped log."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import FAST
from finetune import tracking
from finetune.commands import eval as eval_cmd
from finetune.commands import train
from finetune.engine import evaluate


def quiet(main, argv: list[str]):
    with contextlib.redirect_stdout(io.StringIO()):
        return main(argv)


def events(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir / tracking.PROJECT))
    acc.Reload()
    return acc


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.load()  # decodes the whole file
        assert img.format == "PNG"
        return img.size


@pytest.mark.slow
def test_eval_writes_the_confusion_matrix_and_the_mistakes(tiny_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    quiet(train.main, ["--data", str(tiny_data), "--output-dir", str(run), *FAST, "--log-with", "none", "--no-plots"])
    out = tmp_path / "eval"
    metrics = quiet(eval_cmd.main, ["--ckpt", str(run / "model.safetensors"), "--data", str(tiny_data),
                                    "--output-dir", str(out), "--num-workers", "0"])
    assert png_size(out / "confusion.png")[0] >= 350
    assert png_size(out / "mistakes.png")[0] >= 400
    logged = events(out / "logs")
    assert set(logged.Tags()["images"]) == {"eval/confusion", "eval/mistakes"}
    assert [(e.step, e.value) for e in logged.Scalars("eval/accuracy")] == [(0, pytest.approx(metrics["accuracy"]))]
    quiet(eval_cmd.main, ["--ckpt", str(run / "model.safetensors"), "--data", str(tiny_data), "--output-dir",
                          str(tmp_path / "plain"), "--num-workers", "0", "--no-plots", "--log-with", "none"])
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["metrics.json", "predictions.csv"]


def test_evaluate_reports_each_images_cross_entropy():
    accelerator_model = torch.nn.Linear(3, 4)
    images = torch.randn(10, 3)
    targets = torch.randint(0, 4, (10,))
    loader = [(images[:6], targets[:6], torch.arange(6)), (images[6:], targets[6:], torch.arange(6, 10))]
    from accelerate import Accelerator

    preds = evaluate(Accelerator(cpu=True), accelerator_model, loader, 4)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(accelerator_model(images), targets, reduction="none")
    assert torch.allclose(preds.loss, expected)
    assert preds.mean_loss == pytest.approx(expected.mean().item())
