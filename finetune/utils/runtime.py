"""The Accelerator a run uses: device, processes and mixed precision, resolved in one place."""

from __future__ import annotations

import glob
import logging
import os
import sys
import warnings
from typing import Any, Callable, TypeVar

import psutil
import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import broadcast_object_list, is_bf16_available

from finetune.errors import UserError, first_line

T = TypeVar("T")


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has bf16 units (AVX512-BF16 or AMX); elsewhere bf16 is slower than fp32."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def launcher_command() -> list[str]:
    """The command line of the process that started this one (``accelerate launch ...``), if readable."""
    try:
        return psutil.Process().parent().cmdline()
    except Exception:  # no parent, no permission, no psutil: no launcher choice to honour
        return []


def launcher_precision(env: dict[str, str], launcher: list[str] | None = None) -> str | None:
    """The mixed precision ``accelerate launch`` was asked for, or None where it was not asked.

    Its environment says ``bf16`` or ``fp16`` only when asked, but ``no`` also by default; an
    explicit ``no`` is therefore read from the launcher's own flags (before the script's name).
    """
    launched = env.get("ACCELERATE_MIXED_PRECISION", "").lower()
    if launched in ("bf16", "fp16"):
        return launched
    if launched != "no":
        return None
    args = launcher_command() if launcher is None else launcher
    script = next((i for i, arg in enumerate(args) if arg.endswith(".py") and i > 1), len(args))
    own = args[:script]
    asked = any(arg == "--mixed_precision=no" or (arg == "--mixed_precision" and own[i + 1:i + 2] == ["no"])
                for i, arg in enumerate(own))
    return "no" if asked else None


def resolve_precision(requested: str, on_cpu: bool, env: dict[str, str] | None = None,
                      launcher: list[str] | None = None) -> str:
    """The mixed precision to hand Accelerate: ``no``, ``bf16`` or ``fp16``.

    Args:
        requested: the ``--mixed-precision`` value; ``auto`` defers to ``accelerate launch
            --mixed_precision`` where that was given (``no`` included), and otherwise picks bf16
            where the hardware runs it fast and fp32 elsewhere.
        on_cpu: whether the run is on the CPU.
        env: the environment (default ``os.environ``).
        launcher: the launching process's command line (default: read from the system).
    """
    env = os.environ if env is None else env
    if requested == "auto":
        launched = launcher_precision(env, launcher)
        if launched is not None:
            requested = launched
        elif on_cpu:
            requested = "bf16" if cpu_has_fast_bf16() else "no"
        else:
            requested = "bf16" if is_bf16_available() else "no"
    if requested == "fp16" and on_cpu:
        # Accelerate would silently run fp16 in fp32 on the CPU; bf16 is what CPUs do.
        print("note: fp16 is not supported on the CPU (it would silently run in fp32); using bf16",
              file=sys.stderr)
        requested = "bf16"
    return requested


def visible_gpus(env: dict[str, str] | None = None, dev: str = "/dev") -> str | None:
    """What says this process was given NVIDIA GPUs, whether or not CUDA can start on them: a
    non-empty ``CUDA_VISIBLE_DEVICES``, ``SLURM_GPUS_ON_NODE`` above 0, or ``/dev/nvidia0``...
    (as ``NAME=value`` or the path); None when nothing does.

    Args:
        env: the environment (default ``os.environ``).
        dev: where device files are (tests point it elsewhere).
    """
    env = os.environ if env is None else env
    cuda = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if cuda and cuda not in ("-1", "none", "NoDevFiles"):  # empty or -1: GPUs hidden on purpose
        return f"CUDA_VISIBLE_DEVICES={cuda}"
    slurm = env.get("SLURM_GPUS_ON_NODE", "").strip()
    if slurm.isdigit() and int(slurm) > 0:
        return f"SLURM_GPUS_ON_NODE={slurm}"
    devices = sorted(glob.glob(os.path.join(dev, "nvidia[0-9]*")))
    return devices[0] if devices else None


