"""How a command's process ends (``errors.leave``) and when it began (``phases.process_start``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest
from conftest import ROOT

# Leaves with status 3 while a thread that is not a daemon still has work to do, an atexit handler
# is registered, output sits in stdout's buffer (a pipe: block-buffered) and a process pool's
# worker is alive.
LEAVER = """
import atexit, concurrent.futures, json, queue, sys, threading
from finetune.errors import leave
out = sys.argv[1]
jobs = queue.Queue()
def write():
    lines = jobs.get()
    with open(out, "w") as f:
        f.writelines(f"{i}\\n" for i in range(lines))
threading.Thread(target=write).start()
pool = concurrent.futures.ProcessPoolExecutor(1)
worker = pool.submit(__import__("os").getpid).result()
atexit.register(print, "atexit ran")
class Teardown:
    def __del__(self):
        print("teardown ran")
kept_until_teardown = Teardown()
print(json.dumps({"worker": worker}))
__import__("ctypes").CDLL(None).printf(b"printed by C\\n")  # in the C library's buffer (a pipe: not flushed)
jobs.put(100000)
leave(3)
"""

# Under a profiler the script's end is the profiler's to handle: the ordinary exit.
PROFILED = """
from finetune.errors import leave
leave(0)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="fork-based pool")
def test_leave_does_what_an_ordinary_exit_does_first(tmp_path):
    out = tmp_path / "lines.txt"
    # Without PYTHONUNBUFFERED, which would leave the C library's stdout unbuffered too.
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", LEAVER, str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 3, done.stderr
    lines = done.stdout.splitlines()
    assert "atexit ran" in lines  # the handlers ran, and Python's buffered output was flushed
    assert "printed by C" in lines  # and the C library's
    assert "teardown ran" not in lines  # what it skips: the objects' one-by-one release
    assert out.read_text().count("\n") == 100000  # the thread was waited for
    worker = json.loads(lines[0])["worker"]
    try:
        assert psutil.Process(worker).status() == psutil.STATUS_ZOMBIE  # ended, not yet reaped
    except psutil.NoSuchProcess:
        pass  # ended and reaped
    assert "Traceback" not in done.stderr


def test_a_profiled_run_ends_the_ordinary_way(tmp_path):
    script, profile = tmp_path / "leaves.py", tmp_path / "run.prof"
    script.write_text(PROFILED)
    done = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(profile), str(script)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert profile.stat().st_size > 0  # cProfile wrote its file after the script ended


def test_the_process_start_is_read_to_the_clock_tick(tmp_path):
    before = time.time()
    done = subprocess.run([sys.executable, "-c", "from finetune.utils.phases import process_start; "
                           "import time; print(process_start(), time.time())"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    start, now = map(float, done.stdout.split())
    # The kernel counts in ticks of 10 ms; psutil's boot time in whole seconds put it up to 1 s off.
    assert before - 0.02 <= start <= now
