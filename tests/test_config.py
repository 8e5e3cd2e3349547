from pathlib import Path

import pytest
import yaml

from finetune.config import TrainConfig, parse_config, save_yaml
from finetune.errors import UserError


def test_defaults_come_from_the_dataclass():
    assert parse_config([]) == TrainConfig()


def test_contract_flags_parse_to_fields():
    config = parse_config(["--data", "d", "--model", "resnet18", "--weights", "DEFAULT", "--epochs", "3",
                           "--batch-size", "16", "--lr", "0.02", "--lr-head-mult", "5", "--weight-decay", "0",
                           "--optimizer", "adamw", "--freeze", "layer2", "--image-size", "96", "--seed", "7",
                           "--output-dir", "out", "--resume", "--save-every", "10", "--mixed-precision", "bf16"])
    assert (config.data, config.model, config.weights, config.epochs, config.batch_size) == ("d", "resnet18", "DEFAULT", 3, 16)
    assert (config.lr, config.lr_head_mult, config.weight_decay, config.optimizer) == (0.02, 5.0, 0.0, "adamw")
    assert (config.freeze, config.image_size, config.seed, config.output_dir) == ("layer2", 96, 7, "out")
    assert (config.resume, config.save_every, config.mixed_precision) == (True, 10, "bf16")


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 7\nbatch-size: 4\nlr: 1\n")
    config = parse_config(["--config", str(path), "--epochs", "2"])
    assert (config.epochs, config.batch_size, config.lr) == (2, 4, 1.0)


@pytest.mark.parametrize("text, message", [
    ("epoch: 3\n", "unknown setting 'epoch'"),
    ("epochs: three\n", "'epochs' must be a whole number, got 'three'"),
    ("- 1\n- 2\n", "must hold a mapping"),
    ("optimizer: rmsprop\n", "--optimizer must be one of auto, sgd, adamw"),
])
def test_bad_yaml_is_one_clear_error(tmp_path: Path, text: str, message: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        parse_config(["--config", str(path)])


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--lr", "-1"], "--lr must be greater than 0"),
    (["--weight-decay", "-1"], "--weight-decay must not be negative"),
    (["--config", "/nonexistent.yaml"], "config file not found"),
    (["--seed", "-1"], "--seed must not be negative"),
    (["--seed", str(2**32)], "--seed must be at most 4294967295"),  # numpy's seeds stop there
])
def test_bad_flags_are_one_clear_error(argv, message):
    with pytest.raises(UserError, match=message):
        parse_config(argv)


def test_saved_yaml_round_trips(tmp_path: Path):
    config = parse_config(["--epochs", "3", "--freeze", "0.5"])
    save_yaml(config, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["freeze"] == "0.5"
    assert parse_config(["--config", str(tmp_path / "config.yaml")]) == config


def test_yaml_values_as_people_write_them(tmp_path: Path, monkeypatch):
    """PyYAML reads 1e-3 as text, no as false, 0.5 as a number: each means what the flag would."""
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\nweight_decay: 5e-4\nfreeze: 0.5\nmixed_precision: no\nimage_size: 64.0\n"
                    "data: ~/data\noutput_dir: ~/runs/x\nepochs: '3'\n")
    config = parse_config(["--config", str(path)])
    assert (config.lr, config.weight_decay, config.freeze, config.mixed_precision) == (1e-3, 5e-4, "0.5", "no")
    assert (config.image_size, config.epochs) == (64, 3) and isinstance(config.image_size, int)
    assert (config.data, config.output_dir) == (str(tmp_path / "data"), str(tmp_path / "runs/x"))
    # The same values as flags: a flag and a YAML key mean the same.
    assert parse_config(["--lr", "1e-3", "--weight-decay", "5e-4", "--freeze", "0.5", "--mixed-precision", "no",
                         "--image-size", "64.0", "--data", "~/data", "--output-dir", "~/runs/x",
                         "--epochs", "3"]) == config


@pytest.mark.parametrize("text, message", [
    ("image_size: 64.5\n", "'image_size' must be a whole number, got 64.5"),
    ("lr: fast\n", "'lr' must be a number, got 'fast'"),
    ("mixed_precision: yes\n", "quote the value"),
    ("resume: maybe\n", "'resume' must be true or false"),
    ("freeze: [1, 2]\n", "'freeze' must be text"),
    ("lr: .nan\n", "--lr must be a finite number"),
])
def test_yaml_values_that_cannot_be_meant_are_refused(tmp_path: Path, text: str, message: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        parse_config(["--config", str(path)])


@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], "--seed must not be negative, got -1"),
    (["--seed", str(2**32)], "--seed must be at most 4294967295"),
    (["--lr", "0"], "--lr must be greater than 0"),
    (["--num-workers", "-5"], r"--num-workers must be -1 \(automatic\) or 0 or more, got -5"),
    (["--threads", "0"], r"--threads must be -1 \(automatic\) or at least 1, got 0"),
    (["--image-size", "64.5"], "argument --image-size: must be a whole number"),
])
def test_values_that_cannot_be_meant_are_one_clear_error(argv, message):
    with pytest.raises(UserError, match=message):
        parse_config(argv)


def test_automatic_values_and_largest_seed_are_accepted():
    config = parse_config(["--num-workers", "-1", "--threads", "-1", "--seed", str(2**32 - 1), "--num-workers", "0"])
    assert (config.num_workers, config.threads, config.seed) == (0, -1, 2**32 - 1)


def test_help_says_each_default_once():
    from finetune.commands.eval import EvalConfig
    from finetune.config import build_parser

    text = build_parser(EvalConfig).format_help()
    assert "(default: None)" not in text and "eval/ beside the" in text
    assert "(default: 64)" in text  # --batch-size still shows its default


def test_optimizer_choices_are_the_ones_optim_knows():
    from finetune.config import OPTIMIZERS
    from finetune.training import optim

    assert set(OPTIMIZERS) == set(optim.OPTIMIZERS)


@pytest.mark.parametrize("script", ["train.py", "eval.py", "predict.py", "export.py"])
def test_help_and_bad_flags_answer_before_torch_is_imported(script):
    """--help used to take seconds: torch was imported before argparse ran."""
    import subprocess
    import sys

    from conftest import ROOT

    probe = (f"import sys; sys.argv = [{script!r}, '--help']; sys.path.insert(0, {str(ROOT)!r}); "
             f"import runpy\ntry: runpy.run_path({str(ROOT / script)!r}, run_name='__main__')\n"
             "except SystemExit: pass\nprint('torch imported:', 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "usage:" in proc.stdout and "torch imported: False" in proc.stdout, proc.stdout + proc.stderr
