"""SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 at any moment (start-up, training, evaluation, saving), to
the process, to its whole process group (its loader workers too) or to the launcher: a clean
stop, with the state saved where there is something to save, exit 143 and no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, ROOT, free_port, write_image_folder

PROBE = str(ROOT / "tests" / "signal_probe.py")
ARGS = [*FAST, "--epochs", "2", "--batch-size", "4"]  # 36 train images: 9 steps an epoch


def probe(when: str, sig: str, target: str, *args: str, launch: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run tests/signal_probe.py in a process group of its own (so that ``group`` signals it and its
    loader workers, and nothing of pytest)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    return subprocess.run([*(launch or [sys.executable]), PROBE, when, sig, target, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, start_new_session=True)


def saved_position(run: Path) -> tuple[int, int] | None:
    progress = run / "state" / "progress.json"
    if not progress.exists():
        return None
    raw = json.loads(progress.read_text())
    return raw["epoch"], raw["step"]


SLOW = pytest.mark.slow  # one case stays in the quick check


@pytest.mark.parametrize("when, sig, target, position", [
    pytest.param("startup", "SIGTERM", "self", None, marks=SLOW),  # nothing to save yet
    pytest.param("startup", "SIGINT", "group", None, marks=SLOW),
    ("step:3", "SIGINT", "group", (0, 3)),  # Ctrl-C in a terminal: the process and its workers
    pytest.param("step:3", "SIGUSR1", "self", (0, 3), marks=SLOW),
    pytest.param("eval", "SIGTERM", "group", (1, 0), marks=SLOW),  # during the first evaluation: it ends, saves, stops
    pytest.param("save", "SIGUSR1", "group", (1, 0), marks=SLOW),  # during the first save: it completes, then stops
])
def test_a_signal_at_any_moment_stops_cleanly(tiny_data: Path, tmp_path: Path, when: str, sig: str, target: str,
                                              position: tuple[int, int] | None):
    run = tmp_path / "run"
    proc = probe(when, sig, target, "--data", str(tiny_data), *ARGS, "--num-workers", "1", "--output-dir", str(run))
    assert f"probe: sending {sig} to {target} at {when}" in proc.stderr
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "killed by signal" not in proc.stderr, proc.stderr[-3000:]
    assert saved_position(run) == position
    last = proc.stderr.strip().splitlines()[-1]
    if position is None:
        assert last.startswith(f"stopped by {sig} while starting, before training: nothing new to save")
    else:  # says where it stopped and how to continue
        epoch, step = position
        assert last == (f"stopped by {sig} at epoch {epoch + 1}, step {step}; state saved in {run / 'state'}; "
                        "continue with the same command and --resume")


@pytest.mark.slow
def test_a_signal_to_the_launcher_during_evaluation_stops_every_process_cleanly(tmp_path: Path):
    """The launcher forwards SIGTERM to its processes; their loader workers, which used to die of it
    mid-evaluation and crash every rank, ignore it. finetune.commands.launch (Accelerate's launcher, framed)
    ends in one line and exit 143 where ``accelerate launch`` ends in torch's SignalException."""
    data = tmp_path / "data"
    write_image_folder(data / "train", {"a": 8, "b": 8})
    write_image_folder(data / "test", {"a": 20, "b": 20}, seed=1)
    run = tmp_path / "run"
    launch = [sys.executable, "-m", "finetune.commands.launch", "--multi_gpu", "--main_process_port", str(free_port()),
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = probe("eval", "SIGTERM", "launcher", "--data", str(data), *ARGS, "--batch-size", "2", "--num-workers", "1",
                 "--output-dir", str(run), launch=launch)
    assert proc.stderr.count(f"stopped by SIGTERM at epoch 2, step 0; state saved in {run / 'state'}") == 2, \
        proc.stderr[-3000:]
    assert "killed by signal" not in proc.stderr and "DataLoader worker" not in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 143
    assert proc.stderr.strip().splitlines()[-1] == "launcher: stopped by SIGTERM; each process said above what it saved"
    assert saved_position(run) == (1, 0) and (run / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_a_signal_to_a_one_process_launcher_reaches_the_run(tiny_data: Path, tmp_path: Path, sig: str):
    """Accelerate's one-process launcher forwards nothing: a SIGTERM to it alone used to leave the run
    training without it. finetune.commands.launch passes it on; the run saves, and both exit 143 in one line each."""
    run = tmp_path / "run"
    launch = [sys.executable, "-m", "finetune.commands.launch", "--num_processes", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    proc = probe("step:3", sig, "launcher", "--data", str(tiny_data), *ARGS, "--num-workers", "1",
                 "--output-dir", str(run), launch=launch)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    epoch, step = saved_position(run)  # the signal goes the long way round: a step or two later
    assert epoch == 0 and 3 <= step < 9
    lines = proc.stderr.strip().splitlines()
    assert len(lines) >= 2, proc.stderr[-3000:]
    assert lines[-2].startswith(f"stopped by {sig} at epoch 1, step {step}; state saved in {run / 'state'}")
    assert lines[-1] == f"launcher: stopped by {sig}; each process said above what it saved"


@pytest.mark.slow
def test_a_failing_process_is_named_in_one_line(tmp_path: Path):
    """A process that fails prints its own error; the launcher adds one line and its status, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "finetune.commands.launch", "--num_processes", "1", "--mixed_precision", "no",
                           "--dynamo_backend", "no", str(ROOT / "train.py"), "--data", str(tmp_path / "missing")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-2].startswith("error: ") and "missing" in lines[-2]
    assert lines[-1] == "launcher: process 0 exited with status 2; its own message is above"
