"""finetune.utils.allocator: freed memory kept in the process on CPU runs, and nothing else changed."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, python_cmd, run_cmd
from safetensors.torch import load_file

from finetune.utils import runtime
from finetune.utils.allocator import keep_freed_memory, user_chose_allocator

glibc = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")

# Allocates and frees a 64 MB tensor 24 times (over glibc's largest mmap threshold, 32 MB) and
# prints the page faults of the last eight, after keep_freed_memory where asked. Kept, the heap
# grows for the first few (each block a little larger than the freed one, for its alignment) and
# then serves every block from memory freed before.
FAULTS = """
import json, resource, sys, torch
from finetune.utils.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "kept" else False
counts = []
for _ in range(24):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20, dtype=torch.float32).fill_(1.0)
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": sum(counts[-8:])}))
"""


@pytest.mark.parametrize("env, chosen", [
    ({}, False),
    ({"PATH": "/usr/bin", "FINETUNE_MALLOC": "kept"}, False),
    ({"FINETUNE_MALLOC": "system"}, True),
    ({"MALLOC_ARENA_MAX": "2"}, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, True),
    ({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}, False),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}, True),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, True),
])
def test_an_allocator_the_user_chose_is_left_alone(env, chosen):
    assert user_chose_allocator(env) is chosen
    if chosen:
        assert keep_freed_memory(env) is False  # and mallopt is not called


def freed_faults(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@glibc
def test_kept_memory_is_reused_instead_of_faulted_in_again():
    system, kept = freed_faults("system"), freed_faults("kept")
    assert (system["kept"], kept["kept"]) == (False, True)
    # glibc maps each 64 MB block afresh (16,384 pages a time without huge pages); kept, it is reused
    assert kept["faults"] < 1000
    assert system["faults"] > 10 * max(kept["faults"], 1)


def test_cpu_accelerators_keep_freed_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(True) or True)
    runtime.build_accelerator("no", cpu=True)
    assert calls == [True]


def train_weights(data: Path, out: Path, env: dict[str, str | None]) -> dict[str, torch.Tensor]:
    done = run_cmd(python_cmd("train.py", "--data", str(data), *FAST, "--epochs", "2", "--output-dir", str(out)),
                   env=env)
    assert done.returncode == 0, done.stderr
    return load_file(out / "model.safetensors")


@glibc
def test_keeping_freed_memory_changes_no_number(tiny_data, tmp_path):
    system = train_weights(tiny_data, tmp_path / "system", {"FINETUNE_MALLOC": "system"})
    kept = train_weights(tiny_data, tmp_path / "kept", {"FINETUNE_MALLOC": None})
    assert system.keys() == kept.keys()
    assert all(torch.equal(system[k], kept[k]) for k in system)
