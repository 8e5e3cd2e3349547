"""Parameter groups, optimizers and the warmup + cosine schedule, as plain functions."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch
from torch import nn

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
              nn.modules.instancenorm._InstanceNorm)


def _no_decay_names(model: nn.Module) -> set[str]:
    """Names of bias and normalisation parameters (and ViT/Swin embeddings, which are 1-D or tokens),
    and of what the model itself says to leave undecayed (timm's ``no_weight_decay()``: position
    embeddings, class tokens)."""
    names = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, NORM_TYPES) or param.ndim <= 1 or param_name == "bias":
                names.add(full)
    return names


def param_groups(model: nn.Module, head: str, lr: float, lr_head_mult: float, weight_decay: float,
                 decay_norm_and_bias: bool = False) -> list[dict[str, Any]]:
    """Optimizer parameter groups: backbone and head, each split into decayed and not decayed.

    Only trainable parameters are included; empty groups are dropped. Each group carries
    ``name`` and ``lr_scale`` (its multiple of ``lr``) for logging and schedules.

    Args:
        model: the classifier.
        head: dotted name of its output layer (``surgery.find_head``).
        lr: learning rate of the backbone.
        lr_head_mult: the head's learning rate is ``lr * lr_head_mult``.
        weight_decay: decay of weight matrices and kernels.
        decay_norm_and_bias: also decay norm-layer and bias parameters.
    """
    no_decay = set() if decay_norm_and_bias else _no_decay_names(model)
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "head" if name == head or name.startswith(f"{head}.") else "backbone"
        buckets.setdefault((part, name not in no_decay), []).append(param)
    groups = []
    for part in ("backbone", "head"):
        scale = lr_head_mult if part == "head" else 1.0
        for decay in (True, False):
            params = buckets.get((part, decay))
            if params:
                groups.append({"params": params, "name": f"{part}{'' if decay else '_no_decay'}",
                               "lr": lr * scale, "lr_scale": scale,
                               "weight_decay": weight_decay if decay else 0.0})
    return groups


# Where torch has fused optimizer kernels that this project has run (CPU here, CUDA on the lent GPU).
FUSED_DEVICES = ("cpu", "cuda")


def _sgd(groups: list[dict[str, Any]], lr: float, momentum: float, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0, fused=fused)


def _adamw(groups: list[dict[str, Any]], lr: float, momentum: float, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"sgd": _sgd, "adamw": _adamw}


def build_optimizer(name: str, groups: list[dict[str, Any]], lr: float, momentum: float = 0.9,
                    device: str | torch.device = "cpu", mixed_precision: str = "no") -> torch.optim.Optimizer:
    """The optimizer ``name`` (``sgd`` or ``adamw``) over ``groups``; per-group lr and decay are kept.

    Fused where the parameters will live on ``device`` (the run's, which they may not be on yet) and
    it has a fused kernel: one kernel updates every parameter, where the default makes several
    passes through memory (AdamW's step on resnet18: 34 against 7 ms on 2 CPU cores, 0.5 s of a
    3-epoch run). The two agree to rounding. Not with fp16's loss scaler: a fused optimizer skips
    an overflowing step inside its kernel, where Accelerate learns of a skipped step (for the
    schedule, and for the run's stop after too many) from the scaler not calling it.
    """
    params = [p for group in groups for p in group["params"]]
    fused = (torch.device(device).type in FUSED_DEVICES and mixed_precision != "fp16"
             and all(p.is_floating_point() for p in params))
    return OPTIMIZERS[name](groups, lr, momentum, fused)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor at optimizer step ``step``: linear warmup from ~0 to 1, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def lr_factor(step: int, *, part: str, warmup_steps: int, total_steps: int, probe_steps: int = 0,
              schedule: str = "cosine") -> float:
    """Learning-rate factor of one param group (``part``: ``backbone`` or ``head``) at ``step``.

    With ``probe_steps`` (linear probe, then fine-tune: LP-FT), the backbone stands still for the
    first ``probe_steps`` while the head trains at its full rate; then every group warms up again
    and decays over the remaining steps, so the backbone starts moving under a trained head
    rather than a random one, whose large early gradients distort the pretrained features.

    Args:
        step: optimizer steps taken so far.
        part: which group (``param_groups`` names start with it).
        warmup_steps: linear warmup of the (fine-tuning) phase.
        total_steps: optimizer steps of the whole run.
        probe_steps: steps of the head-only phase at the start.
        schedule: ``cosine`` (warmup then cosine to 0) or ``constant`` (warmup then flat).
    """
    if step < probe_steps:
        return 1.0 if part == "head" else 0.0
    step, total_steps = step - probe_steps, total_steps - probe_steps
    if schedule == "constant":
        return (step + 1) / (warmup_steps + 1) if step < warmup_steps else 1.0
    return warmup_cosine(step, warmup_steps, total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, probe_steps: int = 0,
                    schedule: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying ``lr_factor`` to every group's own learning rate (see ``lr_factor``)."""
    parts = ["head" if str(g.get("name", "")).startswith("head") else "backbone" for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [
        functools.partial(lr_factor, part=part, warmup_steps=warmup_steps, total_steps=total_steps,
                          probe_steps=probe_steps, schedule=schedule) for part in parts])
