"""What a run shows: a rich progress bar and tables on a terminal, plain lines elsewhere.

Only the main process reports; the others get a reporter that stays silent.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text


class Reporter:
    """Progress and results of a run, shown on the main process only.

    Args:
        enabled: False on non-main processes.
        console: where to write (default: stdout); a non-terminal gets one plain line per epoch.
    """

    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console(file=sys.stdout)
        self.live = enabled and self.console.is_terminal
        self._progress: Progress | None = None
        self._task = None

    def print(self, *objects: Any) -> None:
        if self.enabled:
            # markup=False: messages hold user paths and class names, where [brackets] are literal.
            self.console.print(*objects, highlight=False, soft_wrap=True, markup=False)

    def start_epoch(self, epoch: int, epochs: int, total_steps: int, done_steps: int = 0) -> None:
        if not self.live:
            return
        self._progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.3f}  {task.fields[ips]:.1f} img/s"),
            TimeRemainingColumn(), console=self.console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task("train", total=total_steps, completed=done_steps,
                                             epoch=f"{epoch + 1}/{epochs}", loss=float("nan"),
                                             acc=float("nan"), ips=0.0)

    def update(self, steps: int, loss: float | None = None, acc: float | None = None,
               images_per_s: float | None = None) -> None:
        if self._progress is None:
            return
        fields = {k: v for k, v in (("loss", loss), ("acc", acc), ("ips", images_per_s)) if v is not None}
        self._progress.update(self._task, completed=steps, **fields)

    def end_epoch(self, row: dict[str, Any]) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if not self.enabled:
            return
        if self.live:
            table = Table(show_edge=False, pad_edge=False)
            for key in row:
                table.add_column(key, justify="right")
            table.add_row(*(_fmt(v) for v in row.values()))
            self.console.print(table)
        else:
            self.console.print("  ".join(f"{k} {_fmt(v)}" for k, v in row.items()), highlight=False, soft_wrap=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 and value != 0 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


# Cells are rich Text, not strings: the Reporter prints with markup off, so class names with
# [brackets] show as they are and styles must not be written as markup.
def confusion_table(classes: Sequence[str], matrix: Sequence[Sequence[int]], max_classes: int = 30) -> Table | None:
    """A rich table of the confusion matrix (rows: true class, columns: predicted); None if too wide."""
    if len(classes) > max_classes:
        return None
    table = Table(title="confusion matrix (rows: true, columns: predicted)")
    table.add_column("true \\ pred")
    for c in classes:
        table.add_column(Text(c), justify="right")
    for i, (c, row) in enumerate(zip(classes, matrix)):
        table.add_row(Text(c), *(Text(str(v), style="bold" if i == j else "") for j, v in enumerate(row)))
    return table


def per_class_table(classes: Sequence[str], precision: Sequence[float], recall: Sequence[float],
                    support: Sequence[int]) -> Table:
    table = Table(title="per class")
    for name, justify in (("class", "left"), ("precision", "right"), ("recall", "right"), ("images", "right")):
        table.add_column(name, justify=justify)
    for c, p, r, n in zip(classes, precision, recall, support):
        table.add_row(Text(c), f"{p:.3f}", f"{r:.3f}", str(n))
    return table


def preflight_table(counts: dict[str, dict[str, int]]) -> Table:
    """Images per class and split."""
    splits = list(counts)
    table = Table(title="images per class")
    table.add_column("class")
    for split in splits:
        table.add_column(split, justify="right")
    classes = sorted({c for by_class in counts.values() for c in by_class})
    for c in classes:
        table.add_row(Text(c), *(str(counts[s].get(c, "-")) for s in splits))
    return table
