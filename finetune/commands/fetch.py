"""Fetch pretrained weights into torch.hub's cache, e.g. on a login node before an offline job.

    python -m finetune.commands.fetch --model resnet18 --weights IMAGENET1K_V1

Compute nodes that share the home folder (or TORCH_HOME) then find the file without network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from finetune.config import option, parse_config
from finetune.errors import leave, run_cli
from finetune.models import timm_models
from finetune.models.build import check_model_name
from finetune.models.weights import ensure_cached, torchvision_weights


@dataclass
class FetchConfig:
    model: str = option("mobilenet_v2", "torchvision model name, or timm/NAME")
    weights: str = option("IMAGENET1K_V1", "torchvision weights name (IMAGENET1K_V1, DEFAULT, ...)")


def main(argv: Sequence[str] | None = None) -> None:
    config: FetchConfig = parse_config(argv, FetchConfig, description=__doc__.splitlines()[0])
    check_model_name(config.model)
    if timm_models.is_timm(config.model):  # timm downloads into the Hugging Face cache
        _, info = timm_models.build_pretrained(config.model, config.weights)
        print(f"{info.name}: in the Hugging Face cache (HF_HOME, default ~/.cache/huggingface)")
        return
    path = ensure_cached(torchvision_weights(config.model, config.weights))
    print(f"{config.model} {config.weights}: {path}")


if __name__ == "__main__":
    leave(run_cli(main))
