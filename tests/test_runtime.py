"""The run's device settings: mixed precision, threads, loader workers and pinned memory."""

import contextlib
import os
import types

import pytest
import torch
from accelerate.state import PartialState
from conftest import write_image_folder

from finetune.data import folders, presets
from finetune.data import loader as data
from finetune.errors import UserError
from finetune.utils import runtime


@pytest.mark.parametrize("fast_bf16, expected", [(True, "bf16"), (False, "no")])
def test_auto_precision_on_cpu_follows_bf16_units(monkeypatch, fast_bf16, expected):
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert runtime.resolve_precision("auto", on_cpu=True, env={}) == expected


def test_auto_precision_honours_accelerate_launch(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    assert runtime.resolve_precision("auto", on_cpu=True, env={"ACCELERATE_MIXED_PRECISION": "bf16"}) == "bf16"
    assert runtime.resolve_precision("auto", on_cpu=False, env={"ACCELERATE_MIXED_PRECISION": "fp16"}) == "fp16"
    # An explicit flag wins over the launcher.
    assert runtime.resolve_precision("no", on_cpu=True, env={"ACCELERATE_MIXED_PRECISION": "bf16"}) == "no"


def test_an_explicit_launcher_no_is_honoured(monkeypatch):
    """accelerate launch sets ACCELERATE_MIXED_PRECISION=no by default too: only its own flag means "asked"."""
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    env = {"ACCELERATE_MIXED_PRECISION": "no"}
    asked = [["python", "accelerate", "launch", "--mixed_precision", "no", "train.py", "--epochs", "1"],
             ["python", "-m", "accelerate.commands.launch", "--mixed_precision=no", "--num_processes", "2", "t.py"]]
    for launcher in asked:
        assert runtime.resolve_precision("auto", on_cpu=True, env=env, launcher=launcher) == "no"
    not_asked = [["python", "accelerate", "launch", "train.py"],  # the launcher's default
                 ["python", "accelerate", "launch", "train.py", "--mixed_precision", "no"],  # the script's argument
                 []]  # no readable parent
    for launcher in not_asked:
        assert runtime.resolve_precision("auto", on_cpu=True, env=env, launcher=launcher) == "bf16"
    assert runtime.resolve_precision("bf16", on_cpu=True, env=env, launcher=asked[0]) == "bf16"  # our flag wins


def test_launcher_command_is_the_parent_process():
    import psutil

    assert runtime.launcher_command() == psutil.Process(os.getppid()).cmdline()


def test_fp16_on_cpu_becomes_bf16_with_a_note(capsys):
    assert runtime.resolve_precision("fp16", on_cpu=True, env={}) == "bf16"
    assert "fp16 is not supported on the CPU" in capsys.readouterr().err


def test_precision_is_named_as_a_reader_names_it():
    assert [runtime.precision_name(p) for p in ("no", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]


def test_cores_are_shared_among_local_processes(monkeypatch):
    monkeypatch.setattr(runtime, "_cores", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert runtime.cores_per_process() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert runtime.cores_per_process() == 1


@pytest.mark.parametrize("gpu, cores, expected", [(False, 2, 2), (False, 32, 8), (True, 32, 16), (True, 16, 15), (True, 1, 1)])
def test_default_workers_match_cores_and_device(monkeypatch, gpu, cores, expected):
    monkeypatch.setattr(runtime, "_cores", lambda: cores)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert runtime.num_workers(-1, on_gpu=gpu) == expected
    assert runtime.num_workers(3, on_gpu=gpu) == 3
    assert runtime.num_workers(0, on_gpu=gpu) == 0


def test_loaders_pin_batches_only_when_asked(tmp_path):
    """Runs ask for pinned batches on CUDA devices only (session.py, eval.py, features.py)."""
    ds = folders.image_folder(write_image_folder(tmp_path / "train", {"a": 2, "b": 2}))
    pre = presets.Preprocessing(32, 36, (0.5,) * 3, (0.5,) * 3)
    for workers in (0, 2):
        assert not data.make_train_loader(ds, pre, batch_size=2, seed=0, num_workers=workers).pin_memory
        assert not data.make_eval_loader(ds, pre, batch_size=2, num_workers=workers).pin_memory
        assert data.make_train_loader(ds, pre, batch_size=2, seed=0, num_workers=workers, pin_memory=True).pin_memory
        assert data.make_eval_loader(ds, pre, batch_size=2, num_workers=workers, pin_memory=True).pin_memory


def test_set_cpu_threads_ignores_launchers_single_thread(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(runtime, "_cores", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    try:
        assert runtime.set_cpu_threads(-1) == 2
        assert torch.get_num_threads() == 2
        assert runtime.set_cpu_threads(1) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def environment(**changes):
    """Run with these environment variables (None: unset), then restore all of it: Accelerate
    writes RANK, WORLD_SIZE and others into os.environ while it starts."""
    saved = dict(os.environ)
    try:
        for key, value in changes.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_a_broken_launch_environment_is_one_line():
    PartialState._reset_state()  # read the environment afresh, as a new process does
    # As a launcher sets it, but without MASTER_ADDR.
    with environment(WORLD_SIZE="2", RANK="0", MASTER_ADDR=None), \
            pytest.raises(UserError, match="cannot set up the run's device and processes: .*MASTER_ADDR"):
        runtime.build_accelerator("no")
    # Nothing half-started stays behind.
    assert runtime.build_accelerator("no", cpu_threads=torch.get_num_threads()).num_processes == 1


def test_processes_that_did_not_join_one_group_are_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # launched as two, but this process runs alone
    monkeypatch.setattr(runtime, "Accelerator", lambda **kwargs: types.SimpleNamespace(num_processes=1, device=torch.device("cpu")))
    monkeypatch.setattr(runtime, "set_cpu_threads", lambda threads: threads)
    with pytest.raises(UserError, match="launched 2 processes but they did not form one group"):
        runtime.build_accelerator("no")


def test_cpu_accelerator_uses_blocking_copies():
    accelerator = runtime.build_accelerator("no", cpu_threads=torch.get_num_threads())
    assert accelerator.device.type == "cpu"
    assert accelerator.dataloader_config.non_blocking is False


@pytest.mark.parametrize("env, device_file, shown_by", [
    ({}, False, None),
    ({"CUDA_VISIBLE_DEVICES": ""}, False, None),  # GPUs hidden on purpose
    ({"CUDA_VISIBLE_DEVICES": "-1"}, False, None),
    ({"SLURM_GPUS_ON_NODE": "0"}, False, None),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, False, "CUDA_VISIBLE_DEVICES=0,1"),
    ({"SLURM_GPUS_ON_NODE": "8"}, False, "SLURM_GPUS_ON_NODE=8"),
    ({}, True, "nvidia0"),
])
def test_visible_gpus_reads_the_environment_and_device_files(tmp_path, env, device_file, shown_by):
    if device_file:
        (tmp_path / "nvidia0").touch()
    (tmp_path / "nvidiactl").touch()  # the control device alone is no GPU
    found = runtime.visible_gpus(env, dev=str(tmp_path))
    assert found == shown_by if shown_by is None or "=" in shown_by else found.endswith(shown_by)


def test_gpus_visible_without_cuda_stop_the_run_with_what_torch_said(monkeypatch):
    """A GPU host whose driver is older than the torch wheel needs: no silent CPU run."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")

    def init():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040).\nmore detail")
    monkeypatch.setattr(torch.cuda, "init", init)
    with pytest.raises(UserError) as err:
        runtime.check_gpus_usable(False, env={"SLURM_GPUS_ON_NODE": "4"}, dev="/nonexistent")
    message = str(err.value)
    assert "\n" not in message and "SLURM_GPUS_ON_NODE=4" in message
    assert "driver on your system is too old (found version 11040)" in message and "--cpu" in message
    runtime.check_gpus_usable(True, env={"SLURM_GPUS_ON_NODE": "4"}, dev="/nonexistent")  # --cpu: no error
    runtime.check_gpus_usable(False, env={}, dev="/nonexistent")  # no GPU anywhere: the CPU, quietly


def test_cpu_is_forced_by_the_flag_or_accelerate_launch():
    assert runtime.cpu_forced(True, env={})
    assert runtime.cpu_forced(False, env={"ACCELERATE_USE_CPU": "True"})  # launch/cpu.yaml, accelerate launch --cpu
    assert runtime.cpu_forced(False, env={"ACCELERATE_USE_CPU": "1"})  # slurm/finetune.sh on CPU nodes
    assert not runtime.cpu_forced(False, env={"ACCELERATE_USE_CPU": "false"})


@pytest.mark.slow
def test_train_and_eval_refuse_a_silent_cpu_run_where_slurm_granted_gpus(tiny_data, tmp_path):
    """This machine's torch has no CUDA: SLURM_GPUS_ON_NODE simulates a GPU node where CUDA fails."""
    from conftest import FAST, python_cmd, run_cmd
    env = {"SLURM_GPUS_ON_NODE": "2", "ACCELERATE_USE_CPU": None}
    proc = run_cmd(python_cmd("train.py", "--data", str(tiny_data), "--output-dir", str(tmp_path / "r"), *FAST), env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: GPUs are visible (SLURM_GPUS_ON_NODE=2) but CUDA cannot start")
    assert not (tmp_path / "r").exists()


def test_cpu_flag_builds_a_cpu_accelerator_where_gpus_are_visible(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    with pytest.raises(UserError, match="GPUs are visible"):
        runtime.build_accelerator("no")
    assert runtime.build_accelerator("no", cpu=True).device.type == "cpu"


def test_cuda_runs_get_tf32_and_autotuning_cpu_runs_nothing():
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark)
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.benchmark = False
        runtime.configure_device(torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.benchmark
        runtime.configure_device(torch.device("cuda", 0))  # settings only: no CUDA needed to set them
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.benchmark
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.benchmark = before[1]


def test_ddp_buckets_hold_the_gradients_and_buffers_are_broadcast():
    accelerator = runtime.build_accelerator("no", cpu=True)
    assert accelerator.ddp_handler.gradient_as_bucket_view and accelerator.ddp_handler.broadcast_buffers


def test_compile_on_cpu_keeps_the_cuda_home_note_from_the_output(capfd):
    """A CUDA build of torch on a GPU-less machine logged a CUDA_HOME warning under --compile."""
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    previous = logger.level
    try:
        logger.setLevel(logging.NOTSET)
        runtime.build_accelerator("no", compile=True, cpu=True)
        logger.warning("No CUDA runtime is found, using CUDA_HOME='/usr/local/cuda'")  # torch's own line
        assert "CUDA_HOME" not in capfd.readouterr().err
    finally:
        logger.setLevel(previous)


def test_cpu_is_judged_from_the_device_the_accelerator_chose(monkeypatch):
    """launch/cpu.yaml (ACCELERATE_USE_CPU) on a GPU host: the run is on the CPU, so it gets the
    CPU's precision and threads, not the GPU's."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)  # a GPU host
    monkeypatch.setattr(runtime, "is_bf16_available", lambda: True)  # whose GPU runs bf16
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)  # but whose CPU does not
    threads = []
    monkeypatch.setattr(runtime, "set_cpu_threads", lambda n: threads.append(n) or n)
    PartialState._reset_state()
    with environment(ACCELERATE_USE_CPU="1", ACCELERATE_MIXED_PRECISION=None):
        accelerator = runtime.build_accelerator("auto", cpu_threads=3)
    PartialState._reset_state()
    assert accelerator.device.type == "cpu"
    assert accelerator.mixed_precision == "no" and threads == [3]
    assert accelerator.dataloader_config.non_blocking is False
