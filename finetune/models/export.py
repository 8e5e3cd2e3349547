"""Exporting a trained classifier to files that run without this project: ONNX, TorchScript and
torch.export's ExportedProgram.

Every file takes a float32 batch ``images`` (N x 3 x crop x crop, RGB, normalised as
``(pixel / 255 - mean) / std``) of any batch size and returns ``logits`` (N x classes). What is
needed to feed it and read it — class names, crop and resize sizes, interpolation, mean, std —
goes into the file: ONNX ``metadata_props``, and a ``finetune.json`` entry in the TorchScript
and ExportedProgram archives (``torch.jit.load(path, _extra_files=...)``,
``torch.export.load(path, extra_files=...)``).

The files return the raw logits, as the network computes them: calibrated probabilities are
``softmax(logits / temperature)`` with the ``temperature`` in the metadata (1 where the run had no
validation split). Raw logits keep the argmax and the check against PyTorch the same as the
checkpoint's. The out-of-distribution score (``models.calibration``) needs the training images'
features, which stay in the checkpoint: exported files do not give it.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from finetune.data.presets import ModelInput
from finetune.errors import UserError, first_line
from finetune.models.inference import LoadedClassifier
from finetune.utils.files import atomic_path

FORMATS = {"onnx": ".onnx", "torchscript": ".ts", "exported-program": ".pt2"}
METADATA_FILE = "finetune.json"  # the entry in TorchScript and ExportedProgram archives
EXAMPLE_BATCH = 2  # traced at 2: torch.export treats a size of 1 as a constant
# The largest logit difference an exported file may show against PyTorch in fp32, relative to the
# logits' own scale (at least 1): float32 reorderings stay near 1e-5; a wrong weight or op is far above.
TOLERANCE = 1e-3


@dataclass(frozen=True)
class Agreement:
    """How an exported file's outputs compare with PyTorch's (fp32) on real images."""

    images: int
    max_difference: float  # the largest absolute logit difference
    scale: float  # the largest absolute PyTorch logit (at least 1)
    same_top1: int  # images whose top class is the same (multi-label: whose labels over threshold are)

    @property
    def ok(self) -> bool:
        return self.max_difference <= TOLERANCE * self.scale and self.same_top1 == self.images


def export_metadata(clf: LoadedClassifier) -> dict[str, Any]:
    """What a user of an exported file needs, beyond the file: classes and preprocessing."""
    pre, meta = clf.preprocessing, clf.meta
    return {
        "classes": list(clf.classes), "image_size": pre.image_size, "crop_size": pre.image_size,
        "resize_size": pre.resize_size, "interpolation": pre.interpolation, "mean": list(pre.mean),
        "std": list(pre.std), "input": "images: float32 N x 3 x crop x crop, RGB, (pixel / 255 - mean) / std",
        "output": "logits: float32 N x classes, raw: probabilities = softmax(logits / temperature)",
        "temperature": clf.calibration.temperature, "precision": "fp32", "arch": meta["arch"],
        "finetune_version": meta.get("versions", {}).get("finetune", ""), "checkpoint": str(clf.path),
        **({"task": "multilabel", "thresholds": clf.thresholds,
            "output": "logits: float32 N x classes; sigmoid(logit) is the class's probability, and the image has "
                      "the class where that is at least the class's threshold"} if clf.multilabel else {}),
    }


def example_input(clf: LoadedClassifier) -> torch.Tensor:
    size = clf.preprocessing.image_size
    return torch.randn(EXAMPLE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))


def export(clf: LoadedClassifier, fmt: str, output: str | Path,
           check_on: torch.Tensor | None = None) -> tuple[Path, Agreement | None]:
    """Write ``clf`` to ``output`` as ``fmt`` (``onnx``, ``torchscript`` or ``exported-program``),
    with a dynamic batch size and the metadata of ``export_metadata``; atomically. The file computes
    in fp32.

    Args:
        check_on: uint8 images (N x 3 x crop x crop) to run the written file on before it replaces
            ``output``: it must agree with PyTorch in fp32 (``Agreement.ok``).

    Returns:
        The file, and how it agreed on ``check_on`` (None without images, or for ONNX without
        onnxruntime).

    Raises:
        UserError: an unknown format, a missing exporter package, a model the exporter refuses, or
            a file that disagrees with PyTorch (then nothing is written).
    """
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    output = Path(output)
    model = clf.model.eval().float().cpu()
    writer = {"onnx": _onnx, "torchscript": _torchscript, "exported-program": _exported_program}[fmt]
    agreement = None
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(output) as tmp:
            with torch.no_grad():
                writer(model, example_input(clf), tmp, export_metadata(clf))
            if check_on is not None:
                agreement = compare(clf, runner(fmt, tmp), check_on)
                if agreement is not None and not agreement.ok:
                    raise UserError(f"the exported {fmt} file disagrees with PyTorch on {agreement.images} real "
                                    f"images: largest logit difference {agreement.max_difference:.2e} (allowed "
                                    f"{TOLERANCE * agreement.scale:.2e}), same top class on {agreement.same_top1}; "
                                    f"{output} was not written")
    except OSError as err:
        raise UserError(f"cannot write {output}: {err.strerror or err}") from None
    return output, agreement


def runner(fmt: str, path: Path) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A function that runs the exported file on normalised float images (None for ONNX without onnxruntime)."""
    if fmt == "onnx":
        try:
            import onnxruntime  # optional (finetune[export])
        except ImportError:
            return None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
    with warnings.catch_warnings():  # torch.jit.load's deprecation notice: the files are what users load
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            return torch.jit.load(str(path))
        # From a buffer: torch.export.load logs a warning for a file not named *.pt2 (a temporary one)
        return torch.export.load(io.BytesIO(path.read_bytes())).module()


