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
print(json.dumps({"worker": worker}))
jobs.put(100000)
leave(3)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="fork-based pool")
def test_leave_does_what_an_ordinary_exit_does_first(tmp_path):
    out = tmp_path / "lines.txt"
    done = subprocess.run([sys.executable, "-c", LEAVER, str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 3, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "atexit ran"  # the handlers ran, and the buffered output was flushed
    assert out.read_text().count("\n") == 100000  # the thread was waited for
    worker = json.loads(lines[0])["worker"]
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
    assert "Traceback" not in done.stderr


def test_the_process_start_is_read_to_the_clock_tick(tmp_path):
    before = time.time()
    done = subprocess.run([sys.executable, "-c", "from finetune.utils.phases import process_start; "
                           "import time; print(process_start(), time.time())"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    start, now = map(float, done.stdout.split())
    # The kernel counts in ticks of 10 ms; psutil's boot time in whole seconds put it up to 1 s off.
    assert before - 0.02 <= start <= now
