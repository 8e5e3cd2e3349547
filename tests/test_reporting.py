import io
import re

import pytest
from rich.console import Console

from finetune.report.console import Reporter, confusion_table, per_class_table


def render(reporter_or_table, terminal: bool = True) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=terminal, width=120, color_system=None)
    console.print(reporter_or_table)
    return buffer.getvalue()


def test_terminal_gets_a_progress_bar_and_a_table():
    buffer = io.StringIO()
    reporter = Reporter(console=Console(file=buffer, force_terminal=True, width=120, color_system=None))
    reporter.start_epoch(0, 3, total_steps=10)
    reporter.update(5, loss=0.5, acc=0.75, images_per_s=42.0)
    reporter._progress.refresh()
    reporter.end_epoch({"epoch": 1, "train_loss": 0.5, "test_acc": 0.8})
    out = buffer.getvalue()
    assert "epoch 1/3" in out and "loss 0.5000" in out and "42.0 img/s" in out and "5/10" in out
    assert "train_loss" in out and ("┃" in out or "│" in out)


def test_pipe_gets_one_plain_line_per_epoch_and_other_processes_nothing():
    buffer = io.StringIO()
    reporter = Reporter(console=Console(file=buffer, force_terminal=False, width=80))
    reporter.start_epoch(0, 1, total_steps=10)
    reporter.update(5, loss=0.5)
    reporter.end_epoch({"epoch": 1, "train_loss": 0.51234, "test_acc": 0.8})
    assert buffer.getvalue() == "epoch 1  train_loss 0.5123  test_acc 0.8000\n"
    silent = io.StringIO()
    other = Reporter(enabled=False, console=Console(file=silent, force_terminal=True))
    other.start_epoch(0, 1, total_steps=1)
    other.end_epoch({"epoch": 1})
    other.print("hello")
    assert silent.getvalue() == ""


ROW = {"epoch": 3, "train_loss": 0.41234567, "train_acc": 0.875, "test_acc": 1.0, "test_loss": 0.0123456,
       "lr_backbone": 0.00064, "images_per_s": 3.2303, "seconds": 12.3456, "rss_mib": 1835.1055}


def test_an_epoch_row_has_a_fixed_format_per_column():
    buffer = io.StringIO()
    Reporter(console=Console(file=buffer, force_terminal=False, width=200)).end_epoch(ROW)
    assert buffer.getvalue() == ("epoch 3  train_loss 0.4123  train_acc 0.8750  test_acc 1.0000  test_loss 0.0123  "
                                 "lr backbone 0.00064  img/s 3.2  seconds 12.3  RSS MiB 1835\n")


def test_the_epoch_table_has_friendly_headers_and_the_same_figures():
    buffer = io.StringIO()
    Reporter(console=Console(file=buffer, force_terminal=True, width=200, color_system=None)).end_epoch(ROW)
    header, _, values = buffer.getvalue().splitlines()[:3]
    assert [h.strip() for h in header.split("┃")] == ["epoch", "train_loss", "train_acc", "test_acc", "test_loss",
                                                      "lr backbone", "img/s", "seconds", "RSS MiB"]
    assert [v.strip() for v in values.split("│")] == ["3", "0.4123", "0.8750", "1.0000", "0.0123", "0.00064", "3.2",
                                                      "12.3", "1835"]


@pytest.mark.parametrize("through_reporter", [True, False])
def test_metric_tables_show_class_names_as_they_are(through_reporter: bool):
    """eval.py prints through the Reporter, whose markup is off: names with [brackets] stay as they
    are (no escaping backslashes), and the diagonal is bold by style, not by literal tags."""
    classes = ["[bold]cat", "dog [x]"]
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120, color_system="standard")
    for table in (confusion_table(classes, [[3, 1], [0, 4]]), per_class_table(classes, [1.0, 0.8], [0.75, 1.0], [4, 4])):
        Reporter(console=console).print(table) if through_reporter else console.print(table)
    out = buffer.getvalue()
    assert out.count("[bold]cat") == 3 and out.count("dog [x]") == 3  # column header and two rows
    assert "\\[" not in out and "[/bold]" not in out
    bold = re.findall(r"\x1b\[1m *(\d+)\x1b\[0m", out)
    assert bold == ["3", "4"]  # the diagonal only


def test_pipe_gets_a_plain_progress_line_at_the_set_cadence():
    now = [100.0]
    buffer = io.StringIO()
    reporter = Reporter(console=Console(file=buffer, force_terminal=False, width=200), every_seconds=60,
                        clock=lambda: now[0])
    reporter.start_epoch(1, 5, total_steps=400, done_steps=100)  # resumed at step 100
    lines = []
    for step in range(110, 401, 10):  # the loop offers an update every 10 steps, 10 s apart
        now[0] += 10
        if reporter.due():  # the loop reads the loss back only then
            reporter.update(step, loss=0.5, acc=0.75, images_per_s=32.0)
            lines.append(step)
    reporter.end_epoch({"epoch": 2, "train_loss": 0.5})
    assert lines == list(range(160, 401, 60))
    out = buffer.getvalue().splitlines()
    # 60 s for 60 steps of this run, 240 steps left: 4 minutes.
    assert out[0] == "epoch 2/5  step 160/400  loss 0.5000  acc 0.750  32.0 img/s  ETA 4:00"
    assert len(out) == len(lines) + 1 and out[-1] == "epoch 2  train_loss 0.5000"
    assert not reporter.due()  # between epochs: nothing to show


def test_a_terminal_is_always_due_and_other_processes_never():
    assert Reporter(console=Console(file=io.StringIO(), force_terminal=True)).due()
    other = Reporter(enabled=False, console=Console(file=io.StringIO(), force_terminal=False), every_seconds=0)
    other.start_epoch(0, 1, total_steps=10)
    assert not other.due()
