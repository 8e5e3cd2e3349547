"""The Python API: ``finetune.train`` builds its configuration directly (no command line in
between) and says what is wrong in the commands' one-line messages."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import finetune
from finetune import api
from finetune.config import TrainConfig
from finetune.errors import UserError
from finetune.training import run


def test_an_unknown_keyword_is_a_user_error_naming_the_closest_field():
    with pytest.raises(UserError, match=r"finetune.train\(\): unknown setting 'learning_rate'"):
        finetune.train(learning_rate=0.1)
    with pytest.raises(UserError, match="did you mean 'batch_size'"):
        finetune.train(batchsize=8)


def test_keywords_are_read_as_the_flags_read_them_and_replace_a_config(monkeypatch):
    seen = []
    monkeypatch.setattr(api, "run_training", lambda config: seen.append(config) or "done")
    assert finetune.train(lr="1e-3", image_size=64.0, data=Path("~/d"), mixed_precision=False) == "done"
    assert (seen[0].lr, seen[0].image_size, seen[0].mixed_precision) == (1e-3, 64, "no")
    assert seen[0].data == str(Path("~/d").expanduser())
    base = TrainConfig(epochs=3, model="resnet18")
    finetune.train(base, epochs=1)
    assert (seen[1].epochs, seen[1].model, base.epochs) == (1, "resnet18", 3)
    with pytest.raises(UserError, match="--batch-size must be at least 1"):
        finetune.train(base, batch_size=0)


def test_the_api_is_the_run_itself_not_a_command_line():
    source = inspect.getsource(api) + inspect.getsource(run)
    assert "argv" not in source and "parse_config" not in source
    assert finetune.TrainConfig is TrainConfig and finetune.TrainResult is run.TrainResult


def test_the_summary_names_the_eval_command_the_user_has(monkeypatch):
    from finetune.commands import train as train_cmd

    monkeypatch.setattr("sys.argv", ["/venv/bin/finetune-train", "--data", "D"])
    assert train_cmd._command("eval") == "finetune-eval"
    monkeypatch.setattr("sys.argv", ["train.py", "--data", "D"])
    assert train_cmd._command("eval") == "python eval.py"
    result = run.TrainResult(Path("runs/r"), [{"epoch": 1, "test_acc": 1.0}], ["a", "b"], Path("D/test"))
    assert train_cmd.summary(result, "finetune-eval") == (
        "saved runs/r/model.safetensors (test accuracy 1.0000); evaluate it with:\n"
        "  finetune-eval --ckpt runs/r/model.safetensors --data D/test")
