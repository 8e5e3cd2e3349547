"""finetune.utils.allocator: freed memory kept in the process on CPU runs, and nothing else changed."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, python_cmd, run_cmd
from safetensors.torch import load_file

from finetune.commands import audit, predict, train
from finetune.commands import eval as eval_command
from finetune.errors import UserError
from finetune.utils import allocator
from finetune.utils.allocator import keep_freed_memory, user_chose_allocator

glibc = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")

# Allocates and frees a 64 MB tensor 32 times (over glibc's largest mmap threshold, 32 MB) and
# prints the page faults of the last eight, after keep_freed_memory where asked. Kept, the heap
# grows for the first few (each block a little larger than the freed one, for its alignment; 5 to
# 9 of them in six runs here), then serves every block from memory freed before.
FAULTS = """
import json, resource, sys, torch
from finetune.utils.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "kept" else False
counts = []
for _ in range(32):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20, dtype=torch.float32).fill_(1.0)
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": sum(counts[-8:])}))
"""


@pytest.mark.parametrize("env, chosen", [
    ({}, False),
    ({"PATH": "/usr/bin", "FINETUNE_MALLOC": "kept"}, False),
    ({"FINETUNE_MALLOC": "system"}, True),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, True),
    ({"MALLOC_MMAP_MAX_": "65536"}, True),
    ({"MALLOC_ARENA_MAX": "2"}, False),  # the number of arenas: set by many container platforms, not our business
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.cpu.hwcaps=-AVX2"}, False),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}, True),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, True),
])
def test_an_allocator_the_user_chose_is_left_alone(monkeypatch, env, chosen):
    assert user_chose_allocator(env) is chosen
    if chosen:
        def no_c_library(*args):
            raise AssertionError("mallopt reached")

        monkeypatch.setattr(allocator.ctypes, "CDLL", no_c_library)
        assert keep_freed_memory(env) is False


def test_an_unknown_choice_is_one_clear_error():
    with pytest.raises(UserError, match="FINETUNE_MALLOC='off'.*'kept'.*'system'"):
        keep_freed_memory({"FINETUNE_MALLOC": "off"})


def freed_faults(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@glibc
def test_kept_memory_is_reused_instead_of_faulted_in_again():
    system, kept = freed_faults("system"), freed_faults("kept")
    assert (system["kept"], kept["kept"]) == (False, True)
    # The last eight 64 MB blocks span 131,072 pages of 4 KiB. glibc maps each afresh (one fault a
    # page, or one per 2 MiB where huge pages are always on); kept, they reuse pages already there.
    assert kept["faults"] < 1000
    assert system["faults"] > kept["faults"]


@pytest.mark.parametrize("command, argv", [(train, []), (eval_command, []), (predict, []), (audit, [])])
def test_the_commands_that_run_networks_keep_freed_memory_first(monkeypatch, command, argv):
    class Kept(Exception):
        pass

    def kept() -> bool:
        raise Kept  # before anything else of the command runs

    monkeypatch.setattr(command, "keep_freed_memory", kept)
    with pytest.raises(Kept):
        command.main(argv)


def test_the_python_api_leaves_its_callers_allocator_alone(monkeypatch, tiny_data, tmp_path):
    import finetune

    def reached(env):
        raise AssertionError("the API changed its caller's allocator")

    monkeypatch.setattr(allocator, "user_chose_allocator", reached)  # keep_freed_memory's first step, however imported
    run = finetune.train(data=tiny_data, model="mobilenet_v3_small", weights="none", image_size=32, batch_size=8,
                         epochs=1, num_workers=0, output_dir=tmp_path / "run", plots=False, log_with="none")
    assert (run.run_dir / "model.safetensors").is_file()


def train_weights(data: Path, out: Path, env: dict[str, str | None]) -> dict[str, torch.Tensor]:
    done = run_cmd(python_cmd("train.py", "--data", str(data), *FAST, "--epochs", "2", "--output-dir", str(out)),
                   env=env)
    assert done.returncode == 0, done.stderr
    return load_file(out / "model.safetensors")


@glibc
def test_keeping_freed_memory_changes_no_number(tiny_data, tmp_path):
    system = train_weights(tiny_data, tmp_path / "system", {"FINETUNE_MALLOC": "system"})
    # Whatever this machine's environment says about allocators, the second run keeps freed memory.
    mine = {name: None for name in os.environ if name.startswith("MALLOC_") or name in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    kept = train_weights(tiny_data, tmp_path / "kept", {**mine, "FINETUNE_MALLOC": None})
    assert system.keys() == kept.keys()
    assert all(torch.equal(system[k], kept[k]) for k in system)
