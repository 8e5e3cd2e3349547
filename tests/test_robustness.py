"""Kills, bad checkpoints, full disks and odd images: a run never loses a good file and never
runs code from one."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import re
import resource
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, ROOT, python_cmd, run_cmd, train_until_stopped, write_image_folder
from PIL import Image
from safetensors.torch import load_file, save_file

from finetune.commands import eval as eval_cmd
from finetune.commands import train
from finetune.errors import UserError
from finetune.models.checkpoint import read_metadata
from finetune.training.state import latest_state


class Payload:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def quiet_train(argv: list[str]) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return train.main(argv)


@pytest.mark.slow
def test_random_sigkills_resume_to_bit_identical_weights(tiny_data: Path, tmp_path: Path):
    args = ["--data", str(tiny_data), *FAST, "--epochs", "4", "--batch-size", "2", "--save-every", "1",
            "--num-workers", "1"]
    reference = load_file(str(quiet_train([*args, "--output-dir", str(tmp_path / "ref")]).run_dir
                              / "model.safetensors"))
    run = tmp_path / "run"
    rng = random.Random(20261128)
    kills = []
    for attempt in range(40):
        log = tmp_path / f"attempt{attempt}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(python_cmd("train.py", *args, "--output-dir", str(run), "--resume"), cwd=ROOT,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out,
                                    stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        # Wait until it has loaded its state: killing it during start-up every time would test little.
        while proc.poll() is None and time.monotonic() < deadline and not re.search(
                "resumed from|starting from the beginning", log.read_text()):
            time.sleep(0.01)
        # Anywhere in training, evaluation or saving; after six kills, let it finish.
        delay = rng.uniform(0.0, 1.0) if len(kills) < 6 else 300
        try:
            proc.wait(timeout=delay)
            break  # finished on its own
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            state = latest_state(run)
            kills.append(json.loads((state / "progress.json").read_text()) if state else None)
            if (run / "model.safetensors").exists():
                read_metadata(run / "model.safetensors")  # the last good checkpoint is always whole
    assert proc.returncode == 0, f"{kills} {proc.stderr.read()}"
    assert len(kills) >= 5, f"only {len(kills)} kills before the run finished"
    resumed = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def _checkpoint(tmp_path: Path, tiny_data: Path) -> Path:
    return quiet_train(["--data", str(tiny_data), "--output-dir", str(tmp_path / "good"), *FAST]).run_dir \
        / "model.safetensors"


@pytest.mark.parametrize("kind, message", [
    ("missing", "checkpoint not found"),
    ("truncated", "not a readable safetensors checkpoint"),
    ("random", "not a readable safetensors checkpoint"),
    ("pickle-renamed", "not a readable safetensors checkpoint"),
    ("pth-with-code", "not a readable safetensors checkpoint"),
    ("no-metadata", "without finetune metadata"),
    ("wrong-metadata", "lacks arch"),
    ("other-architecture", "does not fit a resnet18"),
    ("other-classes", "does not fit a mobilenet_v3_small with 5 classes"),
])
@pytest.mark.slow
def test_eval_refuses_checkpoints_from_anywhere(tiny_data: Path, tmp_path: Path, kind: str, message: str):
    marker = tmp_path / "code-ran"
    path = tmp_path / ("model.pth" if kind == "pth-with-code" else "model.safetensors")
    if kind in ("truncated", "other-architecture", "other-classes", "no-metadata", "wrong-metadata"):
        good = _checkpoint(tmp_path, tiny_data)
        tensors, meta = load_file(str(good)), read_metadata(good)
        if kind == "truncated":
            path.write_bytes(good.read_bytes()[:100_000])
        elif kind == "no-metadata":
            save_file(tensors, str(path))
        elif kind == "wrong-metadata":
            save_file(tensors, str(path), metadata={"finetune": json.dumps({"classes": ["a"]})})
        else:
            meta = {**meta, "arch": "resnet18"} if kind == "other-architecture" else \
                {**meta, "classes": [f"c{i}" for i in range(5)]}
            save_file(tensors, str(path), metadata={"finetune": json.dumps(meta)})
    elif kind == "random":
        path.write_bytes(os.urandom(50_000))
    elif kind == "pickle-renamed":
        path.write_bytes(pickle.dumps({"w": Payload(marker)}))
    elif kind == "pth-with-code":
        torch.save({"state_dict": Payload(marker)}, path)
    data = tiny_data / "test"
    if kind in ("other-classes",):
        data = write_image_folder(tmp_path / "five", {f"c{i}": 1 for i in range(5)})
    proc = run_cmd(python_cmd("eval.py", "--ckpt", str(path), "--data", str(data), "--num-workers", "0"))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize("kind, message", [
    ("model-random-bytes", "cannot resume from"),
    ("optimizer-with-code", "cannot resume from"),
    ("other-architecture", "--model changed (mobilenet_v3_small -> resnet18)"),
    ("progress-garbage", "cannot read"),
])
@pytest.mark.slow
def test_resume_refuses_bad_states_without_running_code(tiny_data: Path, tmp_path: Path, kind: str, message: str,
                                                        monkeypatch):
    run = tmp_path / "run"  # stopped after the first of two epochs
    train_until_stopped(["--data", str(tiny_data), "--output-dir", str(run), *FAST, "--epochs", "2"], monkeypatch, epoch=0)
    marker = tmp_path / "code-ran"
    args = ["--data", str(tiny_data), "--output-dir", str(run), *FAST, "--epochs", "2", "--resume"]
    if kind == "model-random-bytes":
        (run / "state" / "model.safetensors").write_bytes(os.urandom(10_000))
    elif kind == "optimizer-with-code":
        with open(run / "state" / "optimizer.bin", "wb") as f:
            pickle.dump({"state": Payload(marker)}, f)
    elif kind == "other-architecture":
        args = [*args, "--model", "resnet18"]
    elif kind == "progress-garbage":
        (run / "state" / "progress.json").write_text("{not json")
    proc = run_cmd(python_cmd("train.py", *args))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tiny_data: Path, tmp_path: Path, monkeypatch):
    import finetune.models.checkpoint as checkpoint

    run = tmp_path / "run"  # stopped after the first of two epochs
    train_until_stopped(["--data", str(tiny_data), "--output-dir", str(run), *FAST, "--epochs", "2"], monkeypatch, epoch=0)
    before = (run / "model.safetensors").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(UserError, match="cannot save .*model.safetensors: No space left on device; the previous"):
        quiet_train(["--data", str(tiny_data), "--output-dir", str(run), *FAST, "--epochs", "2", "--resume"])
    assert (run / "model.safetensors").read_bytes() == before
    assert not list(run.glob(".model.safetensors.*"))


@pytest.mark.slow
def test_file_size_limit_is_a_clear_error(tiny_data: Path, tmp_path: Path):
    # A real kernel-enforced write failure: files above 1 MB cannot be written (EFBIG).
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    run = tmp_path / "run"
    proc = subprocess.run(python_cmd("train.py", "--data", str(tiny_data), "--output-dir", str(run), *FAST),
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          preexec_fn=limit, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "cannot save" in proc.stderr and "File too large" in proc.stderr and "Traceback" not in proc.stderr
    assert not (run / "model.safetensors").exists() and not list(run.glob(".model.safetensors.*"))


def test_images_of_every_mode_and_unicode_class_names_round_trip(tmp_path: Path):
    data = tmp_path / "data"
    classes = ["café crème", "日本 猫", "with space"]
    gradient = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))
    rgb = np.stack([gradient, gradient[::-1], gradient.T], axis=-1)
    images = {
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"), "gray.png": Image.fromarray(gradient),
        "la.png": Image.fromarray(gradient).convert("LA"), "rgba.png": Image.fromarray(rgb).convert("RGBA"),
        "sixteen.png": Image.fromarray(gradient.astype(np.uint16) * 257), "UPPER.JPG": Image.fromarray(rgb),
        "palette.png": Image.fromarray(rgb).convert("P"),
    }
    for split in ("train", "test"):
        for c in classes:
            (data / split / c).mkdir(parents=True)
            for name, img in images.items():
                img.save(data / split / c / name)
            exif = Image.Exif()
            exif[0x0112] = 6  # rotated 90 degrees
            Image.fromarray(rgb).save(data / split / c / "rotated.jpg", exif=exif)
    result = quiet_train(["--data", str(data), "--output-dir", str(tmp_path / "run"), *FAST])
    ckpt = result.run_dir / "model.safetensors"
    assert read_metadata(ckpt)["classes"] == sorted(classes)
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = eval_cmd.main(["--ckpt", str(ckpt), "--data", str(data / "test"), "--num-workers", "0",
                                 "--output-dir", str(tmp_path / "eval")])
    assert metrics["num_samples"] == 24 and set(metrics["per_class"]) == set(classes)
    csv_text = (tmp_path / "eval" / "predictions.csv").read_text(encoding="utf-8")
    assert "日本 猫" in csv_text and "café crème" in csv_text


@pytest.mark.slow
def test_eval_reports_an_unwritable_output_folder_before_evaluating(tiny_data: Path, tmp_path: Path):
    ckpt = _checkpoint(tmp_path, tiny_data)
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    proc = run_cmd(python_cmd("eval.py", "--ckpt", str(ckpt), "--data", str(tiny_data / "test"),
                              "--output-dir", str(blocked / "eval")))
    assert proc.returncode == 2 and "cannot write to output folder" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_run_files_are_readable_by_others_and_paths_with_brackets_print_literally(tmp_path: Path):
    data = tmp_path / "data[/draft]"
    write_image_folder(data / "train", {"a": 3, "b": 3})
    write_image_folder(data / "test", {"a": 1, "b": 1})
    run = tmp_path / "run"
    proc = run_cmd(python_cmd("train.py", "--data", str(data), "--output-dir", str(run), *FAST))
    assert proc.returncode == 0, proc.stderr
    assert "data[/draft]" in proc.stdout
    for name in ("model.safetensors", "config.yaml"):
        assert (run / name).stat().st_mode & 0o044 == 0o044  # group and others may read


def test_bad_eval_flags_are_one_line(tmp_path: Path):
    proc = run_cmd(python_cmd("eval.py", "--ckpt", "x", "--data", "y", "--batch-size", "0"))
    assert proc.returncode == 2 and "--batch-size must be at least 1" in proc.stderr and "Traceback" not in proc.stderr
