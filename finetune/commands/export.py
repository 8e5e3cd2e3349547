"""Export a checkpoint written by train.py to ONNX, TorchScript or an ExportedProgram.

    python export.py --ckpt runs/NAME/model.safetensors --format onnx [--output model.onnx]

The file takes normalised float32 images of any batch size and returns logits in fp32; class
names and the preprocessing (size, crop, mean, std, interpolation) go into its metadata. Before it
replaces anything, the file is run on real images (the checkpoint's recorded test images, or
--check-images) and must agree with PyTorch in fp32, or nothing is written and the exit status is 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from finetune.config import check_values, option, parse_config
from finetune.errors import UserError, leave, run_cli

FORMATS = {"onnx": ".onnx", "torchscript": ".ts", "exported-program": ".pt2"}  # export.FORMATS, without torch


@dataclass
class ExportConfig:
    ckpt: str | None = option(None, "checkpoint written by train.py (model.safetensors)")
    format: str = option("onnx", "onnx, torchscript or exported-program", choices=tuple(FORMATS))
    output: str | None = option(None, "the file to write (default: beside the checkpoint, named after it: "
                                      "model.onnx, model.ts or model.pt2)")
    check_images: tuple[str, ...] = option((), "images (files, folders or .txt lists) to check the file on "
                                               "(default: the checkpoint's recorded test images)", nargs="+")

    def __post_init__(self) -> None:
        self.check_images = tuple(self.check_images)
        check_values(self)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    # Flags first: --help and a bad flag answer at once, before torch (seconds to import) loads.
    config: ExportConfig = parse_config(argv, ExportConfig, description=__doc__.splitlines()[0])
    from finetune.models.export import TOLERANCE, export  # after the flags: torch loads here
    from finetune.models.inference import load_classifier

    if not config.ckpt:
        raise UserError("export.py needs --ckpt FILE")
    output = Path(config.output) if config.output else None
    others = {suffix: fmt for fmt, suffix in FORMATS.items() if fmt != config.format}
    if output is not None and output.suffix.lower() in others:
        raise UserError(f"--output {output} is named like a {others[output.suffix.lower()]} file, but --format "
                        f"{config.format} writes {FORMATS[config.format]}; rename it or choose the format")
    clf = load_classifier(config.ckpt, mixed_precision="no", channels_last=False)  # exported files compute in fp32
    output = output or clf.path.with_suffix(FORMATS[config.format])
    images, source = check_images(clf, config.check_images)
    output, agreement = export(clf, config.format, output, check_on=images)
    print(f"wrote {output} ({config.format}, fp32, {len(clf.classes)} classes, input 3 x "
          f"{clf.preprocessing.image_size} x {clf.preprocessing.image_size}, any batch size)")
    if agreement is not None:
        print(f"checked on {agreement.images} images ({source}): the file agrees with PyTorch in fp32, largest "
              f"logit difference {agreement.max_difference:.2e} (allowed {TOLERANCE * agreement.scale:.2e}), "
              f"{'same labels over their thresholds' if clf.multilabel else 'same top class'} on all")
    elif images is None:
        print(f"not checked: {source}; pass --check-images with a few of your images")
    else:
        print("not checked: ONNX Runtime is not installed (pip install 'finetune[export]')")
    return {"output": output, "max_difference": agreement.max_difference if agreement else None,
            "agreement": agreement}


CHECK_IMAGES = 32  # enough to meet most of a model's range of logits; a second or two to run


def check_images(clf: Any, named: Sequence[str]) -> tuple[Any, str]:
    """Up to ``CHECK_IMAGES`` real images (uint8, as eval.py prepares them) to check an export on:
    those named, else the checkpoint's recorded test images; and where they came from (or, with
    no images, why not)."""
    # loaded by main already; imported here to keep the module's top torch-free
    import torch

    from finetune.data.evalsplit import recorded_split
    from finetune.data.images import BadImageError
    from finetune.data.inputs import image_paths

    if named:
        paths, source = list(image_paths(named)), "--check-images"
    else:
        try:
            paths = [Path(p) for p, _ in recorded_split(clf.meta, clf.classes, clf.path).samples]
            source = "the checkpoint's recorded test images"
        except UserError as err:
            return None, f"the checkpoint's test images cannot be used ({err})"
    step = max(1, len(paths) // CHECK_IMAGES)
    images = []
    for path in paths[::step][:CHECK_IMAGES]:
        try:
            images.append(clf.uint8_image(path))
        except BadImageError:
            continue
    if not images:
        return None, f"no readable images in {source}"
    return torch.stack(images), source


def run() -> None:
    """The ``finetune-export`` console script."""
    leave(run_cli(main))
