"""The typed training configuration: the single source of defaults.

Precedence, lowest first: the dataclass defaults, an optional ``--config run.yaml``, then flags.
Flag names are the field names with dashes (``batch_size`` -> ``--batch-size``); YAML keys may
use either spelling. A YAML value is accepted wherever it means what the flag would: ``lr: 1e-3``
(PyYAML reads a string), ``image_size: 64.0``, ``freeze: 0.5``, ``mixed_precision: no`` (a YAML
boolean), ``data: ~/data``. Unknown keys and values that cannot be meant are errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from finetune.errors import UserError, first_line
from finetune.utils.files import atomic_write_text

PRECISIONS = ("auto", "no", "bf16", "fp16")
# The names optim.OPTIMIZERS knows (a test keeps them equal): this module stays free of torch, so
# that --help and a bad flag answer before torch's seconds of import.
OPTIMIZERS = ("sgd", "adamw")
BAD_DATA_POLICIES = ("fail", "skip")
TRACKERS = ("tensorboard", "wandb", "mlflow", "aim", "none")  # Accelerate's names (finetune.report.tracking)
AUGMENTS = ("auto", "classic", "mild", "crop", "flip", "none")  # presets.train_preset builds each
SCHEDULES = ("cosine", "constant")  # optim.lr_factor
TASKS = ("auto", "single", "multilabel")  # labelfiles.choose_task
# The columns of a label file (finetune.data.labelfiles): flags of train.py and eval.py alike.
LABEL_FILE_HELP = {
    "image_column": "label file: the column of image paths, relative to the file's folder (default: image, path, "
                    "file or filename); Hugging Face dataset: the image column (default: the Image feature's)",
    "label_column": "label file: the column of labels (default: label, labels, class or tags); Hugging Face "
                    "dataset: the default is the ClassLabel column",
    "label_sep": "label file: what joins several labels in the label column (default: the first of ; | , found)",
    "label_columns": "label file: one 0/1 column per class, comma-separated, e.g. cat,dog (default: found where "
                     "every column but the image and split columns holds 0 or 1)",
    "split_column": "label file (or a Hugging Face dataset of one split): the column holding train, val (valid, "
                    "validation) or test (default: split, where there is one; without it a test part is held out "
                    "as for a flat folder)",
}


def option(default: Any, help: str, **extra: Any) -> Any:
    """A configuration field with its ``--help`` text and checks.

    Args:
        default: the default value.
        help: the flag's help text.
        extra: ``choices``; ``minimum``/``maximum`` (inclusive); ``above`` (exclusive lower bound);
            ``auto`` (a value below ``minimum`` that means "choose for me", e.g. -1); ``nargs``
            (a tuple field taking several values after its flag);
            ``false_means`` (what a YAML ``no``/``false`` stands for in a text field);
            ``path`` (expand ``~`` in it).
    """
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Everything a training run needs; see ``--help`` for each field."""

    data: str | None = option(None, "dataset folder holding train/ and test/ (or val/) ImageFolder trees, train/ "
                                  "alone, or one sub-folder per class (a test part is then held out); or a label "
                                  "file (.csv, .tsv, .jsonl, .json) of one row per image; or a Hugging Face dataset: "
                                  "hf:NAME[:CONFIG], a save_to_disk folder, or parquet files; "
                                  "omitted: the built-in offline demo (LFW faces vs not faces)", path=True)
    image_column: str | None = option(None, LABEL_FILE_HELP["image_column"])
    label_column: str | None = option(None, LABEL_FILE_HELP["label_column"])
    label_sep: str | None = option(None, LABEL_FILE_HELP["label_sep"])
    label_columns: str | None = option(None, LABEL_FILE_HELP["label_columns"])
    split_column: str | None = option(None, LABEL_FILE_HELP["split_column"])
    task: str = option("auto", "single (one class per image, softmax), multilabel (any number of labels per image, "
                               "sigmoid outputs and binary cross-entropy), or auto: multilabel where a label file "
                               "gives an image several labels or has one 0/1 column per class", choices=TASKS)
    val_fraction: float = option(0.0, "share of each training class held out for validation, which then chooses "
                                      "best.safetensors (0: none; a val/ folder beside test/ is used without it)",
                                 minimum=0)
    test_fraction: float = option(0.2, "share of each class held out as the test part, where the data has no "
                                       "test/ (or val/) folder", above=0)
    split_seed: int = option(0, "which files --val-fraction and --test-fraction hold out (independent of --seed)",
                             minimum=0, maximum=2**32 - 1)
    model: str = option("mobilenet_v2", "any torchvision classification model name (resnet18, efficientnet_b0, "
                                        "convnext_tiny, vit_b_16, ...), or a timm model as timm/NAME")
    weights: str = option("IMAGENET1K_V1", "torchvision weights name (IMAGENET1K_V1, DEFAULT, ...), "
                                         "a local .pth/.safetensors file, or 'none' to train from scratch; for "
                                         "timm/NAME, DEFAULT (or the default) is the weights the name's tag picks",
                           path=True, false_means="none")
    epochs: int = option(5, "passes over the training set", minimum=1)
    batch_size: int = option(32, "images per process per step (global batch = this x processes x accumulation)", minimum=1)
    lr: float | None = option(None, "learning rate of the pretrained backbone (the new head gets lr x lr-head-mult; "
                                    "default: by the optimizer, 3e-4 for adamw (1e-3 for crops under 64 px), 0.001 for sgd)", above=0)
    lr_head_mult: float = option(10.0, "learning-rate multiplier of the new output layer (1 when training from scratch)", minimum=0)
    weight_decay: float = option(1e-4, "weight decay (not applied to norm and bias parameters unless --decay-norm-and-bias)", minimum=0)
    decay_norm_and_bias: bool = option(False, "also apply weight decay to norm-layer and bias parameters")
    optimizer: str = option("auto", "adamw, sgd (momentum 0.9, nesterov), or auto (chosen by the recipe: adamw for up "
                                  "to 3 epochs, sgd beyond; see docs/defaults.md)",
                            choices=("auto", *OPTIMIZERS))
    momentum: float = option(0.9, "SGD momentum", minimum=0)
    warmup_epochs: float | None = option(None, "linear learning-rate warmup, in epochs, before the decay "
                                                "(default: chosen by the recipe, see docs/defaults.md)", minimum=0)
    probe_epochs: float | None = option(None, "train only the new head for this many epochs first, then "
                                              "everything (linear probe, then fine-tune; default: chosen by the recipe)",
                                        minimum=0)
    recalibrate_bn_batches: int = option(100, "BatchNorm statistics for each evaluation: exact averages over "
                                              "each epoch's last this many training batches (all of a shorter epoch), "
                                              "gathered as they train (short fine-tunes leave the running averages "
                                              "stale); 0: off",
                                        minimum=0)
    schedule: str = option("cosine", "learning-rate schedule after the warmup: cosine (to 0) or constant",
                           choices=SCHEDULES)
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy loss")
    class_weights: str = option("none", "per-class loss weights: none, or auto (inverse class frequency in the "
                                        "training set, for imbalanced classes)", choices=("none", "auto"),
                                false_means="none")
    freeze: str = option("none", "freeze the lower backbone: 'none', 'backbone' (linear probe: only the head trains), "
                               "a block name such as layer2 or features.7 (frozen up to and including it), "
                               "or a fraction of the blocks such as 0.5", false_means="none")
    augment: str = option("auto", "training augmentation: classic (RandomResizedCrop, area 8-100%%), mild "
                                   "(RandomResizedCrop, area 35-100%%), crop (resize, then a random crop), flip (the "
                                   "eval resize and center crop), none (the eval preprocessing, no flip); each flips "
                                   "horizontally unless --no-hflip; auto: chosen by the recipe", choices=AUGMENTS)
    hflip: bool = option(True, "flip training images horizontally at random (with every --augment but none)")
    cache_features: bool = option(True, "with --freeze backbone and --augment none, compute the backbone's "
                                        "features once and train the head on them")
    reuse_classifier: bool = option(True, "initialise head rows of classes whose names match a pretrained category "
                                        "from that category's row")
    image_size: int = option(224, "training crop size in pixels (eval resizes to size*256/224, then center-crops)", minimum=1)
    seed: int = option(0, "random seed, 0 to 2**32-1; a CPU run with the same seed is reproducible bit for bit",
                       minimum=0, maximum=2**32 - 1)
    output_dir: str | None = option(None, "run folder (model.safetensors is written in it); default runs/MODEL-DATA",
                                    path=True)
    resume: bool = option(False, "continue the run in --output-dir from its latest saved state")
    overwrite: bool = option(False, "replace the run already in --output-dir (without it such a folder is refused)")
    save_every: int = option(0, "also save a resumable state every N optimizer steps (0: at each epoch end only)", minimum=0)
    mixed_precision: str = option("auto", "auto (bf16 where the hardware runs it fast, else fp32), no, bf16, fp16; "
                                        "accelerate launch --mixed_precision also works",
                                choices=PRECISIONS, false_means="no")
    grad_accum_steps: int = option(1, "gradient accumulation steps per optimizer step", minimum=1)
    num_workers: int = option(-1, "data-loading worker processes per process (-1: matched to the CPU cores)",
                              minimum=0, auto=-1)
    threads: int = option(-1, "CPU compute threads per process (-1: the cores shared among this machine's "
                              "processes, whatever OMP_NUM_THREADS says)", minimum=1, auto=-1)
    compile: bool = option(False, "torch.compile the model (inductor): pays for its compile time only on long "
                                  "runs; see bench/compile_speed.py")
    channels_last: bool = option(True, "use the channels-last memory format (faster convolutions)")
    cpu: bool = option(False, "run on the CPU even where a GPU is visible (without it, GPUs that CUDA cannot "
                              "start stop the run)")
    check_data: bool = option(False, "check the dataset thoroughly (decode every image, find train/test duplicates), "
                                     "print a report and exit")
    bad_data: str = option("fail", "what to do with images that cannot be decoded, found before the run or during "
                                   "it: fail or skip (and name them)",
                         choices=BAD_DATA_POLICIES)
    log_with: str = option("tensorboard", "experiment tracker, through Accelerate: tensorboard (under RUN/logs/), "
                                        "wandb, mlflow, aim or none", choices=TRACKERS)
    log_every_steps: int = option(0, "optimizer steps between train-loss, learning-rate and images/s points "
                                     "(0: about 50 points an epoch)", minimum=0)
    log_every_seconds: float = option(60.0, "when output is not a terminal (a pipe, a SLURM log), print a "
                                            "progress line this often within an epoch", minimum=0)
    plots: bool = option(True, "draw samples.png and curves.png in the run folder (and send them to TensorBoard)")

    def __post_init__(self) -> None:
        check_values(self)
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.test_fraction >= 1 or self.val_fraction >= 1:
            raise UserError("--test-fraction and --val-fraction must be below 1, got "
                            f"{self.test_fraction} and {self.val_fraction}")
        if self.resume and self.overwrite:
            raise UserError("--resume continues the run in the output folder and --overwrite replaces it: "
                            "choose one")


