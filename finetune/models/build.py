"""Building torchvision (and timm) classifiers: with their starting weights (``weights``) and a new
head for the target classes, shape-only on the meta device (to check an input size), or empty to
load a checkpoint into; and the metadata that describes a trained one in its checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import accelerate
import safetensors
import torch
import torchvision
from accelerate import init_empty_weights
from torch import nn
from torch.fx.experimental.optimization import fuse
from torchvision.models import get_model, list_models
from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

from finetune import __version__
from finetune.data.presets import Preprocessing
from finetune.errors import UserError, first_line
from finetune.models import timm_models
from finetune.models.checkpoint import read_metadata_if_any
from finetune.models.surgery import find_head, freeze, match_classes, replace_head, set_frozen_eval
from finetune.models.weights import (
    WeightsInfo,
    ensure_cached,
    load_exactly,
    load_weights_file,
    torchvision_info,
    torchvision_weights,
    weights_only_loads,
)


def classification_models() -> list[str]:
    """Names of every torchvision classification model."""
    return list_models(module=torchvision.models)


def check_model_name(name: str) -> None:
    """A UserError unless ``name`` is a torchvision classification model or ``timm/NAME``."""
    if timm_models.is_timm(name):
        return timm_models.check_name(name)
    if name not in classification_models():
        raise UserError(f"unknown model '{name}'; choose a torchvision classification model such as "
                        "resnet18, mobilenet_v2, efficientnet_b0, convnext_tiny, vit_b_16, or timm/NAME")


def build_pretrained(model: str, weights: str, image_size: int | None = None) -> tuple[nn.Module, WeightsInfo]:
    """A classifier with its starting weights, still with its original head.

    Args:
        model: torchvision model name, or ``timm/NAME`` (see ``timm_models``).
        weights: torchvision weights name, a local file, or ``none``.
        image_size: the training crop (timm models built for one input size are built for it).
    """
    if timm_models.is_timm(model):
        return timm_models.build_pretrained(model, weights, image_size)
    check_model_name(model)
    if weights.lower() == "none":
        return get_model(model, weights=None, **arch_kwargs(model)), WeightsInfo(name="none")
    if weights.lower().endswith((".pth", ".pt", ".safetensors")) or os.sep in weights:
        return _from_file(model, Path(weights))
    enum = torchvision_weights(model, weights)
    path = ensure_cached(enum)
    try:
        with weights_only_loads():  # torchvision's loader would unpickle the cached file in full
            net = get_model(model, weights=enum)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise UserError(f"{path} is not a plain weights file for {model} (only tensors are loaded, nothing "
                        f"is unpickled): {first_line(err)}; delete it to download it again") from None
    return net, torchvision_info(enum)


def _from_file(model: str, path: Path) -> tuple[nn.Module, WeightsInfo]:
    state = load_weights_file(path)
    meta = read_metadata_if_any(path)
    net = get_model(model, weights=None, num_classes=_num_outputs(state, meta), **arch_kwargs(model, meta))
    load_exactly(net, state, f"{path} does not fit {model}")
    info = WeightsInfo(name=str(path))
    if meta:  # one of our own checkpoints: its classes can seed the new head
        info.categories = list(meta["classes"])
        info.mean, info.std = tuple(meta["mean"]), tuple(meta["std"])
        info.resize_ratio = meta["resize_size"] / meta["image_size"]
        info.interpolation = meta.get("interpolation", "bilinear")
    return net, info



def _num_outputs(state: dict[str, torch.Tensor], meta: dict[str, Any] | None) -> int:
    if meta:
        return len(meta["classes"])
    # The last 2-D/4-D weight in the file is the classifier's in every torchvision family.
    weights = [v for k, v in state.items() if k.endswith("weight") and v.ndim in (2, 4)]
    if not weights:
        raise UserError("the weights file holds no layer weights (no 2-D or 4-D '*.weight' tensor)")
    return weights[-1].shape[0]


def arch_kwargs(arch: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Constructor arguments that pretrained weights change and a rebuilt model must repeat.

    GoogLeNet and Inception drop their auxiliary heads once pretrained (we never train them)
    and may normalise their input inside the model (``transform_input``); a ViT records the
    input size its position embeddings were resampled to (``fit_input_size``).
    """
    base = {"aux_logits": False} if arch in ("googlenet", "inception_v3") else {}
    return {**base, **((meta or {}).get("arch_kwargs") or {})}


def size_kwargs(arch: str, image_size: int) -> dict[str, Any]:
    """Constructor arguments for an input size: torchvision's ViTs are built for one size."""
    return {"image_size": image_size} if arch.startswith("vit_") else {}


