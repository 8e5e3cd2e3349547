"""``accelerate launch`` whose stops and failures end in one line instead of a launcher traceback.

    python -m finetune.commands.launch [accelerate launch flags] train.py [train.py flags]
    finetune-launch ...                                       # the same, once installed

Accelerate's launcher does the launching; this only frames it. A stop signal sent to the launcher
(``kill``, Ctrl-C, SLURM's USR1) goes on to the training processes, which save and exit 143; the
launcher itself used to end in torch's ``SignalException`` traceback (several processes) or
``CalledProcessError`` (one process), and with one process a SIGTERM to the launcher alone left
the training running without it. A process that fails has already printed its own one-line error:
the launcher adds one line naming it and exits with its status.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any, Sequence

from finetune.errors import Stopped

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1")


def main(argv: Sequence[str] | None = None) -> int:
    # Torch's agent forwards these to its processes (its default leaves out USR1, SLURM's warning).
    os.environ.setdefault("PET_SIGNALS_TO_HANDLE", ",".join(STOP_SIGNALS))
    import subprocess

    import accelerate.commands.launch as accelerate_launch
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    hold_the_store_at_exit()
    received: list[str] = []
    forward_stop_signals(received)  # one process: Accelerate's simple launcher forwards nothing
    accelerate_launch.signal = _KeepSigterm()  # see _KeepSigterm
    try:
        launch_command(args)
    except SignalException as err:  # several processes: the agent has passed the signal on
        return stopped(signal.Signals(err.sigval).name)
    except SystemExit as err:  # the same, from Accelerate 1.16 on: it exits 128 + the signal's number
        name = _stop_signal(err.code)
        if name is None:
            raise
        return stopped(name)
    except ChildFailedError as err:
        codes = {rank: failure.exitcode for rank, failure in err.failures.items()}
        return failed(codes, received)
    except subprocess.CalledProcessError as err:
        return failed({0: err.returncode}, received)
    return 0


# Keys of the check-out after torch's exit barrier (``leave_last``): new ones, as that barrier's are
# used once per run.
LEFT, ALL_LEFT = "finetune/exit/left", "finetune/exit/all_left"


def hold_the_store_at_exit() -> None:
    """Keep the launcher that hosts the rendezvous store alive until every node's launcher has left
    torch's exit barrier (several machines; ``leave_last``).

    The last launcher into that barrier leaves it at once, and where it hosts the store (the first
    machine, with the static rendezvous that ``--machine_rank`` gives), its exit closed the store
    under a launcher that had just arrived: after a run that had finished on every node, that
    launcher printed torch's "Error waiting on exit barrier" traceback (seen on a 2-node SLURM job).
    """
    from torch.distributed.elastic.agent.server.api import SimpleElasticAgent

    if getattr(SimpleElasticAgent._exit_barrier, "leaves_last", False):
        return
    SimpleElasticAgent._exit_barrier = then_leave_last(SimpleElasticAgent._exit_barrier)


def then_leave_last(exit_barrier: Any) -> Any:
    """``SimpleElasticAgent._exit_barrier`` followed by ``leave_last``."""

    def wrapped(agent: Any) -> None:
        start = time.monotonic()
        exit_barrier(agent)
        group = agent._worker_group
        # Only the static rendezvous says which launcher hosts the store (machine rank 0); with
        # another (c10d's), any may, and torch's barrier is left as it is. The two waits share
        # torch's timeout: a node that never came keeps the host that long, not twice.
        left = agent._exit_barrier_timeout - (time.monotonic() - start)
        if group.spec.rdzv_handler.get_backend() == "static" and left > 0:
            leave_last(agent._store, group.group_rank, group.group_world_size, left)

    wrapped.leaves_last = True  # type: ignore[attr-defined]
    return wrapped


def leave_last(store: Any, rank: int, world_size: int, timeout: float) -> None:
    """Every node's launcher checks out here after torch's exit barrier; the first machine's (rank 0,
    the store's host) waits until all have, so none is still using the store when it closes.

    The last to check out marks it, and only after its own last request, so a host that leaves
    then has nothing left to serve. A launcher that never checks out (its node died) keeps the host
    ``timeout`` seconds at most, as torch's own barrier would, and is named in one line.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.utils.store import store_timeout

    if world_size <= 1:
        return
    try:
        with store_timeout(store, timeout):
            if store.add(LEFT, 1) == world_size:
                store.set(ALL_LEFT, "1")
            if rank == 0:
                store.wait([ALL_LEFT])
    except SignalException:  # a stop signal: the launcher's own way out (main)
        raise
    except Exception as err:  # the store's errors come in several types; the run itself is over
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"launcher: the run has finished here, but not every node's launcher checked out "
              f"({type(err).__name__}: {detail})", file=sys.stderr, flush=True)


def forward_stop_signals(received: list[str]) -> None:
    """Pass a stop signal that reached only the launcher on to its children (the training process)
    and note it; the launcher goes on waiting for them. Torch's agent replaces these handlers with
    its own where it launches several processes."""
    import psutil

    def forward(signum: int, frame: Any) -> None:
        received.append(signal.Signals(signum).name)
        for child in psutil.Process().children():
            try:
                child.send_signal(signum)  # a second signal to a process that got one is ignored
            except psutil.Error:
                pass

    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), forward)


class _KeepSigterm:
    """The ``signal`` module as Accelerate's launcher sees it, except that setting a SIGTERM handler
    keeps ours (``forward_stop_signals``). Accelerate 1.16's one-process launcher sets its own,
    which terminates the run and kills it 5 s later: too soon for a run saving its state, and it
    exits without our line. Ours passes the signal on and waits for the run to save and stop."""

    def __getattr__(self, name: str) -> Any:
        return getattr(signal, name)

    def signal(self, signum: int, handler: Any) -> Any:
        if signum == signal.SIGTERM:
            return signal.getsignal(signum)
        return signal.signal(signum, handler)


def _stop_signal(code: object) -> str | None:
    """The stop signal an exit status of 128 + its number stands for, else None."""
    if not isinstance(code, int) or code <= 128:
        return None
    try:
        name = signal.Signals(code - 128).name
    except ValueError:
        return None
    return name if name in STOP_SIGNALS else None


def stopped(name: str) -> int:
    print(f"launcher: stopped by {name}; each process said above what it saved", file=sys.stderr, flush=True)
    return Stopped.exit_code


def failed(codes: dict[int, int], received: list[str]) -> int:
    """The launcher's status for processes that exited with ``codes`` (rank -> exit status)."""
    if all(code in (Stopped.exit_code, -signal.SIGTERM) for code in codes.values()):
        # Every process stopped on a signal sent to them (a scheduler signals them all) or to us.
        return stopped(received[0] if received else "a signal")
    rank, code = next((r, c) for r, c in sorted(codes.items()) if c not in (Stopped.exit_code, -signal.SIGTERM))
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
    print(f"launcher: process {rank} {how}; its own message is above", file=sys.stderr, flush=True)
    return code if 0 < code < 256 else 1


def run() -> None:
    """The ``finetune-launch`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
