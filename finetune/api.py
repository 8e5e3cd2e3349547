"""The Python API for notebooks: ``finetune.train(...)`` (``finetune.load_classifier`` is in
``inference``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config import TrainConfig


@dataclass
class TrainResult:
    """What a run left: its folder (``model.safetensors`` is in it) and one dict per epoch."""

    run_dir: Path
    history: list[dict[str, Any]]


def train(**fields: Any) -> TrainResult:
    """Fine-tune as ``train.py`` does, with the flags as keyword arguments.

        result = finetune.train(data="DATA", model="resnet18", weights="DEFAULT", epochs=5)
        clf = finetune.load_classifier(result.run_dir / "model.safetensors")

    Args:
        **fields: any field of ``TrainConfig`` (a flag's name with underscores: ``batch_size=64``,
            ``mixed_precision="no"``); omitted ones keep their defaults. Values are checked exactly
            as the flags are.

    Raises:
        TypeError: a name that is not a flag.
        UserError: bad values or data, with the same one-line message the command prints.
    """
    from finetune.commands.train import main

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    argv: list[str] = []
    for name, value in fields.items():
        if name not in known:
            raise TypeError(f"train() got an unexpected keyword argument '{name}'")
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        elif value is not None:
            argv += [flag, str(value)]
    result = main(argv)
    return TrainResult(Path(result["run_dir"]), result["history"])
