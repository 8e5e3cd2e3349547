"""Trackers through Accelerate: TensorBoard event files read back with TensorBoard's own reader."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from finetune import config as config_module
from finetune.errors import UserError
from finetune.report import tracking


def read_events(log_dir: Path, run: str = tracking.PROJECT) -> EventAccumulator:
    events = EventAccumulator(str(log_dir / run))
    events.Reload()
    return events


def scalars(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def optimizer() -> torch.optim.Optimizer:
    w, b, head = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    return torch.optim.SGD([{"params": [w], "lr": 0.01, "name": "backbone"},
                            {"params": [b], "lr": 0.01, "name": "backbone_no_decay"},
                            {"params": [head], "lr": 0.1, "name": "head"}], lr=0.01)


def run_steps(log: tracking.StepLog, steps: range, loss_of, opt) -> None:
    """The loop's running sums as Trainer keeps them: a device loss sum and a count of images."""
    loss_sum, seen = torch.tensor(0.0), 0
    log.start_epoch(loss_sum, seen)
    for step in steps:
        for batch in range(2):  # two batches of 4 images per optimizer step
            loss_sum += loss_of(step, batch) * 4
            seen += 4
        log.end_step(step, loss_sum, seen, opt)
        if step % 3 == 0:  # the loop flushes where it reads back anyway: not every step
            log.flush()
    log.flush()


def test_points_every_n_steps_with_window_means_and_learning_rates(tmp_path: Path):
    accelerator = Accelerator(cpu=True)
    tracking.start_trackers(accelerator, "tensorboard", tmp_path / "logs", "run", hparams={"lr": 0.01, "data": "none"})
    log = tracking.StepLog(accelerator, every=2)
    run_steps(log, range(1, 8), lambda step, batch: float(step * 10 + batch), optimizer())
    accelerator.end_training()
    events = read_events(tmp_path / "logs")
    assert {"train/loss", "train/images_per_s", "lr/backbone", "lr/head"} <= set(events.Tags()["scalars"])
    # Step 2 covers steps 1-2 (losses 10, 11, 20, 21 over equal batches), and so on; step 7 makes no point.
    assert scalars(events, "train/loss") == [(2, 15.5), (4, 35.5), (6, 55.5)]
    assert [v for _, v in scalars(events, "lr/head")] == pytest.approx([0.1] * 3)
    assert all(v > 0 for _, v in scalars(events, "train/images_per_s"))
    assert logged_hparams(tmp_path / "logs") == {"lr": 0.01, "data": "none"}
    assert [p.name for p in (tmp_path / "logs").iterdir()] == [tracking.PROJECT]  # one run: no folder beside it
    assert [p.is_file() for p in (tmp_path / "logs" / tracking.PROJECT).iterdir()] == [True]  # nor inside it


