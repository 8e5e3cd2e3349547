"""Stop cleanly on a signal: SIGTERM (a scheduler, ``kill``), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's
warning before a time limit or preemption) become a flag that the training loop checks between
steps, so that a resumable state is saved before the process exits.

DataLoader workers ignore these signals (``ignore_stop_signals``): a signal sent to the whole
process group (Ctrl-C in a terminal, a launcher or scheduler signalling every process) reaches
them too, and a worker that died of it would crash its parent instead of letting it save.
"""

from __future__ import annotations

import signal
from types import FrameType, TracebackType
from typing import TYPE_CHECKING

from finetune.errors import Stopped

if TYPE_CHECKING:  # torch loads in seconds: the handlers are installed before it
    from accelerate import Accelerator

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignal:
    """Remember the first stop signal instead of dying at once (a context manager).

    Until ``defer`` is called (the training loop calls it before its first step), a signal stops
    the run at once by raising ``Stopped``: during start-up there is nothing to save. From then on
    the handler only sets a flag: saving from inside a signal handler could interrupt a
    collective operation or a half-written tensor.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self.deferred = False
        self._previous = {}
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a notebook worker)
                pass

    def __enter__(self) -> "StopSignal":
        return self

    def __exit__(self, kind: type | None, value: BaseException | None, traceback: TracebackType | None) -> None:
        self.restore()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        self.received = self.received or name
        if not self.deferred:
            raise Stopped(f"stopped by {name} while starting, before training: nothing new to save; "
                          "run the same command again (with --resume, a saved state continues)")

    def defer(self) -> None:
        """From now on, only remember a signal: the training loop stops at its next safe point."""
        self.deferred = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def agreed(self, accelerator: "Accelerator") -> bool:
        """Whether any process got a stop signal; every process gets the same answer at the same step.

        With several processes this is one tiny all-reduce, so the training loop asks every step
        on CPUs and every few steps on GPUs (each ask waits for the device): processes that
        stopped at different steps could never save a state together.
        """
        if accelerator.num_processes == 1:
            return self.received is not None
        import torch  # the handlers are installed before torch loads

        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        return accelerator.reduce(flag, reduction="sum").item() > 0


_EXIT_HOOK: list[bool] = []


def _kill_daemonic_children() -> None:
    import multiprocessing

    # torch's SIGCHLD handler would report each killed worker as a failure (a traceback at exit).
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def end_workers_at_exit() -> None:
    """Make sure loader workers end when this process exits, also on an error with persistent
    workers alive: they ignore SIGTERM (``ignore_stop_signals``), which multiprocessing's own exit
    handler sends before it joins them, so without this the process would wait on them forever.
    Registered after multiprocessing's handler, so it runs first (atexit is last in, first out)."""
    import atexit
    import multiprocessing.util  # noqa: F401  (its exit handler must be registered before ours)

    if not _EXIT_HOOK:
        atexit.register(_kill_daemonic_children)
        _EXIT_HOOK.append(True)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores stop signals; its parent handles them
    and ends its workers itself."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