def check_values(config: Any) -> None:
    """Each field's checks (see ``option``), and ``~`` expanded in paths; a UserError names the flag."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        meta = f.metadata
        flag = f"--{_flag(f.name)}"
        if meta.get("path") and isinstance(value, str):
            setattr(config, f.name, os.path.expanduser(value))
        if meta.get("choices") and value not in meta["choices"]:
            raise UserError(f"{flag} must be one of {', '.join(meta['choices'])}, got {value!r}")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, got {value}")
        minimum, maximum, above, auto = (meta.get(k) for k in ("minimum", "maximum", "above", "auto"))
        if auto is not None and value == auto:
            continue
        if above is not None and value <= above:
            raise UserError(f"{flag} must be greater than {above}, got {value}")
        if minimum is not None and value < minimum:
            bound = "not be negative" if minimum == 0 else f"be at least {minimum}"
            if auto is not None:
                bound = f"be {auto} (automatic) or {'0 or more' if minimum == 0 else f'at least {minimum}'}"
            raise UserError(f"{flag} must {bound}, got {value}")
        if maximum is not None and value > maximum:
            raise UserError(f"{flag} must be at most {maximum}, got {value}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _field_type(cls: type, name: str) -> tuple[type, bool]:
    """The base type of a field and whether it may be None."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        base = next(a for a in args if a is not type(None))
        return base, type(None) in args
    return hint, False


