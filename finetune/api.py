"""The Python API for notebooks: ``finetune.train(...)``; ``finetune.load_classifier`` is
``models.inference.load_classifier``."""

from __future__ import annotations

import dataclasses
from typing import Any

from finetune.config import TrainConfig, settings_from
from finetune.training.run import TrainResult
from finetune.training.run import train as run_training

__all__ = ["TrainConfig", "TrainResult", "train"]


def train(config: TrainConfig | None = None, /, **fields: Any) -> TrainResult:
    """Fine-tune as ``train.py`` does, from a configuration or its fields as keywords.

        run = finetune.train(data="DATA", model="resnet18", weights="DEFAULT", epochs=5)
        run = finetune.train(TrainConfig(data="DATA", epochs=5), lr=1e-3)
        clf = finetune.load_classifier(run.run_dir)

    Args:
        config: a ``TrainConfig``; omitted: the defaults.
        **fields: fields of ``TrainConfig`` (a flag's name with underscores: ``batch_size=64``,
            ``mixed_precision="no"``) that replace the config's; values are read and checked as
            the flags and a YAML file's are (``lr="1e-3"`` and ``image_size=64.0`` are accepted).

    Returns:
        The run's folder, its per-epoch history, the classes and the trained model.

    Raises:
        UserError: an unknown field (naming the closest), bad values or bad data, with the same
            one-line message the command prints.
        Stopped: on SIGTERM, SIGINT or SIGUSR1, after saving a resumable state.
    """
    settings = settings_from(fields, TrainConfig, "finetune.train()")
    config = dataclasses.replace(config, **settings) if config is not None else TrainConfig(**settings)
    return run_training(config)
