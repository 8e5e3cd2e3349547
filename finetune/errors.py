"""One kind of error for bad input, the entry-point wrapper that turns it into one line, and the
entry point's exit."""

import atexit
import ctypes
import os
import sys
import threading
from typing import Any, Callable, NoReturn, Sequence


class UserError(Exception):
    """Bad input the user can fix: reported as one line, never as a traceback."""


class Stopped(Exception):
    """The run stopped on a signal after saving a resumable state: not an error, not a success."""

    exit_code = 143  # 128 + SIGTERM, what a process killed by SIGTERM reports


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a ``UserError`` becomes ``error: ...`` on stderr and exit status 2.

    Args:
        main: the command's ``main`` function.
        argv: arguments, or ``None`` for ``sys.argv[1:]``.
    """
    sys.stdout = QuietPipe(sys.stdout)
    try:
        main(argv)
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        return 2
    except Stopped as err:
        print(one_line(err), file=sys.stderr, flush=True)
        return Stopped.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    return 0


def leave(status: int) -> NoReturn:
    """End a command's process with ``status``, without the interpreter's teardown.

    A process that has imported torch, torchvision and torch._dynamo spends 0.3-0.7 s at exit
    freeing their objects one by one (0.66 s for ``import torch, torchvision`` alone here), memory
    the kernel takes back at once when the process ends. What a normal exit does first still
    happens, in its order: threads that are not daemons are waited for and their exit hooks run
    (``threading._shutdown``: executors, such as the painter's pool), then the ``atexit`` handlers
    (loader workers end there), then Python's and the C library's output buffers are flushed.
    Files are closed by the ``with`` blocks that write them, before this. Only the entry points
    call it: a caller of ``main`` keeps its interpreter, and so does a run under a profiler, a
    tracer or debugger, or ``python -i``, which act after the script ends.
    """
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is None or sys.flags.interactive or sys.getprofile() or sys.gettrace():
        sys.exit(status)
    try:
        shutdown()
    except BaseException as err:  # Ctrl-C while threads finish: say so in a line, keep the status
        print(f"warning: exit went on before every thread had finished ({type(err).__name__})",
              file=sys.stderr)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that has gone, a stream already closed
            pass
    try:
        ctypes.CDLL(None).fflush(None)  # what C code printed: os._exit skips the C library's exit
    except (OSError, AttributeError):  # no C library to ask (not a POSIX system)
        pass
    os._exit(status)


class QuietPipe:
    """stdout that goes to /dev/null once its reader has gone (``| head -1``), so the work goes on.

    Python would raise BrokenPipeError at the next print: eval.py died before writing
    metrics.json, and a training run would stop.
    """

    def __init__(self, stream: Any):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        # The same file descriptor, now /dev/null: later writes and Python's flush at exit succeed.
        os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: the stream's own
        return getattr(self.stream, name)


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line.

    A DataLoader worker re-raises its error in the main process wrapped in the worker's
    traceback text; the original message is that text's last line, after ``module.Class: ``.
    """
    text = str(err).strip()
    if "Traceback" in text:
        last = text.splitlines()[-1]
        head, sep, rest = last.partition(": ")
        text = rest if sep and "." in head and " " not in head else last
    return " ".join(text.split())


def first_line(err: BaseException) -> str:
    """The first line of an error's message, or its type where it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