def to_int(value: Any) -> int:
    """A whole number from what a user may write for one: ``64``, ``64.0``, ``"64"``, ``"1e3"``.

    Raises:
        argparse.ArgumentTypeError: for anything else (argparse reports its message as is).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        number = float(value) if isinstance(value, (float, str)) else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or not number.is_integer():
        raise argparse.ArgumentTypeError(f"must be a whole number, got {value!r}")
    return int(number)


def to_float(value: Any) -> float:
    """A number from an int, a float or text such as ``"1e-3"`` (which PyYAML leaves as a string).

    Raises:
        argparse.ArgumentTypeError: for anything else.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise argparse.ArgumentTypeError(f"must be a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {value!r}") from None


PARSERS = {int: to_int, float: to_float}


def _coerce(cls: type, name: str, value: Any, where: str) -> Any:
    """A YAML value as the field's type, accepting what means the same as the flag would."""
    base, nullable = _field_type(cls, name)
    meta = next(f.metadata for f in dataclasses.fields(cls) if f.name == name)
    if value is None:
        if nullable:
            return None
        raise UserError(f"{where}: '{name}' may not be empty")
    if base in PARSERS:
        try:
            return PARSERS[base](value)
        except argparse.ArgumentTypeError as err:
            raise UserError(f"{where}: '{name}' {err}") from None
    if base is str:
        if isinstance(value, os.PathLike):  # finetune.train(data=Path(...))
            return os.fspath(value)
        if value is False and meta.get("false_means"):  # YAML 1.1 reads no/off/false as False
            return meta["false_means"]
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # freeze: 0.5
            return str(value)
        if isinstance(value, str):
            return value
        hint = " (YAML reads yes/no/on/off as true/false: quote the value)" if isinstance(value, bool) else ""
        raise UserError(f"{where}: '{name}' must be text, got {value!r}{hint}")
    if not isinstance(value, base):
        raise UserError(f"{where}: '{name}' must be {'true or false' if base is bool else base.__name__}, got {value!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, except that a bad flag is a UserError (one line) rather than usage text and exit."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(message)


def build_parser(cls: type = TrainConfig, description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of ``cls`` and ``--config FILE``.

    Every flag defaults to ``argparse.SUPPRESS`` so that only flags given on the command line
    override the YAML file and the dataclass defaults.
    """
    parser = _Parser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="YAML", help="YAML file of settings (flags override it)")
    defaults = cls()
    for f in dataclasses.fields(cls):
        if f.metadata.get("positional"):  # a tuple of strings given after the flags, e.g. predict.py's inputs
            parser.add_argument(f.name, nargs="*", help=f.metadata.get("help", ""), metavar=f.name.upper())
            continue
        base, nullable = _field_type(cls, f.name)
        help_text = f.metadata.get("help", "")
        default = getattr(defaults, f.name)
        if default is not None and "default" not in help_text:  # a help text may say it in words
            help_text += f" (default: {default})"
        flag = f"--{_flag(f.name)}"
        if f.metadata.get("nargs"):  # a list of strings after one flag, e.g. export.py's --check-images
            parser.add_argument(flag, dest=f.name, nargs=f.metadata["nargs"], help=help_text, metavar="PATH")
        elif base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=PARSERS.get(base, base), help=help_text,
                                choices=f.metadata.get("choices"), metavar=f.name.upper())
    return parser


def read_yaml(path: str | Path, cls: type = TrainConfig) -> dict[str, Any]:
    """Settings from a YAML mapping, keys normalised to field names; unknown keys are errors."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"cannot read config file {path}: {first_line(err)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping of settings, not {type(raw).__name__}")
    return settings_from(raw, cls, f"config file {path}")


def settings_from(raw: dict[Any, Any], cls: type = TrainConfig, where: str = "settings") -> dict[str, Any]:
    """Settings from a mapping (a YAML file's, or keyword arguments), keys normalised to field
    names and values read as the flags would read them; an unknown key is a UserError that names
    the closest field."""
    known = [f.name for f in dataclasses.fields(cls)]
    settings = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"{where}: unknown setting '{key}'{hint}")
        settings[name] = _coerce(cls, name, value, where)
    return settings


def parse_config(argv: Sequence[str] | None = None, cls: type = TrainConfig, description: str = "") -> Any:
    """Resolve a configuration from defaults, an optional YAML file and command-line flags.

    Args:
        argv: command-line arguments (``None``: ``sys.argv[1:]``).
        cls: the configuration dataclass.
        description: the ``--help`` text.
    """
    parser = build_parser(cls, description)
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config", None)
    settings = read_yaml(config_file, cls) if config_file else {}
    settings.update(args)
    return cls(**settings)


def save_yaml(config: Any, path: str | Path) -> None:
    """Write the resolved configuration as YAML (atomically)."""
    atomic_write_text(Path(path), yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
