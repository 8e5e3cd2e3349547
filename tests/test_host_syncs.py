"""The training loop reads values back from the device only every few steps, never every step:
on a GPU each read stalls the queue of work (a host sync)."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import torch

from finetune.commands import train
from conftest import FAST, write_image_folder

LOOP_FILES = ("engine.py", "session.py", "loop.py", "preemption.py")


def test_training_reads_from_the_device_every_few_steps_only(tmp_path: Path, monkeypatch):
    data = tmp_path / "data"
    write_image_folder(data / "train", {"a": 30, "b": 30})
    write_image_folder(data / "test", {"a": 2, "b": 2}, seed=1)
    reads = []

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.endswith(LOOP_FILES):
                reads.append(f"{name} {Path(caller).name}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "cpu", "__bool__"):  # each waits for the device
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    args = [*FAST, "--batch-size", "2", "--data", str(data), "--output-dir", str(tmp_path / "run")]
    with contextlib.redirect_stdout(io.StringIO()):
        history = train.main(args)["history"]
    steps = 30
    assert history[0]["train_loss"] > 0
    # The first step, every 10th step and the epoch's end read a few values each: well under one a step.
    assert 0 < len(reads) < steps // 2, reads  # 11 here; 48 when every step checked the loss
