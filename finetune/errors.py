"""One kind of error for bad input, and the entry-point wrapper that turns it into one line."""

import sys
from typing import Callable, Sequence


class UserError(Exception):
    """Bad input the user can fix: reported as one line, never as a traceback."""


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a ``UserError`` becomes ``error: ...`` on stderr and exit status 2.

    Args:
        main: the command's ``main`` function.
        argv: arguments, or ``None`` for ``sys.argv[1:]``.
    """
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    return 0