def recorded_arch_kwargs(net: nn.Module) -> dict[str, Any]:
    """The ``arch_kwargs`` to store in a checkpoint so that ``build_for_checkpoint`` matches ``net``."""
    if hasattr(net, "pretrained_cfg"):  # a timm model
        return timm_models.recorded_kwargs(net)
    if isinstance(net, VisionTransformer):
        return {"image_size": net.image_size}
    return {"transform_input": bool(net.transform_input)} if hasattr(net, "transform_input") else {}


def fit_input_size(net: nn.Module, image_size: int) -> nn.Module:
    """Let a ViT take ``image_size`` images by resampling its position embeddings, as timm does.

    torchvision's ViT is built for one input size (224 for the ImageNet weights) and refuses
    any other; other models take any size above their minimum and are returned unchanged.

    Raises:
        UserError: for a size that is not a multiple of the ViT's patch size.
    """
    if not isinstance(net, VisionTransformer) or net.image_size == image_size:
        return net
    if image_size % net.patch_size:
        raise UserError(f"a ViT with {net.patch_size}-pixel patches takes image sizes that are multiples of "
                        f"{net.patch_size}, got --image-size {image_size}")
    state = interpolate_embeddings(image_size, net.patch_size,
                                   {"encoder.pos_embedding": net.encoder.pos_embedding.detach()})
    net.encoder.pos_embedding = nn.Parameter(state["encoder.pos_embedding"])
    net.image_size = image_size
    net.seq_length = net.encoder.pos_embedding.shape[1]
    return net


def build_for_checkpoint(arch: str, num_classes: int, meta: dict[str, Any] | None = None) -> nn.Module:
    """An uninitialised model of ``arch`` with ``num_classes`` outputs, to load a checkpoint into."""
    if timm_models.is_timm(arch):
        return timm_models.build_for_checkpoint(arch, num_classes, meta)
    check_model_name(arch)
    return get_model(arch, weights=None, num_classes=num_classes, **arch_kwargs(arch, meta))


def model_from_checkpoint(state: dict[str, torch.Tensor], meta: dict[str, Any], problem: str) -> nn.Module:
    """The checkpoint's model holding its ``state`` (``load_exactly``; ``problem`` starts its errors).

    Built on the meta device and given copies of the checkpoint's tensors: a random initialisation
    that loading overwrites cost 0.08 s for resnet18 and 0.5 s for vit_b_16 on 2 cores (now 0.02
    and 0.1 s), paid by every eval, predict, serve and calibration. A model that computes a tensor
    at construction that the file lacks (a non-persistent buffer, a plain tensor attribute), or
    shares one between two names, is built for real instead.
    """
    arch, num_classes = meta["arch"], len(meta["classes"])
    try:
        with torch.device("meta"):
            empty = build_for_checkpoint(arch, num_classes, meta)
    except Exception:  # a constructor that reads a tensor's value (RegNet's widths); a bad name
        empty = None   # is the real build's to report below
    if empty is not None and _filled_by(empty, state):
        # Copies: the file's tensors are mappings of it, and a file rewritten in place under a
        # long-lived server would change or fault its weights.
        load_exactly(empty, {k: v.clone() for k, v in state.items()}, problem, assign=True)
        return empty
    net = build_for_checkpoint(arch, num_classes, meta)
    load_exactly(net, state, problem)
    return net