def cuda_failure() -> str:
    """What torch says when asked to start CUDA, in one line (this torch's build when it has no CUDA)."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    try:
        torch.cuda.init()
    except Exception as err:  # noqa: BLE001  # torch raises RuntimeError or AssertionError, by version
        return first_line(err)
    return "torch.cuda.is_available() is False"


def check_gpus_usable(force_cpu: bool, env: dict[str, str] | None = None, dev: str = "/dev") -> None:
    """Refuse to fall back to the CPU silently: GPUs visible while no accelerator starts is an error.

    Args:
        force_cpu: the run asked for the CPU (``--cpu``, or ``ACCELERATE_USE_CPU`` from
            ``accelerate launch --cpu`` or launch/cpu.yaml): nothing to check.
        env, dev: see ``visible_gpus``.

    Raises:
        UserError: naming what showed the GPUs, what torch reported, and what to do.
    """
    if force_cpu or torch.accelerator.is_available():
        return
    shown_by = visible_gpus(env, dev)
    if shown_by is not None:
        raise UserError(f"GPUs are visible ({shown_by}) but CUDA cannot start: {cuda_failure()}; install a torch "
                        "build for this machine's NVIDIA driver (pip install torch --index-url "
                        "https://download.pytorch.org/whl/cuXXX, XXX from nvidia-smi), or pass --cpu to run on the CPU")


def cpu_forced(cpu: bool, env: dict[str, str] | None = None) -> bool:
    """Whether the run is to use the CPU: ``--cpu``, or ``ACCELERATE_USE_CPU`` set true by
    ``accelerate launch --cpu`` / launch/cpu.yaml / slurm/finetune.sh on CPU nodes."""
    env = os.environ if env is None else env
    return cpu or env.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes")


# DDP (several processes): gradients live in DDP's all-reduce buckets instead of being copied into
# them and back each step (less memory, one copy fewer). broadcast_buffers stays on: every forward
# starts from the main process's BatchNorm running statistics (a few hundred kB for a resnet), so
# all processes evaluate with the same statistics, those the checkpoint saves; off, each process
# would keep statistics of its own batches and the processes would disagree in evaluation.
DDP_OPTIONS = DistributedDataParallelKwargs(gradient_as_bucket_view=True, broadcast_buffers=True)


def configure_device(device: torch.device) -> None:
    """Settings for a CUDA device (none for others): cuDNN autotuning, and TF32 for fp32 matmuls
    and convolutions.

    TF32 keeps fp32's range with a 10-bit mantissa on tensor cores (Ampere and later): several
    times the fp32 matmul speed. It matters for ``--mixed-precision no`` only: under bf16/fp16
    autocast the matmuls already run in 16 bits. Accumulation stays fp32.
    """
    if device.type != "cuda":
        return
    # Fixed input shapes: let cuDNN time its convolution algorithms once and keep the fastest.
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True


def precision_name(mixed_precision: str) -> str:
    """Accelerate's ``mixed_precision`` as a reader names it: ``fp32`` for ``no``; ``bf16``, ``fp16`` as they are."""
    return "fp32" if mixed_precision == "no" else mixed_precision


def eval_precision(requested: str, meta: dict, env: dict[str, str] | None = None) -> str:
    """The precision eval.py asks for: ``requested``, or for ``auto`` the precision the training's
    own test pass ran in (``meta["precision"]``) unless ``accelerate launch`` was told one.

    Args:
        requested: eval.py's ``--mixed-precision``.
        meta: the checkpoint's metadata (older checkpoints lack ``precision``: ``auto`` then).
        env: the environment (default ``os.environ``).
    """
    if requested != "auto" or launcher_precision(os.environ if env is None else env) is not None:
        return requested
    return meta.get("precision") or "auto"


