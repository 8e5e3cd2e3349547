"""What the benchmarks share: running the project's commands in-process without their output,
and reading peak memory."""

from __future__ import annotations

import contextlib
import io
import json
import resource
from pathlib import Path
from typing import Any, Callable, Sequence


def quietly(main: Callable[[Sequence[str]], Any], argv: Sequence[str]) -> Any:
    """``main(argv)`` of train.py or eval.py with its printed output swallowed; its return value."""
    with contextlib.redirect_stdout(io.StringIO()):
        return main(list(argv))


def peak_rss_mib() -> dict[str, float]:
    """Peak resident memory (Linux ru_maxrss is KiB): this process, and the largest finished child."""
    return {who: resource.getrusage(flag).ru_maxrss / 1024
            for who, flag in (("main", resource.RUSAGE_SELF), ("largest_child", resource.RUSAGE_CHILDREN))}


def write_json(path: str | Path, result: Any) -> None:
    """A benchmark's figures as JSON at ``path`` (its folder made), and a line saying where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
