"""A run's pictures drawn in a process of their own, which loads matplotlib while torch loads here.

A training run's pictures cost about a second of CPU, two thirds of it matplotlib's import and its
first figure; drawn on a thread of the training process they also took the GIL from the training
loop. train.py starts the painter (``start``) right after reading its flags, before torch loads:
the imports run on one core, so matplotlib loads on the other, and the drawing later runs beside
training with no lock shared. A run that did not start it early (the Python API, study.py) starts
it on its first picture.

Only drawing and writing the PNG happen there: what to draw (which images, their augmented views)
is decided in the training process, where the data is, and the PNG bytes come back for the trackers.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import concurrent.futures.process
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from finetune.report import plots
from finetune.utils.preemption import ignore_stop_signals

_POOL: concurrent.futures.ProcessPoolExecutor | None = None
_CURVES: dict[str, Any] = {}  # in the painter: each run's curves.png figure, updated epoch by epoch


def start() -> None:
    """Start the painter process now, where it has not started (on the first process of a launch
    only: the others draw nothing)."""
    global _POOL
    if _POOL is None and os.environ.get("RANK", "0") == "0":
        # A fork where there is one: started early, it copies a small process without torch or
        # threads, and it does not run the user's script again as a spawned process would (a
        # script without an ``if __name__ == "__main__"`` guard would train a second time).
        method = "fork" if sys.platform == "linux" else "spawn"
        _POOL = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(method),
                                                       initializer=_warm_up)
        _POOL.submit(int)  # the process starts on the first job
        # Shut down while the interpreter is whole: left to teardown, the pool's weakref callback
        # printed an error about a module already gone.
        atexit.register(_POOL.shutdown)


def submit(function: Any, *args: Any) -> concurrent.futures.Future:
    """Run ``function(*args)`` (one of this module's ``draw_`` functions) in the painter process."""
    global _POOL
    start()
    if _POOL is None:  # not the first process of a launch: draw here
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(function(*args))
        return done
    try:
        return _POOL.submit(function, *args)
    except concurrent.futures.process.BrokenProcessPool:  # the painter was killed (the OOM killer): a new one
        _POOL = None
        start()
        return _POOL.submit(function, *args)


def release(key: str) -> None:
    """Drop the run ``key``'s figure in the painter, where one is running (no new one for it)."""
    if _POOL is not None:
        try:
            _POOL.submit(forget, key)
        except concurrent.futures.process.BrokenProcessPool:
            pass


def _warm_up() -> None:
    """The painter's start: stop signals are for the training process (it ends the painter), then
    matplotlib's import and a first figure, whose fonts every later picture reuses."""
    ignore_stop_signals()
    threading.Thread(target=_end_with, args=(os.getppid(),), daemon=True).start()
    plots.Curves().png([{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "test_acc": 0.5}])


def _end_with(parent: int) -> None:
    """End the painter once its parent has gone (killed, it could not end it): a forked painter
    holds its own end of the job queue, so it would wait for jobs forever."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def draw_samples(path: Path, names: Sequence[str], loaded: Any, seen: Any) -> bytes:
    """``samples.png`` (``plots.samples_png``) written to ``path``; its PNG bytes."""
    png = plots.samples_png(names, loaded, seen)
    plots.save_png(path, png)
    return png


def draw_curves(key: str, path: Path, rows: Sequence[dict[str, Any]]) -> bytes:
    """``curves.png`` of the run ``key`` written to ``path``: its figure, kept here, is updated."""
    png = _CURVES.setdefault(key, plots.Curves()).png(rows)
    plots.save_png(path, png)
    return png


def forget(key: str) -> None:
    """Drop the run ``key``'s figure (it has ended)."""
    _CURVES.pop(key, None)
