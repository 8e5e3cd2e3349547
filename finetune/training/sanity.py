"""Before any work: whether a run can do what was asked, and what is probably a mistake.

What cannot work is a UserError (one line, exit 2) before the dataset is scanned or anything is
written; what is probably a mistake comes back as a warning for the run to print.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torchvision.models import get_model_weights

from finetune.errors import UserError, first_line
from finetune.models.build import shape_model


def _min_size_hint(model: str) -> str:
    try:
        sizes = [w.meta.get("min_size") for w in get_model_weights(model)]
    except (ValueError, KeyError):
        return ""
    sizes = [s for s in sizes if s]
    return f" (its pretrained weights are documented for at least {min(sizes)[0]} px)" if sizes else ""


def check_model_input(model: str, image_size: int, batch_size: int, freeze_spec: str = "none") -> None:
    """Refuse an input size the model cannot take, and a batch of one its BatchNorm cannot train on.

    Runs one training-mode forward pass on shape-only tensors (a fraction of a second): a model
    whose feature maps shrink to nothing, a ViT asked for another size than it was built for, and
    BatchNorm layers that would see a single value per channel all fail here as they would in
    the first step.

    Args:
        model: torchvision model name.
        image_size: the training crop.
        batch_size: images per process per step.
        freeze_spec: ``--freeze``, since frozen BatchNorm layers run on their running statistics.
    """
    net = shape_model(model, image_size, freeze_spec)
    try:
        net(torch.empty(2, 3, image_size, image_size, device="meta"))
    except Exception as err:  # shape errors from any layer: AssertionError, RuntimeError, ValueError
        raise UserError(f"{model} cannot take {image_size}x{image_size} images: {first_line(err)}; "
                        f"use a larger --image-size{_min_size_hint(model)}") from None
    if batch_size == 1:
        try:
            net(torch.empty(1, 3, image_size, image_size, device="meta"))
        except ValueError as err:  # "Expected more than 1 value per channel when training"
            raise UserError(f"--batch-size 1 cannot train {model} at --image-size {image_size}: its BatchNorm "
                            f"layers would see one value per channel ({first_line(err)}); use --batch-size 2 "
                            f"or more, a larger --image-size, or --freeze backbone") from None


def trains_batch_norm(net: nn.Module) -> bool:
    """Whether any BatchNorm layer of ``net`` trains (computes batch statistics) in training mode."""
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters())
            if not params or any(p.requires_grad for p in params):
                return True
    return False


def check_classes(classes: Sequence[str], where: Any) -> None:
    """A classifier needs two classes at least: with one, the loss is 0 and the accuracy 1 from the start."""
    if len(classes) < 2:
        raise UserError(f"{where} has one class ('{classes[0]}'): a classifier needs at least two "
                        "classes" if classes else f"{where} has no classes")


def probable_mistakes(config: Any) -> list[str]:
    """Warnings for settings that run but are probably not what was meant."""
    notes = []
    if config.warmup_epochs is not None and config.warmup_epochs > config.epochs:  # None: the recipe's
        notes.append(f"--warmup-epochs {config.warmup_epochs:g} is longer than the run (--epochs {config.epochs}): "
                     "the learning rate never reaches --lr")
    if config.probe_epochs is not None and config.probe_epochs >= config.epochs:
        notes.append(f"--probe-epochs {config.probe_epochs:g} is the whole run (--epochs {config.epochs}): "
                     "the backbone never trains")
    if config.freeze == "backbone" and str(config.weights).lower() == "none":
        notes.append("--freeze backbone with --weights none trains a linear probe on random features")
    return notes