def compare(clf: LoadedClassifier, run: Callable[[torch.Tensor], torch.Tensor] | None,
            images: torch.Tensor) -> Agreement | None:
    """How ``run`` (an exported file) agrees with the PyTorch model in fp32 on uint8 ``images``."""
    if run is None:
        return None
    model = clf.model.eval().float().cpu()
    with torch.no_grad():
        x = ModelInput(clf.preprocessing.mean, clf.preprocessing.std)(images)
        reference, ours = model(x), run(x).float()
    if clf.multilabel:  # the same labels over their thresholds
        limit = torch.tensor(clf.thresholds)
        same = ((ours.sigmoid() >= limit) == (reference.sigmoid() >= limit)).all(dim=1)
    else:
        same = ours.argmax(1) == reference.argmax(1)
    return Agreement(len(images), float((ours - reference).abs().max()), max(1.0, float(reference.abs().max())),
                     int(same.sum()))


def _batch_dim() -> Any:
    return {"images": {0: torch.export.Dim("batch", min=1, max=65536)}}


def _exported(model: nn.Module, example: torch.Tensor) -> Any:
    try:
        return torch.export.export(_Named(model).eval(), (example,), dynamic_shapes=_batch_dim())
    except Exception as err:  # torch.export reports untraceable code in many exception types
        raise UserError(f"torch.export cannot capture this model: {first_line(err)}") from None


class _Named(nn.Module):
    """The model with its input named ``images`` (the name ONNX and ExportedProgram show)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def _exported_program(model: nn.Module, example: torch.Tensor, path: Path, meta: dict[str, Any]) -> None:
    # Through a buffer: torch.export logs a warning for a file not named *.pt2 (a temporary one)
    buffer = io.BytesIO()
    torch.export.save(_exported(model, example), buffer, extra_files={METADATA_FILE: json.dumps(meta)})
    path.write_bytes(buffer.getvalue())


def _torchscript(model: nn.Module, example: torch.Tensor, path: Path, meta: dict[str, Any]) -> None:
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch.jit's deprecation notices
            scripted = torch.jit.trace(model, example)
    except Exception as err:
        raise UserError(f"torch.jit.trace cannot trace this model: {first_line(err)}") from None
    scripted.save(str(path), _extra_files={METADATA_FILE: json.dumps(meta)})


def _onnx(model: nn.Module, example: torch.Tensor, path: Path, meta: dict[str, Any]) -> None:
    try:
        import onnx  # optional (finetune[export])
    except ImportError:
        raise UserError("ONNX export needs the onnx and onnxscript packages: pip install 'finetune[export]'") from None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates each stage
            program = torch.onnx.export(_Named(model).eval(), (example,), input_names=["images"], output_names=["logits"],
                                        dynamic_shapes=_batch_dim(), dynamo=True, verbose=False)
    except ImportError as err:
        raise UserError(f"ONNX export needs {err.name or 'onnxscript'}: pip install 'finetune[export]'") from None
    except Exception as err:
        raise UserError(f"torch.onnx cannot export this model: {first_line(err)}") from None
    proto = program.model_proto
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(proto, str(path))
