"""What a run leaves to look at, end to end: TensorBoard event files (read back with TensorBoard's
own reader), the PNG pictures, and progress lines in a piped log."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, python_cmd, run_cmd
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_tracking import logged_hparams

from finetune.commands import eval as eval_cmd
from finetune.commands import train
from finetune.report import plots, tracking
from finetune.training.engine import evaluate


def quiet(main, argv: list[str]):
    with contextlib.redirect_stdout(io.StringIO()):
        return main(argv)


def events(log_dir: Path, run: str = tracking.PROJECT) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir / run))
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
    assert png_size(out / "reliability.png") == (500, 440)  # plots.RELIABILITY_SIZE at 100 dpi
    [tensorboard_run] = (out / "logs" / tracking.PROJECT).iterdir()  # each evaluation a run of its own
    logged = events(tensorboard_run.parent, tensorboard_run.name)
    assert set(logged.Tags()["images"]) == {"eval/confusion", "eval/mistakes", "eval/reliability"}
    assert [(e.step, e.value) for e in logged.Scalars("eval/accuracy")] == [(0, pytest.approx(metrics["accuracy"]))]
    quiet(eval_cmd.main, ["--ckpt", str(run / "model.safetensors"), "--data", str(tiny_data), "--output-dir",
                          str(tmp_path / "plain"), "--num-workers", "0", "--no-plots", "--log-with", "none"])
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["metrics.json", "predictions.csv"]


def scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


EPOCH_TAGS = ["epoch/test_accuracy", "epoch/test_loss", "epoch/train_accuracy", "epoch/train_loss"]


@pytest.mark.slow
def test_a_run_logs_its_curves_and_draws_its_pictures(tiny_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    # 36 images in batches of 4: 9 optimizer steps an epoch, a point every 2.
    history = quiet(train.main, ["--data", str(tiny_data), "--output-dir", str(run), *FAST, "--epochs", "2",
                                 "--batch-size", "4", "--log-every-steps", "2"]).history
    logged = events(run / "logs")
    assert sorted(logged.Tags()["scalars"]) == sorted(["train/loss", "train/images_per_s", "lr/backbone", "lr/head",
                                                       *EPOCH_TAGS])
    assert [step for step, _ in scalars(logged, "train/loss")] == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert [step for step, _ in scalars(logged, "lr/head")] == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    for tag, key in (("epoch/train_loss", "train_loss"), ("epoch/test_accuracy", "test_acc")):
        assert scalars(logged, tag) == [(9, pytest.approx(history[0][key])), (18, pytest.approx(history[1][key]))]
    assert [e.step for e in logged.Images("samples")] == [0]
    assert [e.step for e in logged.Images("curves")] == [9, 18]
    assert logged_hparams(run / "logs")["batch_size"] == 4  # in the run itself: no second run beside it
    assert [p.name for p in (run / "logs").iterdir()] == [tracking.PROJECT]
    assert all(p.is_file() for p in (run / "logs" / tracking.PROJECT).iterdir())
    # 3 classes, 6 images each, as loaded and augmented; two panels of curves.
    cell_h, cell_w = plots.SAMPLE_CELL
    assert png_size(run / "samples.png") == (160 + 6 * cell_w, 40 + 2 * 3 * cell_h + 10)
    assert png_size(run / "curves.png") == (750, 300)
    timings = json.loads((run / "timings.json").read_text())  # where the wall clock went
    assert 0 < timings["since_process_start"]["first_step"] < timings["since_process_start"]["end"]
    assert {"train", "test", "saving", "logging", "calibration"} <= set(timings["seconds"])
    assert 0 < sum(timings["seconds"].values()) < timings["since_process_start"]["end"]


@pytest.mark.slow
def test_no_plots_and_no_tracker_leave_no_logs(tiny_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    quiet(train.main, ["--data", str(tiny_data), "--output-dir", str(run), *FAST, "--log-with", "none", "--no-plots"])
    assert not (run / "logs").exists() and not list(run.glob("*.png"))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_without_its_package_stops_before_anything_is_written(tiny_data: Path, tmp_path: Path):
    proc = run_cmd(python_cmd("train.py", "--data", str(tiny_data), "--output-dir", str(tmp_path / "run"), *FAST,
                              "--log-with", "wandb"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --log-with wandb needs the 'wandb' package: pip install wandb "
                                   "(or --log-with none)")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_piped_run_prints_progress_lines_at_the_set_cadence(tiny_data: Path, tmp_path: Path):
    args = ["--data", str(tiny_data), *FAST, "--batch-size", "4", "--log-with", "none", "--no-plots"]
    every_step = run_cmd(python_cmd("train.py", *args, "--output-dir", str(tmp_path / "a"), "--log-every-seconds", "0"))
    assert every_step.returncode == 0, every_step.stderr
    lines = [line for line in every_step.stdout.splitlines() if line.startswith("epoch 1/1  step ")]
    assert [line.split()[3] for line in lines] == [f"{k}/9" for k in range(1, 10)]
    assert all(" loss " in line and " img/s  ETA " in line for line in lines)
    never = run_cmd(python_cmd("train.py", *args, "--output-dir", str(tmp_path / "b"), "--log-every-seconds", "3600"))
    assert never.returncode == 0 and "  step " not in never.stdout
    assert "epoch 1  train_loss" in never.stdout  # the epoch's own line stays


@pytest.mark.slow
def test_a_killed_and_resumed_run_has_the_uninterrupted_curves(tiny_data: Path, tmp_path: Path):
    """Killed in its second epoch, the run had written points past its last state (the end of the
    first epoch); TensorBoard hides them and the resumed run writes them again: each step once,
    with an uninterrupted run's values (CPU runs are exact)."""
    args = ["--data", str(tiny_data), *FAST, "--epochs", "2", "--batch-size", "2", "--log-every-steps", "1",
            "--no-plots"]  # 18 optimizer steps an epoch
    quiet(train.main, [*args, "--output-dir", str(tmp_path / "ref")])
    run = tmp_path / "run"
    proc = subprocess.Popen(python_cmd("train.py", *args, "--output-dir", str(run)), cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            if (json.loads((run / "state" / "progress.json").read_text())["epoch"] == 1
                    and max(step for step, _ in scalars(events(run / "logs"), "train/loss")) > 18):
                break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert max(step for step, _ in scalars(events(run / "logs"), "train/loss")) > 18
    quiet(train.main, [*args, "--output-dir", str(run), "--resume"])
    reference, resumed = events(tmp_path / "ref" / "logs"), events(run / "logs")
    assert scalars(resumed, "train/loss") == scalars(reference, "train/loss")
    assert [step for step, _ in scalars(resumed, "train/loss")] == list(range(1, 37))
    for tag in ["lr/backbone", *EPOCH_TAGS]:
        assert scalars(resumed, tag) == scalars(reference, tag), tag


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
