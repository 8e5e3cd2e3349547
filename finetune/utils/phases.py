"""Where a run's wall clock goes: seconds per phase, and when the first training step began
after the process started. A run writes them to ``timings.json`` in its folder, which
``bench.peer_timm`` reads to print each phase beside the whole process's time."""

from __future__ import annotations

import functools
import json
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil

from finetune.utils.files import atomic_write_text


class PhaseClock:
    """Seconds spent in named phases (``with clock("test"): ...``), and wall-clock marks."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.marks: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def mark(self, name: str) -> None:
        """The first time ``name`` happens, in seconds since the process started."""
        if name not in self.marks:
            self.marks[name] = time.time() - process_start()

    def write(self, path: Path) -> None:
        """``timings.json``: the marks (seconds since the process started) and each phase's seconds."""
        self.mark("end")
        record = {"since_process_start": {k: round(v, 3) for k, v in self.marks.items()},
                  "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")


@functools.cache
def process_start() -> float:
    """When this process started (the wall clock's seconds; to 10 ms on Linux).

    On Linux from the kernel's record of the start in clock ticks since boot, against the clock
    since boot: psutil adds those ticks to the boot time in whole seconds, which put every mark up
    to a second off (0.53 s late on the machine of docs/performance.md). psutil's answer where
    that cannot be read, or where it disagrees by more than psutil's own error (a /proc that
    only imitates Linux's)."""
    rough = psutil.Process().create_time()
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime; the name may hold spaces
        since_start = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux
        return rough
    start = time.time() - since_start
    return start if since_start >= 0 and abs(start - rough) <= 1.5 else rough
