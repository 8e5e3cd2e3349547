"""Model surgery as plain functions on ``nn.Module``: head replacement, classifier-row reuse, freezing.

Nothing here knows about Accelerate, devices or precision.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import nn

# Where each torchvision family keeps its output layer. A container found here is searched
# from its end for the last Linear/Conv2d (e.g. MobileNet's classifier[-1], SqueezeNet's conv).
HEAD_ATTRIBUTES = ("fc", "classifier", "heads", "head")
# Containers whose children are the backbone's blocks (ResNets have their blocks at top level).
BLOCK_CONTAINERS = ("features", "layers", "trunk_output", "encoder", "blocks")


def find_head(model: nn.Module) -> str:
    """Dotted name of the model's output layer (a Linear, or SqueezeNet's 1x1 Conv2d).

    Raises:
        ValueError: if the model has none of the known head attributes.
    """
    if _is_timm(model):  # timm says where its classifier is
        head = model.get_classifier()
        name = next((n for n, m in model.named_modules() if m is head and n), None)
        if name is not None and isinstance(head, (nn.Linear, nn.Conv2d)):
            return name
    for attr in HEAD_ATTRIBUTES:
        module = getattr(model, attr, None)
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            return attr
        if isinstance(module, nn.Module):
            layers = [(n, m) for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
            if layers:
                return f"{attr}.{layers[-1][0]}"
    raise ValueError(f"cannot find the output layer of {type(model).__name__}")


def replace_head(model: nn.Module, num_classes: int, reuse: dict[int, int] | None = None) -> nn.Module:
    """Replace the output layer by one with ``num_classes`` outputs, xavier-uniform, bias zero.

    Args:
        model: a torchvision classifier; changed in place and returned.
        num_classes: outputs of the new layer.
        reuse: new class index -> row of the old layer whose weights and bias it starts from.
    """
    name = find_head(model)
    old = model.get_submodule(name)
    if _is_timm(model):  # timm's own replacement keeps its head's structure (pooling, pre-logits)
        model.reset_classifier(num_classes)
        new = model.get_submodule(find_head(model))
        _init_rows(new, old, reuse)
        return model
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,
                        bias=old.bias is not None)
    _init_rows(new, old, reuse)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model


def _init_rows(new: nn.Module, old: nn.Module, reuse: dict[int, int] | None) -> None:
    """xavier-uniform weights and zero bias, then the reused rows copied from ``old``."""
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    nn.init.xavier_uniform_(new.weight)
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    with torch.no_grad():
        for target, source in (reuse or {}).items():
            new.weight[target] = old.weight[source].reshape(new.weight[target].shape)
            if new.bias is not None and old.bias is not None:
                new.bias[target] = old.bias[source]


def _is_timm(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("get_classifier", "reset_classifier", "pretrained_cfg"))


def _normalise(label: str) -> str:
    return re.sub(r"[\s_\-]+", "", label).casefold()


def match_classes(targets: Sequence[str], categories: Sequence[str]) -> dict[int, int]:
    """Map target class index -> source category index where the names match.

    Matching ignores case, spaces, underscores and hyphens (``hotdog`` ~ ``hot dog``); a name
    listed twice among the categories maps to its first occurrence.
    """
    index: dict[str, int] = {}
    for i, name in enumerate(categories):
        index.setdefault(_normalise(name), i)
    return {t: index[_normalise(name)] for t, name in enumerate(targets) if _normalise(name) in index}


def backbone_blocks(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """The backbone as an ordered list of (block name, parameters), input side first.

    Blocks are the top-level children that hold parameters, with containers such as
    ``features`` or ``encoder.layers`` expanded into their children, and the container that
    holds the head expanded around it. Parameters that sit outside any block (ViT's class token
    and position embedding) belong to the first block. The head itself is not a block.
    """
    head = find_head(model)
    if _is_timm(model) and hasattr(model, "group_matcher"):
        return _timm_blocks(model, head)
    blocks: list[tuple[str, list[nn.Parameter]]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full == head:
                continue
            if name in BLOCK_CONTAINERS or head.startswith(f"{full}."):
                visit(f"{full}.", child)
            elif any(True for _ in child.parameters()):
                blocks.append((full, list(child.parameters())))

    visit("", model)
    in_blocks = {id(p) for _, params in blocks for p in params}
    head_params = {id(p) for p in model.get_submodule(head).parameters()}
    loose = [p for p in model.parameters() if id(p) not in in_blocks and id(p) not in head_params]
    if loose and blocks:
        blocks[0] = (blocks[0][0], loose + blocks[0][1])
    return blocks


def _timm_blocks(model: nn.Module, head: str) -> list[tuple[str, list[nn.Parameter]]]:
    """timm's own coarse stage grouping (``group_matcher``), input side first, without the head.

    A block is named by the module path its parameters share, two levels at most (``stages.1``,
    ``blocks.3``), else ``group0``, ``group1``, ... (stems that mix several top-level modules).
    """
    from timm.models import group_parameters  # timm is needed only for timm models

    params = dict(model.named_parameters())
    blocks = []
    for number, names in enumerate(group_parameters(model, model.group_matcher(coarse=True)).values()):
        names = [n for n in names if n != head and not n.startswith(f"{head}.")]
        if names:
            prefix = _common_module(names)
            blocks.append((prefix or f"group{number}", [params[n] for n in names]))
    return blocks


def _common_module(names: Sequence[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common[:2])


def freeze(model: nn.Module, spec: str) -> list[str]:
    """Freeze the lower backbone; return the names of the frozen blocks.

    Args:
        model: the classifier (with its new head); changed in place.
        spec: ``none``; ``backbone`` (all but the head: a linear probe); a block name (freeze it
            and every block before it); or a fraction in (0, 1] of the blocks, from the input side.

    Raises:
        ValueError: naming the valid block names, for a spec that matches nothing.
    """
    blocks = backbone_blocks(model)
    names = [n for n, _ in blocks]
    spec = spec.strip()
    if spec.lower() == "none":
        count = 0
    elif spec.lower() == "backbone":
        count = len(blocks)
    elif spec in names:
        count = names.index(spec) + 1
    else:
        try:
            fraction = float(spec)
        except ValueError:
            raise ValueError(f"--freeze '{spec}' is not none, backbone, a fraction or a block name "
                             f"({', '.join(names)})") from None
        if not 0 <= fraction <= 1:
            raise ValueError(f"--freeze fraction must be between 0 and 1, got {spec}")
        count = round(fraction * len(blocks))
    for _, params in blocks[:count]:
        for p in params:
            p.requires_grad_(False)
    return names[:count]


def set_frozen_eval(model: nn.Module) -> None:
    """Put every module whose parameters are all frozen in eval mode, with all it holds.

    A frozen block should compute what it computed when pretrained: BatchNorm keeps its running
    statistics, and dropout and stochastic depth inside it are off, so that a probe trained
    through the frozen backbone sees the same clean features as one trained on cached features.
    A dropout that sits with the trainable head (its container holds trainable parameters) stays
    on. Call this after every ``model.train()``.
    """
    for module in model.modules():
        if module.training:
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()  # the whole sub-tree: its own modules come later in modules(), already off
