"""The C allocator's settings for a command's process: keep freed memory for reuse.

glibc's ``malloc`` gives large freed blocks back to the kernel: a block over its mmap threshold
(32 MB at most) is a mapping of its own, unmapped on ``free``, and the heap's top is trimmed.
A training step on the CPU allocates and frees hundreds of MB of activations and gradients, so
every step maps those pages again and the kernel zero-fills each on first touch: 81,000 page
faults a step for resnet18 (batch 32, 224 px, bf16), a fifth of the step's time on the 2-core
machine of docs/performance.md. Keeping freed blocks for reuse removes them, as the jemalloc and
tcmalloc settings of Intel's PyTorch tuning guide do; ``bench.allocator`` measures it on several
models and sizes. The price is a higher peak RSS (freed blocks are held, not returned).

The commands that run networks (train, eval, predict, audit; study through train) set it for
their own process, whose loader workers inherit it where they are forked; the Python API leaves
its caller's process alone (call ``keep_freed_memory`` for the same). ``FINETUNE_MALLOC=system``
keeps glibc's settings, and so does a choice of the user's own: another allocator preloaded
(``LD_PRELOAD``), or glibc's mmap, trim or top-pad settings (``MALLOC_MMAP_*_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, or those of ``GLIBC_TUNABLES``).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from typing import Mapping

from finetune.errors import UserError

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# mallopt takes an int: the heap's top is given back only once over 2 GiB of it is free.
TRIM_ABOVE = 2**31 - 1
# The glibc settings this module would override, as environment variables and as tunables.
GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
GLIBC_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.mmap_max", "glibc.malloc.trim_threshold",
                  "glibc.malloc.top_pad")
CHOICES = ("kept", "system")


def user_chose_allocator(env: Mapping[str, str]) -> bool:
    """Whether the environment already says how large blocks are allocated (then it is left alone).

    Raises:
        UserError: ``FINETUNE_MALLOC`` is neither ``kept`` (the default) nor ``system``.
    """
    choice = env.get("FINETUNE_MALLOC", "kept")
    if choice not in CHOICES:
        raise UserError(f"FINETUNE_MALLOC={choice!r}: use 'kept' (the default: freed memory is kept for reuse) "
                        "or 'system' (glibc's own settings)")
    return (choice == "system"
            or any(name in env for name in GLIBC_VARIABLES)
            or any(tunable in env.get("GLIBC_TUNABLES", "") for tunable in GLIBC_TUNABLES)
            or "malloc" in env.get("LD_PRELOAD", ""))  # tcmalloc, jemalloc, mimalloc


def keep_freed_memory(env: Mapping[str, str] | None = None) -> bool:
    """Have glibc keep freed memory for reuse in this process and the processes it forks later.
    Returns whether it did: not on another C library or system, nor where ``user_chose_allocator``.

    Raises:
        UserError: an unknown ``FINETUNE_MALLOC``.
    """
    env = os.environ if env is None else env
    if user_chose_allocator(env) or sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # No mappings of their own for large blocks (they come from the heap and go back to it), and
    # the heap's top kept: a freed block's pages stay mapped for the next step.
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE))
