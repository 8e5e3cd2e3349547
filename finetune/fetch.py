"""Fetch pretrained weights into torch.hub's cache, e.g. on a login node before an offline job.

    python -m finetune.fetch --model resnet18 --weights IMAGENET1K_V1

Compute nodes that share the home folder (or TORCH_HOME) then find the file without network.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from finetune.errors import run_cli
from finetune.models import check_model_name, ensure_cached, torchvision_weights


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2", help="torchvision model name")
    parser.add_argument("--weights", default="IMAGENET1K_V1", help="torchvision weights name")
    args = parser.parse_args(argv)
    check_model_name(args.model)
    path = ensure_cached(torchvision_weights(args.model, args.weights))
    print(f"{args.model} {args.weights}: {path}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
