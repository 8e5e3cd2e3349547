"""The training loop reads values back from the device only every few steps, never every step:
on a GPU each read stalls the queue of work (a host sync)."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import torch
from conftest import FAST, write_image_folder

from finetune.commands import train
from finetune.training.engine import SYNC_EVERY_STEPS

LOOP_FILES = ("engine.py", "session.py", "loop.py", "preemption.py", "tracking.py")


def test_training_reads_from_the_device_every_few_steps_only(tmp_path: Path, monkeypatch):
    data = tmp_path / "data"
    write_image_folder(data / "train", {"a": 30, "b": 30})
    write_image_folder(data / "test", {"a": 2, "b": 2}, seed=1)
    reads = []

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            frame = sys._getframe(1)
            if frame.f_code.co_filename.endswith(LOOP_FILES):
                function = frame.f_code.co_name if not frame.f_code.co_name.startswith("<") else frame.f_back.f_code.co_name
                reads.append(f"{name} {Path(frame.f_code.co_filename).name}:{frame.f_lineno} {function}")
            return original(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "cpu", "__bool__"):  # each waits for the device
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    # A plain progress line reads the loss once a --log-every-seconds (not a step): none in this run.
    args = [*FAST, "--batch-size", "2", "--data", str(data), "--output-dir", str(tmp_path / "run"),
            "--log-every-seconds", "3600"]
    with contextlib.redirect_stdout(io.StringIO()):
        history = train.main(args).history
    steps = 30
    assert history[0]["train_loss"] > 0
    # Evaluation copies its predictions back once, and their figures are read from those copies:
    # about ten reads an epoch, whatever its steps.
    eval_reads = [r for r in reads if r.endswith((" evaluate", " accuracy", " mean_loss"))]
    assert len(eval_reads) <= 12, eval_reads
    # The tracker's points (one every step by default here) are read back together, once per sync step.
    tracker_reads = [r for r in reads if "tracking.py" in r]
    assert 0 < len(tracker_reads) <= steps // SYNC_EVERY_STEPS + 1, tracker_reads
    # The first step, every 10th step and the epoch's end read a few values each: well under one a step.
    step_reads = [r for r in reads if r not in eval_reads and r not in tracker_reads]
    assert 0 < len(step_reads) < steps // 4, reads  # 5 here; 48 when every step checked the loss
