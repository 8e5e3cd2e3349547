"""What a run shows: a rich progress bar and tables on a terminal, plain lines elsewhere.

Only the main process reports; the others get a reporter that stays silent.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text


class Reporter:
    """Progress and results of a run, shown on the main process only.

    Args:
        enabled: False on non-main processes.
        console: where to write (default: stdout); a non-terminal (a pipe, a SLURM log) gets a
            plain progress line every ``every_seconds`` within an epoch and one line per epoch.
        every_seconds: seconds between plain progress lines.
        clock: seconds now (tests pass their own).
    """

    def __init__(self, enabled: bool = True, console: Console | None = None, every_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.enabled = enabled
        self.console = console or Console(file=sys.stdout)
        self.live = enabled and self.console.is_terminal
        self.every_seconds = every_seconds
        self._clock = clock
        self._progress: Progress | None = None
        self._task = None
        self._epoch: tuple[int, int, int, int] | None = None  # epoch, epochs, total steps, steps done at start
        self._started = self._last_line = 0.0

    def print(self, *objects: Any) -> None:
        if self.enabled:
            # markup=False: messages hold user paths and class names, where [brackets] are literal.
            self.console.print(*objects, highlight=False, soft_wrap=True, markup=False)

    def start_epoch(self, epoch: int, epochs: int, total_steps: int, done_steps: int = 0) -> None:
        self._epoch = (epoch, epochs, total_steps, done_steps)
        self._started = self._last_line = self._clock()
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

    def due(self) -> bool:
        """Whether ``update`` would show anything now: always for a live bar; for plain output,
        once ``every_seconds`` have passed since the epoch's start or its last line. Callers
        read the loss back from the device only then."""
        if self.live:
            return True
        return self.enabled and self._epoch is not None and self._clock() - self._last_line >= self.every_seconds

    def update(self, steps: int, loss: float | None = None, acc: float | None = None,
               images_per_s: float | None = None) -> None:
        """Progress within the epoch: ``steps`` of its batches done, the running loss and accuracy."""
        if self._progress is not None:
            fields = {k: v for k, v in (("loss", loss), ("acc", acc), ("ips", images_per_s)) if v is not None}
            self._progress.update(self._task, completed=steps, **fields)
        elif self.due():
            self._plain_line(steps, loss, acc, images_per_s)

    def _plain_line(self, steps: int, loss: float | None, acc: float | None, images_per_s: float | None) -> None:
        epoch, epochs, total, done = self._epoch
        now = self._clock()
        self._last_line = now
        parts = [f"epoch {epoch + 1}/{epochs}", f"step {steps}/{total}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if acc is not None:
            parts.append(f"acc {acc:.3f}")
        if images_per_s is not None:
            parts.append(f"{images_per_s:.1f} img/s")
        if steps > done:
            parts.append(f"ETA {_duration((total - steps) * (now - self._started) / (steps - done))}")
        self.console.print("  ".join(parts), highlight=False, soft_wrap=True, markup=False)

    def end_epoch(self, row: dict[str, Any]) -> None:
        self._epoch = None
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if not self.enabled:
            return
        if self.live:
            table = Table(show_edge=False, pad_edge=False)
            for key in row:
                table.add_column(HEADERS.get(key, key), justify="right")
            table.add_row(*(format_cell(k, v) for k, v in row.items()))
            self.console.print(table)
        else:
            self.console.print("  ".join(f"{HEADERS.get(k, k)} {format_cell(k, v)}" for k, v in row.items()),
                               highlight=False, soft_wrap=True)


def _duration(seconds: float) -> str:
    """``H:MM:SS`` or ``M:SS``."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# The epoch table's columns: a friendly header where a history key reads awkwardly, and a fixed
# format per kind of figure, so that a column lines up (test_acc 1.0000 beside 0.9583, not 1).
HEADERS = {"images_per_s": "img/s", "rss_mib": "RSS MiB", "lr_backbone": "lr backbone", "lr_head": "lr head"}
DECIMALS = {"images_per_s": 1, "seconds": 1, "rss_mib": 0}


def format_cell(key: str, value: Any) -> str:
    """A figure of an epoch's row as printed: accuracies and losses to 4 decimals, learning rates to
    3 significant digits, speed and seconds to 1 decimal, memory in whole MiB.

    Args:
        key: its history key (``test_acc``, ``train_loss``, ``lr_head``, ``images_per_s``, ...).
        value: the figure.
    """
    if not isinstance(value, float):
        return str(value)
    if key.startswith("lr_"):
        return f"{value:.3g}"
    return f"{value:.{DECIMALS.get(key, 4)}f}"


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


def multilabel_table(classes: Sequence[str], per_class: dict[str, dict[str, Any]]) -> Table:
    """A multi-label evaluation per class: AP, precision, recall and F1 at the class's threshold, images."""
    table = Table(title="per class")
    for name in ("class", "AP", "precision", "recall", "F1", "threshold", "images"):
        table.add_column(name, justify="left" if name == "class" else "right")
    for c in classes:
        row = per_class[c]
        ap = "-" if row["ap"] is None else f"{row['ap']:.3f}"
        table.add_row(Text(c), ap, *(f"{row[k]:.3f}" for k in ("precision", "recall", "f1", "threshold")),
                      str(row["support"]))
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


def study_table(results: Sequence[dict[str, Any]]) -> Table:
    """One row per strategy of a study: accuracy, best epoch, time, speed, trainable parameters."""
    table = Table(title="transfer strategies")
    for name in ("strategy", "test accuracy", "best (epoch)", "seconds", "images/s", "trainable params"):
        table.add_column(name, justify="left" if name == "strategy" else "right")
    for r in results:
        table.add_row(Text(r["strategy"]), f"{r['test_accuracy']:.4f}", f"{r['best_accuracy']:.4f} ({r['best_epoch']})",
                      f"{r['seconds']:.1f}", f"{r['images_per_s']:.1f}",
                      "-" if r["trainable_params"] is None else f"{r['trainable_params']:,}")
    return table