def logged_hparams(log_dir: Path) -> dict:
    """The hyperparameters TensorBoard's HParams tab shows for the run in ``log_dir/finetune``."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator as PluginEvents
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = PluginEvents(str(log_dir / tracking.PROJECT))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.number_value if v.HasField("number_value") else v.string_value for k, v in start.hparams.items()}


def test_each_call_with_own_run_is_a_run_of_its_own(tmp_path: Path):
    """eval.py three times into one folder: three runs, each with its point at step 0."""
    for accuracy in (0.5, 0.75, 1.0):
        accelerator = Accelerator(cpu=True)
        tracking.start_trackers(accelerator, "tensorboard", tmp_path / "logs", "eval", own_run=True)
        accelerator.log({"eval/accuracy": accuracy}, step=0)
        accelerator.end_training()
    runs = sorted((tmp_path / "logs" / tracking.PROJECT).iterdir())
    assert len(runs) == 3 and all(r.name.startswith("eval-") for r in runs)
    assert sorted(scalars(read_events(r.parent, r.name), "eval/accuracy")[0][1] for r in runs) == [0.5, 0.75, 1.0]


def test_a_resumed_run_replaces_the_points_after_its_state(tmp_path: Path):
    """A killed run wrote points up to step 9, its last state was at step 5: the resumed run
    hides 6-9 (TensorBoard's purge_step) and writes them again, so every step shows once."""
    first = Accelerator(cpu=True)
    tracking.start_trackers(first, "tensorboard", tmp_path / "logs", "run")
    log = tracking.StepLog(first, every=1)
    run_steps(log, range(1, 10), lambda step, batch: float(step), optimizer())
    first.end_training()
    resumed = Accelerator(cpu=True)
    tracking.start_trackers(resumed, "tensorboard", tmp_path / "logs", "run", resume_step=5)
    log = tracking.StepLog(resumed, every=1)
    run_steps(log, range(6, 12), lambda step, batch: float(step + 100), optimizer())
    resumed.end_training()
    points = scalars(read_events(tmp_path / "logs"), "train/loss")
    assert points == [(s, float(s)) for s in range(1, 6)] + [(s, float(s + 100)) for s in range(6, 12)]


def test_no_tracker_logs_nothing_and_reads_nothing(tmp_path: Path):
    accelerator = Accelerator(cpu=True)
    tracking.start_trackers(accelerator, "none", tmp_path / "logs", "run")
    log = tracking.StepLog(accelerator, every=1, enabled=False)  # what RunLog makes of --log-with none
    assert not log.active
    run_steps(log, range(1, 3), lambda step, batch: 1.0, optimizer())
    assert not (tmp_path / "logs").exists()


def test_pictures_go_to_the_images_tab(tmp_path: Path):
    accelerator = Accelerator(cpu=True)
    tracking.start_trackers(accelerator, "tensorboard", tmp_path / "logs", "run")
    buffer = io.BytesIO()
    Image.new("RGBA", (40, 30), (255, 0, 0, 255)).save(buffer, format="PNG")
    tracking.log_png(accelerator, "curves", buffer.getvalue(), step=7)
    accelerator.end_training()
    events = read_events(tmp_path / "logs")
    image = events.Images("curves")
    assert [(e.step, e.width, e.height) for e in image] == [(7, 40, 30)]
    with Image.open(io.BytesIO(image[0].encoded_image_string)) as shown:  # TensorBoard shows the same picture
        assert shown.size == (40, 30) and shown.getpixel((5, 5)) == (255, 0, 0, 255)


def test_a_writer_that_takes_only_pixels_gets_pixels(tmp_path: Path):
    """Accelerate falls back to tensorboardX's writer, which has no torch file writer to take PNG bytes."""
    accelerator = Accelerator(cpu=True)
    tracking.start_trackers(accelerator, "tensorboard", tmp_path / "logs", "run")
    tracker = accelerator.get_tracker("tensorboard")
    taken = []
    tracker.writer.file_writer = None
    tracker.log_images = lambda values, step, **kwargs: taken.append((values["samples"].shape, step, kwargs))
    buffer = io.BytesIO()
    Image.new("RGBA", (40, 30)).save(buffer, format="PNG")
    tracking.log_png(accelerator, "samples", buffer.getvalue(), step=0)
    assert taken == [((1, 30, 40, 3), 0, {"dataformats": "NHWC"})]


def test_a_missing_tracker_package_is_one_line_naming_it(monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(UserError, match="--log-with wandb needs the 'wandb' package: pip install wandb"):
        tracking.check_tracker("wandb")
    tracking.check_tracker("none")


def test_every_tracker_flag_value_is_known_to_tracking():
    assert set(config_module.TRACKERS) == set(tracking.TRACKERS) | {"none"}


def test_default_cadence_is_about_50_points_an_epoch():
    assert tracking.log_every_steps(0, 5) == 1
    assert tracking.log_every_steps(0, 1000) == 20
    assert tracking.log_every_steps(7, 1000) == 7


def test_hyperparameters_are_flat_values():
    @dataclass
    class Config:
        data: str | None = None
        lr: float = 0.1
        scale: tuple[float, float] = (0.08, 1.0)

    assert tracking.hyperparameters(Config()) == {"data": "none", "lr": 0.1, "scale": "(0.08, 1.0)"}


def test_a_picture_whose_painter_was_killed_is_a_warning_not_a_failed_run(tmp_path: Path, monkeypatch, capsys):
    import concurrent.futures.process

    from finetune.config import TrainConfig
    from finetune.report import painter

    def killed(function, *args):
        future = concurrent.futures.Future()
        future.set_exception(concurrent.futures.process.BrokenProcessPool("a child process terminated abruptly"))
        return future

    config = TrainConfig(log_with="none")
    log = tracking.RunLog(Accelerator(cpu=True), config, tmp_path, batches_per_epoch=4)
    monkeypatch.setattr(painter, "submit", killed)
    log.end_epoch(4, [{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "test_acc": 0.5}])
    log.finish()  # does not raise
    assert "warning: curves.png was not drawn: the process drawing it ended" in capsys.readouterr().err