def build_accelerator(mixed_precision: str, grad_accum_steps: int = 1, compile: bool = False,
                      cpu_threads: int = -1, cpu: bool = False) -> Accelerator:
    """An Accelerator for this machine: the GPU when there is one, else (many) CPU processes on gloo.

    Args:
        cpu_threads: compute threads per process on the CPU (``set_cpu_threads``).
        cpu: use the CPU even where a GPU is usable (``--cpu``).

    Raises:
        UserError: when GPUs are visible but CUDA cannot start (``check_gpus_usable``), the launch
            environment cannot start a process group, or several processes were launched but
            they did not join one group.
    """
    force_cpu = cpu_forced(cpu)
    check_gpus_usable(force_cpu)
    on_cpu = force_cpu or not torch.accelerator.is_available()
    # main() may run several times in one Python process (tests, the Python API): let each
    # run choose its own precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Accelerate warns about CPU fp16/bf16 details we handle
        try:
            accelerator = Accelerator(
                cpu=on_cpu,
                mixed_precision=resolve_precision(mixed_precision, on_cpu),
                gradient_accumulation_steps=grad_accum_steps,
                step_scheduler_with_optimizer=False,  # we step it once per optimizer step ourselves
                dynamo_backend="inductor" if compile else "no",
                # Pinned batches (see data.make_train_loader) then copy to a GPU while it computes.
                dataloader_config=DataLoaderConfiguration(non_blocking=not on_cpu),
                kwargs_handlers=[DDP_OPTIONS],
            )
        except (ValueError, RuntimeError) as err:  # a launch environment or precision this machine cannot run
            PartialState._reset_state()  # let a later attempt (tests, the Python API) start afresh
            raise UserError(f"cannot set up the run's device and processes: {first_line(err)}") from None
    configure_device(accelerator.device)
    if on_cpu:
        set_cpu_threads(cpu_threads)
        if compile:
            quiet_cuda_lookup()
    launched_world = int(os.environ.get("WORLD_SIZE", "1"))
    if launched_world != accelerator.num_processes:
        raise UserError(f"launched {launched_world} processes but they did not form one group "
                        f"({accelerator.num_processes}); on CPUs set ACCELERATE_USE_CPU=1")
    return accelerator


def quiet_cuda_lookup() -> None:
    """Keep torch's "No CUDA runtime is found, using CUDA_HOME=..." from a CPU run's output.

    A CUDA build of torch on a machine without a GPU logs it when inductor first loads
    ``torch.utils.cpp_extension`` (``--compile``): nothing the user can or needs to act on.
    """
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cores_per_process() -> int:
    """This machine's cores shared among the processes running on it (``LOCAL_WORLD_SIZE``)."""
    return max(1, _cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def num_workers(requested: int, on_gpu: bool) -> int:
    """Data-loading workers per process: ``requested``, or for ``-1`` this process's share of the cores.

    A GPU computes thousands of images/s while a worker decodes a few hundred, so GPU runs may
    use up to 16, leaving one core to the process that feeds the GPU; CPU runs stop at 8, since
    there the workers take cores from the compute threads.
    """
    if requested >= 0:
        return requested
    if on_gpu:
        return min(16, max(1, cores_per_process() - 1))
    return min(8, cores_per_process())


def set_cpu_threads(threads: int) -> int:
    """Set the compute threads of a CPU run; ``-1``: the cores shared among this machine's processes.

    ``accelerate launch`` without ``--cpu`` sets OMP_NUM_THREADS=1 on CPU-only machines, which
    halves the speed of a one-process run on two cores; ``-1`` therefore ignores OMP_NUM_THREADS.
    """
    if threads < 1:
        threads = cores_per_process()
    torch.set_num_threads(threads)
    return threads


def rss_mib() -> float:
    """This process's resident memory now, in MiB (to see growth from epoch to epoch)."""
    return psutil.Process().memory_info().rss / 2**20


def main_decides(accelerator: Accelerator, decide: Callable[[], T]) -> T:
    """Run ``decide`` on the main process only and hand its result to every process.

    For work that must happen once and be seen alike everywhere (the dataset preflight, the run
    folder's name). The result travels with Accelerate's ``broadcast_object_list``: objects of
    our own making between the run's processes, never read from a user's file, and no shared
    filesystem needed. A UserError on the main process is raised on every process.

    Args:
        accelerator: the run's Accelerator.
        decide: what to run; it returns something picklable.
    """
    outcome: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            outcome = [("ok", decide())]
        except UserError as err:
            outcome = [("error", str(err))]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    kind, value = outcome[0]
    if kind == "error":
        raise UserError(value)
    return value


def process_state(cpu: bool = False) -> PartialState:
    """The process group alone (no precision or model settings): for commands that coordinate
    several runs, such as study.py, on the device ``build_accelerator`` would choose."""
    on_cpu = cpu_forced(cpu) or not torch.accelerator.is_available()
    return PartialState(cpu=on_cpu)