def _filled_by(net: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` replaces every tensor of ``net``, one name each, in its dtype."""
    named = {**dict(net.named_parameters(remove_duplicate=False)), **dict(net.named_buffers(remove_duplicate=False))}
    registered = {id(t) for t in named.values()}
    if named.keys() != state.keys() or len(registered) < len(named):
        return False
    if any(named[k].dtype != v.dtype for k, v in state.items()):
        return False
    return not any(isinstance(v, torch.Tensor) and v.is_meta and id(v) not in registered
                   for module in net.modules() for v in vars(module).values())


@dataclass
class Classifier:
    """A model ready to fine-tune, and what was done to it."""

    net: nn.Module
    weights: WeightsInfo
    head: str  # dotted name of the new output layer
    preprocessing: Preprocessing
    reused: dict[str, str]  # target class -> pretrained category whose row initialised it
    frozen: list[str]  # frozen backbone blocks


def build_classifier(model: str, weights: str, classes: list[str], *, image_size: int, freeze_spec: str = "none",
                     reuse_classifier: bool = True) -> Classifier:
    """Load a pretrained classifier, give it a head for ``classes``, and freeze what was asked.

    Args:
        model: torchvision model name.
        weights: torchvision weights name, a local file, or ``none``.
        classes: target class names, in label order.
        image_size: training crop size; the eval resize follows the weights' resize/crop ratio.
        freeze_spec: ``surgery.freeze`` spec.
        reuse_classifier: start rows of classes that match a pretrained category from its row.
    """
    net, info = build_pretrained(model, weights, image_size)
    net = fit_input_size(net, image_size)
    reuse = match_classes(classes, info.categories) if reuse_classifier and info.pretrained else {}
    replace_head(net, len(classes), reuse)
    try:
        frozen = freeze(net, freeze_spec)
    except ValueError as err:
        raise UserError(str(err)) from None
    pre = Preprocessing(image_size=image_size, resize_size=round(image_size * info.resize_ratio),
                        mean=tuple(info.mean), std=tuple(info.std), interpolation=info.interpolation)
    return Classifier(net, info, find_head(net), pre,
                      {classes[t]: info.categories[s] for t, s in reuse.items()}, frozen)


def fuse_for_inference(net: nn.Module, head: str | None = None) -> nn.Module:
    """Fold BatchNorm layers into the convolutions before them, for evaluation only.

    One op fewer per convolution, which makes CPU inference noticeably faster (bench/eval_speed.py
    measures eval.py as a whole). Models that torch.fx cannot trace are returned unchanged, and so
    are those whose ``head`` (a dotted module name) the trace inlined: the OOD score's features are
    the head's input, taken by a hook on that module (timm's own ``Linear`` heads are traced
    through, e.g. mobilenetv3's).
    """
    try:
        fused = fuse(net.eval())
    except Exception:  # tracing fails on data-dependent control flow: fusing is only an optimisation
        return net
    if head is not None and not any(node.op == "call_module" and node.target == head for node in fused.graph.nodes):
        return net
    return fused


def library_versions() -> dict[str, str]:
    return {"finetune": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "accelerate": accelerate.__version__, "safetensors": safetensors.__version__}


def describe_checkpoint(config: Any, clf: Classifier, classes: list[str], metrics: dict[str, Any],
                        precision: str | None = None) -> dict[str, Any]:
    """The metadata that lets eval.py rebuild a model and its preprocessing with no other input.

    Args:
        config: the resolved ``TrainConfig``.
        clf: the ``Classifier`` that was trained.
        classes: class names in label order.
        metrics: final metrics of the run so far.
        precision: the mixed precision the run's test pass ran in (``no``, ``bf16``, ``fp16``):
            eval.py evaluates in it by default, so that its accuracy agrees with the training's.
    """
    pre = clf.preprocessing
    return {
        "arch": config.model, "arch_kwargs": recorded_arch_kwargs(clf.net), "classes": list(classes),
        "image_size": pre.image_size, "resize_size": pre.resize_size, "crop_size": pre.image_size,
        "mean": list(pre.mean), "std": list(pre.std), "interpolation": pre.interpolation,
        "weights": clf.weights.name, "head": clf.head, "config": dataclasses.asdict(config),
        "metrics": metrics, "versions": {**library_versions(), **_timm_version(config.model)},
        **({"precision": precision} if precision else {}),
    }


def _timm_version(model: str) -> dict[str, str]:
    return {"timm": timm_models.version()} if timm_models.is_timm(model) else {}


def shape_model(model: str, image_size: int, freeze_spec: str = "none") -> nn.Module:
    """``model`` on the meta device: real shapes, no memory, no initialisation; frozen as asked.

    Raises:
        UserError: for a ``--freeze`` spec the model has no block for.
    """
    try:
        with init_empty_weights(), warnings.catch_warnings():  # parameters on meta; buffers (small) below
            warnings.simplefilter("ignore")  # inception's note on its initialisation: none happens here
            if timm_models.is_timm(model):
                net = timm_models.build_for_size(model, image_size)
            else:
                net = get_model(model, weights=None, **arch_kwargs(model), **size_kwargs(model, image_size))
    except AssertionError as err:  # torchvision's ViT refuses sizes that are not a multiple of its patch
        patch = model.rsplit("_", 1)[-1]
        hint = f" (it takes multiples of its {patch}-pixel patches)" if patch.isdigit() else ""
        raise UserError(f"{model} cannot take --image-size {image_size}: {first_line(err)}{hint}") from None
    net = net.to("meta")
    replace_head(net, 2)
    try:
        freeze(net, freeze_spec)
    except ValueError as err:
        raise UserError(str(err)) from None
    net.train()
    set_frozen_eval(net)
    return net
