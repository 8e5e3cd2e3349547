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
    ("epochs: three\n", "'epochs' must be int"),
    ("- 1\n- 2\n", "must hold a mapping"),
    ("optimizer: rmsprop\n", "--optimizer must be one of sgd, adamw"),
])
def test_bad_yaml_is_one_clear_error(tmp_path: Path, text: str, message: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        parse_config(["--config", str(path)])


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--lr", "-1"], "--lr must not be negative"),
    (["--config", "/nonexistent.yaml"], "config file not found"),
])
def test_bad_flags_are_one_clear_error(argv, message):
    with pytest.raises(UserError, match=message):
        parse_config(argv)


def test_saved_yaml_round_trips(tmp_path: Path):
    config = parse_config(["--epochs", "3", "--freeze", "0.5"])
    save_yaml(config, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["freeze"] == "0.5"
    assert parse_config(["--config", str(tmp_path / "config.yaml")]) == config
