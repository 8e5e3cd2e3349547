"""The C allocator's settings for tensor work on the CPU: keep freed memory in the process.

glibc's ``malloc`` gives large freed blocks back to the kernel: a block over its mmap threshold
(32 MB at most) is a mapping of its own, unmapped on ``free``, and the heap's top is trimmed.
A training step on the CPU allocates and frees hundreds of MB of activations and gradients, so
every step maps those pages again and the kernel zero-fills each on first touch: about 90,000
page faults a step for resnet18 (batch 32, 224 px, bf16), a fifth of the step's time on the
2-core machine of docs/performance.md. Keeping freed blocks for reuse removes them, as the
jemalloc and tcmalloc settings that Intel's PyTorch tuning guide gives do; ``bench.allocator``
measures it on several models and sizes. The price is a higher peak RSS (freed blocks are held,
not returned): docs/performance.md has both.

``FINETUNE_MALLOC=system`` keeps glibc's own settings; so does an allocator or ``MALLOC_*``
setting the user chose (``LD_PRELOAD``, ``MALLOC_*_`` variables, ``GLIBC_TUNABLES``).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from typing import Mapping

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# The largest positive int: mallopt takes an int. The heap's top is never trimmed.
NEVER = 2**31 - 1


def user_chose_allocator(env: Mapping[str, str]) -> bool:
    """Whether the environment already says how memory is allocated (then it is left alone)."""
    return (env.get("FINETUNE_MALLOC", "") == "system"
            or any(name.startswith("MALLOC_") for name in env)
            or "malloc" in env.get("GLIBC_TUNABLES", "")
            or "malloc" in env.get("LD_PRELOAD", ""))  # tcmalloc, jemalloc, mimalloc


def keep_freed_memory(env: Mapping[str, str] | None = None) -> bool:
    """Have glibc keep freed memory for reuse in this process and the processes it forks later
    (data loader workers). Returns whether it did: not on another C library or system, nor where
    ``user_chose_allocator``."""
    env = os.environ if env is None else env
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or user_chose_allocator(env):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # No mappings of their own for large blocks (they come from the heap and go back to it), and
    # no trimming of the heap: a freed block's pages stay mapped for the next step.
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER))
