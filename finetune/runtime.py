"""The Accelerator a run uses: device, processes and mixed precision, resolved in one place."""

from __future__ import annotations

import os
import sys
import warnings

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import is_bf16_available

from finetune.errors import UserError, first_line


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has bf16 units (AVX512-BF16 or AMX); elsewhere bf16 is slower than fp32."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def resolve_precision(requested: str, on_cpu: bool, env: dict[str, str] | None = None) -> str:
    """The mixed precision to hand Accelerate: ``no``, ``bf16`` or ``fp16``.

    Args:
        requested: the ``--mixed-precision`` value; ``auto`` defers to ``accelerate launch
            --mixed_precision`` when that asked for bf16/fp16, and otherwise picks bf16 where
            the hardware runs it fast and fp32 elsewhere.
        on_cpu: whether the run is on the CPU.
        env: the environment (default ``os.environ``).
    """
    env = os.environ if env is None else env
    if requested == "auto":
        launched = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
        if launched in ("bf16", "fp16"):
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


def build_accelerator(mixed_precision: str, grad_accum_steps: int = 1, compile: bool = False,
                      cpu_threads: int = -1) -> Accelerator:
    """An Accelerator for this machine: the GPU when there is one, else (many) CPU processes on gloo.

    Args:
        cpu_threads: compute threads per process on the CPU (``set_cpu_threads``).

    Raises:
        UserError: when the launch environment cannot start a process group, or several
            processes were launched but they did not join one group.
    """
    on_cpu = not torch.accelerator.is_available()
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
            )
        except (ValueError, RuntimeError) as err:  # a launch environment or precision this machine cannot run
            PartialState._reset_state()  # let a later attempt (tests, the Python API) start afresh
            raise UserError(f"cannot set up the run's device and processes: {first_line(err)}") from None
    if accelerator.device.type == "cuda":
        # Fixed input shapes: let cuDNN time its convolution algorithms once and keep the fastest.
        torch.backends.cudnn.benchmark = True
    if on_cpu:
        set_cpu_threads(cpu_threads)
    launched_world = int(os.environ.get("WORLD_SIZE", "1"))
    if launched_world != accelerator.num_processes:
        raise UserError(f"launched {launched_world} processes but they did not form one group "
                        f"({accelerator.num_processes}); on CPUs set ACCELERATE_USE_CPU=1")
    return accelerator


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
    import psutil

    return psutil.Process().memory_info().rss / 2**20
