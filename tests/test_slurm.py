"""slurm/finetune.sh on a real SLURM cluster: two emulated nodes on this host (tests/slurm_cluster.sh).

Needs root and Debian's slurm-wlm and munge packages (scripts/test.sh installs them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, python_cmd, run_cmd, write_image_folder, write_truncated_jpeg
from safetensors.torch import load_file

CLUSTER = ROOT / "tests" / "slurm_cluster.sh"
# One thread each: the emulated nodes share this host's two cores.
TRAIN_FLAGS = ["--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--num-workers", "0",
               "--threads", "1"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("apt-get") and not shutil.which("sbatch"),
                                 reason="a one-host SLURM cluster needs root and Debian packages")]


@pytest.fixture(scope="module")
def cluster():
    # Each node also offers 2 GPUs as SLURM sees them (no CUDA device): GPU jobs get their CPUs and
    # SLURM_GPUS_ON_NODE, and train.py then refuses to fall back to the CPU.
    up = subprocess.run(["bash", str(CLUSTER), "up", "2"], capture_output=True, text=True, timeout=300,
                        env={**os.environ, "GPUS_PER_NODE": "2"})
    if up.returncode != 0:
        pytest.fail(f"SLURM cluster did not come up: {up.stderr[-2000:]}")
    yield
    subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def slurm_data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("slurm") / "data"
    write_image_folder(data / "train", {"a": 10, "b": 10})
    write_image_folder(data / "test", {"a": 7, "b": 6}, seed=1)
    return data


def sbatch(out_dir: Path, *train_args: str, env: dict[str, str] | None = None, options: tuple[str, ...] = (),
           script: str = "finetune.sh") -> int:
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=2", f"--output={out_dir}/slurm-%j.out",
                           f"--chdir={ROOT}", *options, str(ROOT / "slurm" / script), *train_args],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().split(";")[0])


def job_info(job: int) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job)], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(job: int, timeout: float, until=lambda info: info.get("JobState") not in
             ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "SUSPENDED")) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job)
        if until(info):
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", str(job)])
    pytest.fail(f"job {job} did not finish in {timeout} s: {job_info(job)}")


def log_of(out_dir: Path, job: int) -> str:
    return (out_dir / f"slurm-{job}.out").read_text(errors="replace")


def test_two_node_job_of_four_processes_trains_evaluates_and_every_process_takes_part(cluster, slurm_data: Path, tmp_path: Path):
    # Two CPU processes on each of the two nodes: four ranks in one gloo group.
    job = sbatch(tmp_path, "--data", str(slurm_data), *TRAIN_FLAGS, "--epochs", "2", "--batch-size", "2",
                 "--output-dir", str(tmp_path / "run"), env={"NPROC_PER_NODE": "2"})
    info = wait_for(job, 300)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "node 0 (" in log and "node 1 (" in log and "starting 2 process(es)" in log
    assert "4 process(es) on cpu" in log
    assert (tmp_path / "run" / "model.safetensors").is_file()
    proc = run_cmd(python_cmd("eval.py", "--ckpt", str(tmp_path / "run" / "model.safetensors"), "--data",
                              str(slurm_data / "test"), "--output-dir", str(tmp_path / "eval"), "--num-workers", "0"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_samples"] == 13


def test_preempted_job_saves_on_usr1_requeues_resumes_and_ends_with_the_same_weights(cluster, slurm_data: Path,
                                                                                    tmp_path: Path):
    # Long enough (8 epochs of 5 steps) that the signal lands mid-training.
    args = ["--data", str(slurm_data), *TRAIN_FLAGS, "--epochs", "8", "--batch-size", "2", "--image-size", "64"]
    reference = sbatch(tmp_path, *args, "--output-dir", str(tmp_path / "ref"))
    assert wait_for(reference, 300)["JobState"] == "COMPLETED", log_of(tmp_path, reference)[-3000:]

    # The run folder named in --config, not on the command line: the script leaves it to train.py.
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\n")
    job = sbatch(tmp_path, *args, "--config", str(config))
    wait_for(job, 300, until=lambda _: re.search(r"^epoch 1 ", log_of(tmp_path, job) if
                                                (tmp_path / f"slurm-{job}.out").exists() else "", re.M))
    # The warning signal SLURM sends before the time limit (--signal=B:USR1@120), sent now: mid-training.
    sent = time.time()
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], check=True)
    wait_for(job, 120, until=lambda _: "stopped by SIGUSR1" in log_of(tmp_path, job))
    saved_after = (tmp_path / "run" / "state" / "progress.json").stat().st_mtime - sent
    print(f"USR1 to a saved state: {saved_after:.1f} s")
    assert 0 < saved_after < 30  # SLURM's default KillWait: the time a job gets after SIGTERM
    wait_for(job, 120, until=lambda info: info.get("Restarts") == "1" and info.get("JobState") == "PENDING")
    # SLURM holds a requeued job for a while before it may start again; release it now. Not within
    # the second of the requeue: slurmd revokes the job's old credential with a one-second clock and
    # refuses a launch in that second ("Job credential revoked"), failing the job.
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    info = wait_for(job, 300)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "got USR1, asking the run to save and stop" in log and "the run has stopped" in log
    assert "(restart 1)" in log and "resumed from" in log
    assert "Traceback" not in log.split("(restart 1)")[1]  # the resumed run ends cleanly
    assert not list(ROOT.glob(f"runs/*-{job}"))  # no folder of the script's own making
    a = load_file(str(tmp_path / "ref" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_default_run_folder_is_named_after_the_job(cluster, slurm_data: Path, tmp_path: Path):
    job = sbatch(tmp_path, "--data", str(slurm_data), *TRAIN_FLAGS, "--epochs", "1", "--batch-size", "4")
    info = wait_for(job, 300)
    run = ROOT / "runs" / f"mobilenet_v3_small-data-{job}"
    try:
        assert info["JobState"] == "COMPLETED", log_of(tmp_path, job)[-3000:]
        assert (run / "model.safetensors").is_file()
    finally:
        shutil.rmtree(run, ignore_errors=True)


def test_a_study_runs_as_a_slurm_job(cluster, slurm_data: Path, tmp_path: Path):
    out = tmp_path / "study"
    job = sbatch(tmp_path, "--data", str(slurm_data), "--model", "mobilenet_v3_small", "--weights", "none",
                 "--image-size", "32", "--num-workers", "0", "--epochs", "1", "--batch-size", "4",
                 "--strategies", "finetune,freeze-half", "--output-dir", str(out),
                 env={"FINETUNE_SCRIPT": "study.py", "NPROC_PER_NODE": "1"})
    info = wait_for(job, 300)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "2 process(es) on cpu" in log  # one per node, one group
    records = json.loads((out / "study.json").read_text())["strategies"]
    assert [r["strategy"] for r in records] == ["finetune", "freeze-half"]
    assert (out / "report.md").is_file()


def test_a_crash_in_one_process_ends_the_whole_job_quickly(cluster, slurm_data: Path, tmp_path: Path):
    data = tmp_path / "data"
    shutil.copytree(slurm_data, data)
    # Only the process whose batch holds it decodes it; the quick preflight passes it.
    bad = write_truncated_jpeg(data / "train" / "b" / "corrupt.jpg")
    start = time.monotonic()
    job = sbatch(tmp_path, "--data", str(data), *TRAIN_FLAGS, "--epochs", "50", "--batch-size", "2",
                 "--output-dir", str(tmp_path / "run"))
    info = wait_for(job, 180)
    elapsed = time.monotonic() - start
    log = log_of(tmp_path, job)
    assert info["JobState"] == "FAILED", log[-3000:]
    assert f"cannot decode image {bad}" in log
    assert elapsed < 90, f"the job took {elapsed:.0f} s to fail"  # start-up included; 50 epochs would take longer


def test_gpu_job_gets_its_cpus_and_memory_warns_below_4_cores_and_does_not_fall_back_to_the_cpu(
        cluster, slurm_data: Path, tmp_path: Path):
    """GPU jobs on the emulated nodes (2 CPUs each, GPUs without CUDA): what each task was given,
    the warning naming the sbatch option, then train.py's refusal to train on the CPU."""
    args = ["--data", str(slurm_data), *TRAIN_FLAGS, "--output-dir", str(tmp_path / "run")]
    plain = sbatch(tmp_path, *args, options=("--gpus-per-node=1", "--cpus-per-gpu=1", "--mem-per-gpu=200M"))
    # finetune_gpu.sh's defaults (8 CPUs, 64 GB per GPU) do not fit these nodes: override them.
    gpu = sbatch(tmp_path, *args, options=("--gpus-per-node=2", "--cpus-per-gpu=1", "--mem-per-gpu=300M"),
                 script="finetune_gpu.sh")
    for job, cpus, gpus, mem in ((plain, 1, 1, 200), (gpu, 2, 2, 600)):
        info = wait_for(job, 180)
        log = log_of(tmp_path, job)
        assert info["JobState"] == "FAILED", log[-3000:]
        for node in (0, 1):
            assert re.search(rf"node {node} \(\S+\): {cpus} CPUs, {gpus} GPU\(s\), {mem} MB; starting {gpus} process", log), log
        assert f"warning: {cpus} CPUs per node for {gpus} GPU process(es): fewer than 4 cores each" in log
        assert "--cpus-per-gpu=8" in log
        assert f"error: GPUs are visible (SLURM_GPUS_ON_NODE={gpus}) but CUDA cannot start" in log
        assert not (tmp_path / "run" / "model.safetensors").exists()

