"""Export a checkpoint written by train.py to ONNX, TorchScript or an ExportedProgram.

    python export.py --ckpt runs/NAME/model.safetensors --format onnx [--output model.onnx]

The file takes normalised float32 images of any batch size and returns logits; class names and
the preprocessing (size, crop, mean, std, interpolation) go into its metadata.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from finetune.config import check_values, option, parse_config
from finetune.errors import UserError, run_cli

FORMATS = {"onnx": ".onnx", "torchscript": ".ts", "exported-program": ".pt2"}  # export.FORMATS, without torch


@dataclass
class ExportConfig:
    ckpt: str | None = option(None, "checkpoint written by train.py (model.safetensors)")
    format: str = option("onnx", "onnx, torchscript or exported-program", choices=tuple(FORMATS))
    output: str | None = option(None, "the file to write (default: beside the checkpoint, named after it: "
                                      "model.onnx, model.ts or model.pt2)")

    def __post_init__(self) -> None:
        check_values(self)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    # Flags first: --help and a bad flag answer at once, before torch (seconds to import) loads.
    config: ExportConfig = parse_config(argv, ExportConfig, description=__doc__.splitlines()[0])
    from finetune.models.export import export, onnx_max_difference
    from finetune.models.inference import load_classifier

    if not config.ckpt:
        raise UserError("export.py needs --ckpt FILE")
    clf = load_classifier(config.ckpt)
    output = Path(config.output) if config.output else clf.path.with_suffix(FORMATS[config.format])
    export(clf, config.format, output)
    print(f"wrote {output} ({config.format}, {len(clf.classes)} classes, input 3 x {clf.preprocessing.image_size} "
          f"x {clf.preprocessing.image_size}, any batch size)")
    difference = onnx_max_difference(clf, output) if config.format == "onnx" else None
    if difference is not None:
        print(f"ONNX Runtime agrees with PyTorch: largest logit difference {difference:.2e}")
    return {"output": output, "max_difference": difference}


def run() -> None:
    """The ``finetune-export`` console script."""
    sys.exit(run_cli(main))
