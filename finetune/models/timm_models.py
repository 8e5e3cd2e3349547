"""timm backbones: ``--model timm/NAME`` (``timm/convnext_tiny.fb_in22k``, ``timm/resnet50.a1_in1k``).

The model comes from ``timm.create_model``; its pretrained config says the mean, std,
interpolation and crop it was trained with. ``--weights`` is ``DEFAULT`` (or the default
``IMAGENET1K_V1``): the pretrained weights the name's tag picks, from the Hugging Face Hub
through timm; a local ``.safetensors``/``.pth`` file; or ``none``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn
from torchvision.models._meta import _IMAGENET_CATEGORIES

from finetune.errors import UserError, first_line
from finetune.models.checkpoint import read_metadata_if_any
from finetune.models.weights import WeightsInfo, load_exactly, load_weights_file, weights_only_loads

PREFIX = "timm/"
HUB_WEIGHTS = ("default", "imagenet1k_v1", "pretrained", "hub")  # all mean: the weights the name's tag picks


def is_timm(model: str) -> bool:
    return model.startswith(PREFIX)


def timm_name(model: str) -> str:
    return model[len(PREFIX):]


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise UserError("timm models need the timm package: pip install timm") from None
    return timm


def check_name(model: str) -> None:
    """A UserError unless ``timm/NAME`` names a timm model (with an optional pretrained tag)."""
    timm = _timm()
    name = timm_name(model)
    if not timm.is_model(name):
        raise UserError(f"unknown timm model '{name}'; see timm.list_models() (e.g. timm/resnet50.a1_in1k, "
                        "timm/convnext_tiny.fb_in22k, timm/vit_small_patch16_224.augreg_in21k_ft_in1k)")


def _create(name: str, image_size: int | None, **kwargs: Any) -> nn.Module:
    """``timm.create_model``; models built for one input size (ViT, Swin, ...) are built for
    ``image_size`` where it differs (timm resamples pretrained position embeddings)."""
    timm = _timm()
    default = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    default_size = (getattr(default, "input_size", None) or (3, 224, 224))[-1] if default else 224
    if image_size is not None and image_size != default_size:
        try:
            return timm.create_model(name, img_size=image_size, **kwargs)
        except TypeError:  # a model of any input size: it takes no img_size
            pass
    return timm.create_model(name, **kwargs)


def build_pretrained(model: str, weights: str, image_size: int | None = None) -> tuple[nn.Module, WeightsInfo]:
    """A timm classifier with its starting weights, still with its original head.

    Args:
        model: ``timm/NAME``.
        weights: ``DEFAULT`` (the Hub weights the name's tag picks), a local file, or ``none``.
        image_size: the training crop, for models built for one input size.
    """
    check_name(model)
    name = timm_name(model)
    choice = weights.lower()
    if choice == "none":
        net = _create(name, image_size, pretrained=False)
        return net, _info(net, "none", pretrained=False)
    if choice.endswith((".pth", ".pt", ".safetensors", ".bin")) or os.sep in weights:
        return _from_file(name, Path(weights), image_size)
    if choice not in HUB_WEIGHTS:
        raise UserError(f"timm model {name} takes --weights DEFAULT (its pretrained weights from the Hugging Face "
                        f"Hub), a .pth/.safetensors file, or none; got '{weights}'")
    try:
        with weights_only_loads():
            net = _create(name, image_size, pretrained=True)
    except Exception as err:  # hub, network and file errors come in many types
        raise UserError(
            f"cannot get the pretrained weights of timm model {name} ({type(err).__name__}: {first_line(err)}); "
            f"on a machine with internet run `python -m finetune.commands.fetch --model {model}` and copy the Hugging Face "
            "cache (~/.cache/huggingface) here, pass --weights FILE, or --weights none") from None
    return net, _info(net, f"{model} (pretrained: {net.pretrained_cfg.get('hf_hub_id') or name})", pretrained=True)


def _from_file(name: str, path: Path, image_size: int | None) -> tuple[nn.Module, WeightsInfo]:
    state = load_weights_file(path)
    meta = read_metadata_if_any(path)
    if meta:  # one of our own checkpoints: its classes seed the new head
        net = build_for_checkpoint(PREFIX + name, len(meta["classes"]), meta)
        load_exactly(net, state, f"{path} does not fit timm model {name}")
        info = _info(net, str(path), pretrained=True)
        info.categories = list(meta["classes"])
        return net, info
    try:  # timm's own loader: it adapts original-format weights (filter functions) and other head sizes
        with weights_only_loads():
            net = _create(name, image_size, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    except Exception as err:
        raise UserError(f"{path} does not fit timm model {name}: {first_line(err)}") from None
    return net, _info(net, str(path), pretrained=True)


def _info(net: nn.Module, name: str, pretrained: bool) -> WeightsInfo:
    """What timm's pretrained config says: preprocessing always, ImageNet labels for ImageNet-1k heads."""
    timm = _timm()
    config = timm.data.resolve_data_config({}, model=net)
    interpolation = config.get("interpolation", "bilinear")
    info = WeightsInfo(name=name, mean=tuple(config["mean"]), std=tuple(config["std"]),
                       resize_ratio=1 / float(config.get("crop_pct") or 0.875),
                       interpolation=interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear")
    if pretrained and net.num_classes == 1000 and timm.data.infer_imagenet_subset(net) == "imagenet-1k":
        info.categories = list(_IMAGENET_CATEGORIES)  # the same 1000 classes in the same order
    return info


def build_for_size(model: str, image_size: int) -> nn.Module:
    """An uninitialised timm model as training builds it for ``image_size`` (its original head)."""
    check_name(model)
    return _create(timm_name(model), image_size, pretrained=False)


def build_for_checkpoint(model: str, num_classes: int, meta: dict[str, Any] | None = None) -> nn.Module:
    """An uninitialised timm model with ``num_classes`` outputs, to load a checkpoint into."""
    check_name(model)
    kwargs = (meta or {}).get("arch_kwargs") or {}
    return _timm().create_model(timm_name(model), pretrained=False, num_classes=num_classes, **kwargs)


def recorded_kwargs(net: nn.Module) -> dict[str, Any]:
    """Constructor arguments a rebuilt model must repeat: the input size of models built for one."""
    size = getattr(getattr(net, "patch_embed", None), "img_size", None)
    return {"img_size": list(size) if isinstance(size, (tuple, list)) else size} if size is not None else {}


def version() -> str:
    return _timm().__version__
