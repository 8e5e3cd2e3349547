import io

from rich.console import Console

from finetune.reporting import Reporter, confusion_table, per_class_table


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
    assert buffer.getvalue() == "epoch 1  train_loss 0.5123  test_acc 0.8\n"
    silent = io.StringIO()
    other = Reporter(enabled=False, console=Console(file=silent, force_terminal=True))
    other.start_epoch(0, 1, total_steps=1)
    other.end_epoch({"epoch": 1})
    other.print("hello")
    assert silent.getvalue() == ""


def test_metric_tables_escape_markup_in_class_names():
    classes = ["[bold]cat", "dog"]
    out = render(confusion_table(classes, [[3, 1], [0, 4]]))
    assert "[bold]cat" in out and "confusion matrix" in out
    assert "[bold]cat" in render(per_class_table(classes, [1.0, 0.8], [0.75, 1.0], [4, 4]))
