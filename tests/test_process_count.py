"""Results do not depend on the number of processes beyond floating-point reduction order.

1, 2 and 4 CPU processes with the same global batch see the same samples at every step (the
sampler's global order is sharded batch by batch). What still differs: the order of the
gradient all-reduce. Two things would differ more and are kept out of this test: BatchNorm
batch statistics, which are per process (SyncBatchNorm does not run on CPUs), and dropout
masks, drawn per process. So it trains a linear probe of ResNet-18 (frozen BatchNorm layers use
their running statistics; its head has no dropout).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import ROOT, free_port, run_cmd, write_image_folder

pytestmark = pytest.mark.slow  # runs of 1, 2 and 4 processes

GLOBAL_BATCH = 8
LOSS_RTOL = 1e-3  # per-epoch mean training loss, relative (fp32): all-reduce order only


def launch(nproc: int, *args: str) -> list[str]:
    multi = ["--multi_gpu", "--main_process_port", str(free_port())] if nproc > 1 else []
    return [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pc") / "data"
    write_image_folder(root / "train", {"a": 12, "b": 12})
    write_image_folder(root / "test", {"a": 7, "b": 6}, seed=1)  # 13: divisible by neither 2 nor 4
    return root


def test_loss_curve_and_eval_do_not_depend_on_process_count(data: Path, tmp_path: Path):
    env = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    curves, evals = {}, {}
    for nproc in (1, 2, 4):
        run = tmp_path / f"run{nproc}"
        proc = run_cmd(launch(nproc, str(ROOT / "train.py"), "--data", str(data), "--output-dir", str(run),
                              "--model", "resnet18", "--weights", "none", "--freeze", "backbone",
                              "--image-size", "32", "--epochs", "3", "--num-workers", "0", "--lr", "0.01",
                              "--batch-size", str(GLOBAL_BATCH // nproc), "--mixed-precision", "no"),
                       env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        history = json.loads((run / "state" / "progress.json").read_text())["history"]
        curves[nproc] = [row["train_loss"] for row in history]
        out = tmp_path / f"eval{nproc}"
        proc = run_cmd(launch(nproc, str(ROOT / "eval.py"), "--ckpt", str(tmp_path / "run1" / "model.safetensors"),
                              "--data", str(data / "test"), "--output-dir", str(out), "--batch-size", "3",
                              "--num-workers", "0", "--mixed-precision", "no"), env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        evals[nproc] = json.loads((out / "metrics.json").read_text())
    for nproc in (2, 4):
        assert curves[nproc] == pytest.approx(curves[1], rel=LOSS_RTOL), curves
        assert evals[nproc]["num_samples"] == 13
        assert evals[nproc]["accuracy"] == evals[1]["accuracy"]
        assert evals[nproc]["confusion_matrix"] == evals[1]["confusion_matrix"]
