"""Several CPU processes on gloo: weights agree across processes, eval counts each image once."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, free_port, run_cmd, write_image_folder
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # several processes launched through accelerate and torchrun

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port"]
CPU_ENV = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def odd_data(tmp_path: Path) -> Path:
    """A test split of 13 images: not divisible by 2 processes or by the batch size."""
    data = tmp_path / "data"
    write_image_folder(data / "train", {"a": 10, "b": 10})
    write_image_folder(data / "test", {"a": 7, "b": 6}, seed=1)
    return data


def test_two_process_training_and_exact_eval(odd_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    proc = run_cmd([*ACCELERATE, str(free_port()), str(ROOT / "tests" / "ddp_probe.py"), str(run), "--data", str(odd_data),
                    "--output-dir", str(run), *FAST, "--batch-size", "4", "--epochs", "2"], env=CPU_ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stdout
    w0, w1 = (load_file(str(run / f"weights-rank{r}.safetensors")) for r in (0, 1))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)

    out2, out1 = tmp_path / "eval2", tmp_path / "eval1"
    eval_args = [str(ROOT / "eval.py"), "--ckpt", str(run / "model.safetensors"), "--data", str(odd_data / "test"),
                 "--batch-size", "4", "--num-workers", "0"]
    proc = run_cmd([*ACCELERATE, str(free_port()), *eval_args, "--output-dir", str(out2)], env=CPU_ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cmd([sys.executable, *eval_args, "--output-dir", str(out1)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    m2, m1 = (json.loads((o / "metrics.json").read_text()) for o in (out2, out1))
    assert m2["num_samples"] == m1["num_samples"] == 13
    assert m2["accuracy"] == m1["accuracy"] and m2["confusion_matrix"] == m1["confusion_matrix"]
    paths = [line.split(",")[0] for line in (out2 / "predictions.csv").read_text().splitlines()[1:]]
    assert len(paths) == len(set(paths)) == 13


def test_processes_join_on_cpu_without_accelerate_use_cpu(odd_data: Path, tmp_path: Path):
    # Plain `accelerate launch --multi_gpu` on a machine without GPUs would start processes that
    # each train alone on all the data; train.py asks Accelerate for the CPU itself, so they join.
    proc = run_cmd([*ACCELERATE, str(free_port()), str(ROOT / "train.py"), "--data", str(odd_data), "--output-dir",
                    str(tmp_path / "run"), *FAST], env={"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": None},
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stdout


def test_torchrun_runs_the_same_script(odd_data: Path, tmp_path: Path):
    proc = run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(ROOT / "train.py"), "--data", str(odd_data), "--output-dir", str(tmp_path / "run"), *FAST],
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stdout and (tmp_path / "run" / "model.safetensors").is_file()
