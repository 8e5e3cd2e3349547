"""SIGTERM/SIGUSR1 mid-epoch: the run saves its state, exits 143, and resumes to the same weights."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, python_cmd
from safetensors.torch import load_file

from finetune.commands import train

pytestmark = pytest.mark.slow  # runs stopped by signals and resumed


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_state_and_resume_matches_uninterrupted(tiny_data: Path, tmp_path: Path, sig):
    args = ["--data", str(tiny_data), *FAST, "--epochs", "3", "--batch-size", "2"]
    run = tmp_path / "run"
    proc = subprocess.Popen(python_cmd("train.py", *args, "--output-dir", str(run)), cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # into the second epoch (18 steps each)
        if line.startswith("epoch 1 "):
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert f"stopped by {signal.Signals(sig).name}" in err and "--resume" in err and "Traceback" not in err
    progress = json.loads((run / "state" / "progress.json").read_text())
    assert (1, 0) <= (progress["epoch"], progress["step"]) < (3, 0)  # in or right after epoch 1

    with contextlib.redirect_stdout(io.StringIO()):
        resumed = train.main([*args, "--output-dir", str(run), "--resume"])
        reference = train.main([*args, "--output-dir", str(tmp_path / "ref")])
    a = load_file(str(reference.run_dir / "model.safetensors"))
    b = load_file(str(resumed.run_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
