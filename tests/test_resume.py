"""--resume continues the same run or says why not: a changed process count with the same global
batch continues exactly; any other change is refused naming it; a finished run says so."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, free_port, run_cmd, train_until_stopped, write_image_folder
from safetensors.torch import load_file

from finetune.commands import train
from finetune.errors import UserError
from finetune.models.calibration import OOD_SIDECAR
from finetune.models.checkpoint import load_checkpoint, read_metadata, save_checkpoint, sidecar

ARGS = [*FAST, "--epochs", "2", "--batch-size", "4"]  # 36 train images: 9 steps an epoch


def quiet_train(argv: list[str]) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return train.main(argv)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> tuple[Path, Path]:
    """A run of 2 epochs stopped at step 3 of its second epoch, and its data."""
    root = tmp_path_factory.mktemp("resume")
    data = root / "data"
    write_image_folder(data / "train", {"cat": 12, "dog": 12, "hot dog": 12}, seed=0)
    write_image_folder(data / "test", {"cat": 5, "dog": 5, "hot dog": 5}, seed=1)
    run = root / "run"
    with pytest.MonkeyPatch.context() as patch:
        train_until_stopped(["--data", str(data), "--output-dir", str(run), *ARGS], patch, optimizer_step=12)
    progress = json.loads((run / "state" / "progress.json").read_text())
    assert (progress["epoch"], progress["step"], progress["samples"]) == (1, 3, 12)
    assert progress["setup"]["processes"] == 1 and progress["setup"]["batch_size"] == 4
    return run, data


def copy_of(stopped_run, tmp_path: Path) -> tuple[Path, Path]:
    run, data = stopped_run
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", data


@pytest.mark.parametrize("change, message", [
    (["--batch-size", "2"], r"the global batch changed \(4 = 1 process\(es\) x 4 x 1 accumulation step\(s\) -> "
                            r"2 = 1 process\(es\) x 2 x 1 .*keep processes x --batch-size x --grad-accum-steps at 4"),
    (["--epochs", "3"], r"--epochs changed \(2 -> 3\)"),
    (["--model", "resnet18"], r"--model changed \(mobilenet_v3_small -> resnet18\)"),
    # AdamW's rate at the 32 px crops of these runs (recipe.SMALL_CROP_ADAMW_LR), changed to 0.01:
    (["--lr", "0.01", "--seed", "1"], r"--lr changed \(0.001 -> 0.01\); --seed changed \(0 -> 1\)"),
    (["--data", "OTHER"], r"the data changed"),
    (["--data", "FEWER"], r"the classes changed \(3: cat, dog, hot dog -> 2: cat, dog\)"),
])
def test_a_changed_run_is_refused_naming_the_change(stopped_run, tmp_path: Path, change: list[str], message: str):
    run, data = copy_of(stopped_run, tmp_path)
    if "OTHER" in change:  # same classes and counts, other files
        change = ["--data", str(write_image_folder(tmp_path / "other" / "train", {"cat": 12, "dog": 12, "hot dog": 12},
                                                   seed=3, ext=".jpg").parent)]
        shutil.copytree(data / "test", tmp_path / "other" / "test")
    if "FEWER" in change:
        shutil.copytree(data, tmp_path / "fewer")
        for split in ("train", "test"):
            shutil.rmtree(tmp_path / "fewer" / split / "hot dog")
        change = ["--data", str(tmp_path / "fewer")]
    config_before = (run / "config.yaml").read_bytes()
    state_before = sorted((p.name, p.stat().st_mtime_ns) for p in (run / "state").iterdir())
    with pytest.raises(UserError, match=message) as err:
        quiet_train(["--data", str(data), "--output-dir", str(run), *ARGS, *change, "--resume"])
    text = str(err.value)
    assert text.startswith(f"cannot resume the run in {run}: ") and "\n" not in text
    assert f"--config {run / 'config.yaml'} --resume" in text and "start afresh in another --output-dir" in text
    # Nothing of the run was touched: not its settings, not its state.
    assert (run / "config.yaml").read_bytes() == config_before
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (run / "state").iterdir()) == state_before


def test_a_moved_data_folder_and_other_loader_settings_resume(stopped_run, tmp_path: Path):
    run, data = copy_of(stopped_run, tmp_path)
    moved = shutil.copytree(data, tmp_path / "moved")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        train.main(["--data", str(moved), "--output-dir", str(run), *ARGS, "--threads", "1", "--resume"])
    assert "resumed from" in out.getvalue() and "at epoch 2, step 3" in out.getvalue()
    assert json.loads((run / "state" / "progress.json").read_text())["epoch"] == 2


def test_a_finished_run_says_so_and_changes_nothing(tmp_path: Path, tiny_data: Path):
    run = tmp_path / "run"
    args = ["--data", str(tiny_data), "--output-dir", str(run), *FAST]
    quiet_train(args)
    # Nothing continues a finished run (a resume may not add epochs): no weights or optimizer in its state.
    assert [p.name for p in (run / "state").iterdir()] == ["progress.json"]
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = train.main([*args, "--resume"])
    assert result.finished
    assert f"the run in {run} is finished (1 epochs" in out.getvalue() and "python eval.py --ckpt" in out.getvalue()
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


@pytest.mark.parametrize("left", ["no fit", "no OOD file"])
def test_resuming_a_finished_run_fits_the_calibration_a_kill_interrupted(tmp_path: Path, tiny_data: Path, left: str):
    run = tmp_path / "run"
    args = ["--data", str(tiny_data), "--output-dir", str(run), *FAST]
    quiet_train(args)
    for name in ("model.safetensors", "best.safetensors"):  # as a kill during the calibration leaves them
        if left == "no fit":
            state, meta = load_checkpoint(run / name)
            save_checkpoint(run / name, state, {k: v for k, v in meta.items() if k not in ("ood", "calibration")})
        sidecar(run / name, OOD_SIDECAR).unlink(missing_ok=True)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = train.main([*args, "--resume"])
    assert result.finished and "is finished" in out.getvalue()
    for name in ("model.safetensors", "best.safetensors"):
        assert read_metadata(run / name)["ood"]["fitted_on"] == "train"
        assert sidecar(run / name, OOD_SIDECAR).is_file()
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    train.main([*args, "--resume"])  # nothing missing now: nothing written
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_a_checkpoint_left_uncalibrated_beside_a_calibrated_one_of_its_epoch_becomes_its_second_name(
        tmp_path: Path, tiny_data: Path, monkeypatch):
    import finetune.training.calibrate as calibrate

    run = tmp_path / "run"
    args = ["--data", str(tiny_data), "--output-dir", str(run), *FAST]
    quiet_train(args)
    state, meta = load_checkpoint(run / "best.safetensors")  # killed after model.safetensors was calibrated
    save_checkpoint(run / "best.safetensors", state, {k: v for k, v in meta.items() if k not in ("ood", "calibration")})
    sidecar(run / "best.safetensors", OOD_SIDECAR).unlink()
    monkeypatch.setattr(calibrate, "_fit", lambda *a, **k: pytest.fail("fitted again"))
    quiet_train([*args, "--resume"])
    for first, second in ((run / "model.safetensors", run / "best.safetensors"),
                          (sidecar(run / "model.safetensors", OOD_SIDECAR), sidecar(run / "best.safetensors", OOD_SIDECAR))):
        assert first.stat().st_ino == second.stat().st_ino


def test_the_same_global_batch_on_fewer_processes_continues_at_the_same_image(stopped_run, tmp_path: Path):
    # 1 process x 4 images stopped after 12 images of epoch 2; resumed as 1 x 2 x 2 accumulation
    # steps, the epoch continues at batch 6 of 2 images.
    run, data = copy_of(stopped_run, tmp_path)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        train.main(["--data", str(data), "--output-dir", str(run), *ARGS, "--batch-size", "2",
                    "--grad-accum-steps", "2", "--resume"])
    assert "at epoch 2, step 6" in out.getvalue()


def launch(nproc: int, *args: str) -> list[str]:
    multi = ["--multi_gpu", "--main_process_port", str(free_port())] if nproc > 1 else []
    return [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]


@pytest.mark.slow
def test_two_processes_stopped_mid_epoch_resume_on_one_with_accumulation_to_the_same_weights(tmp_path: Path):
    """A 2-process run stopped by SIGTERM mid-epoch, resumed by 1 process with --grad-accum-steps 2
    (the same global batch), ends where an uninterrupted 2-process run ends, within float tolerance
    (the order of the gradient sums differs). A linear probe of ResNet-18: frozen BatchNorm and no
    dropout, which would differ per process (see test_process_count)."""
    data = tmp_path / "data"
    write_image_folder(data / "train", {"a": 16, "b": 16})
    write_image_folder(data / "test", {"a": 3, "b": 3}, seed=1)
    args = ["--data", str(data), "--model", "resnet18", "--weights", "none", "--freeze", "backbone",
            "--image-size", "32", "--epochs", "2", "--num-workers", "0", "--lr", "0.05", "--mixed-precision", "no"]
    env = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "ref"
    proc = run_cmd(launch(2, str(ROOT / "train.py"), *args, "--batch-size", "4", "--output-dir", str(reference)),
                   env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # SIGTERM to one process after optimizer step 6 of 8 (step 2 of epoch 2): both save and stop.
    run = tmp_path / "run"
    proc = run_cmd(launch(2, str(ROOT / "tests" / "signal_probe.py"), "step:6", "SIGTERM", "self",
                          *args, "--batch-size", "4", "--output-dir", str(run)), env=env, timeout=600)
    assert "stopped by SIGTERM at epoch 2, step 2" in proc.stderr, proc.stderr[-3000:]
    progress = json.loads((run / "state" / "progress.json").read_text())
    assert (progress["epoch"], progress["step"], progress["samples"]) == (1, 2, 16)
    proc = run_cmd(launch(1, str(ROOT / "train.py"), *args, "--batch-size", "4", "--grad-accum-steps", "2",
                          "--output-dir", str(run), "--resume"), env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at epoch 2, step 4" in proc.stdout and "1 process(es)" in proc.stdout
    a = load_file(str(reference / "model.safetensors"))
    b = load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    ref_history = json.loads((reference / "state" / "progress.json").read_text())["history"]
    history = json.loads((run / "state" / "progress.json").read_text())["history"]
    assert [r["train_loss"] for r in history] == pytest.approx([r["train_loss"] for r in ref_history], rel=1e-4)
