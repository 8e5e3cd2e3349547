"""Stop cleanly when the scheduler says so: SIGTERM or SIGUSR1 become a flag that the training
loop checks between steps, so that a resumable state is saved before the process exits."""

from __future__ import annotations

import signal
from types import FrameType

import torch
from accelerate import Accelerator

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    """Remember the first SIGTERM/SIGUSR1 instead of dying at once.

    The handler only sets a flag: saving from inside a signal handler could interrupt a
    collective operation or a half-written tensor.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous = {}
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a notebook worker)
                pass

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether any process got a stop signal; every process gets the same answer at the same step.

        With several processes this is one tiny all-reduce, so the training loop asks every step
        on CPUs and every few steps on GPUs (each ask waits for the device): processes that
        stopped at different steps could never save a state together.
        """
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        return accelerator.reduce(flag, reduction="sum").item() > 0
