"""Running a trained classifier: the one inference path that eval.py, predict.py, export.py's
check, the server and the Python API share.

    from finetune import load_classifier
    clf = load_classifier("runs/NAME/model.safetensors")
    clf.predict(["a.jpg", "photos/"], top_k=3)

One setup, ``load_classifier``: the checkpoint's metadata says the architecture, the class names in
order and the preprocessing (crop, resize and its interpolation, mean, std); the model is put in
eval mode, on its device, in the channels-last format, BatchNorm folded if asked, and given its
precision. One forward loop, ``forward_batches``: every way of running the model goes through it.

The precision rule, the same for every way to run a model: ``auto`` (the default) computes in the
precision the training's own test pass ran in, recorded in the checkpoint (bf16 on CPUs and GPUs
that run it fast, else fp32), so that eval.py's accuracy is the one training printed; ``no`` is
fp32, which is what exported files compute in. Each command says which it used.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from accelerate import Accelerator
from PIL import Image
from torch import nn

from finetune.data.images import BadImageError, to_rgb
from finetune.data.inputs import image_paths
from finetune.data.presets import ModelInput, Preprocessing
from finetune.models.build import fuse_for_inference, model_from_checkpoint
from finetune.models.calibration import OOD_BANK, OOD_SIDECAR, Calibration, knn_distance
from finetune.models.checkpoint import checkpoint_file, load_checkpoint, load_safetensors, sidecar
from finetune.utils.runtime import eval_precision, precision_name, resolve_precision

ImageInput = str | Path | Image.Image
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MIN_CONFIDENCE = 0.5  # below it, a prediction is "unknown" (on calibrated probabilities: worse than even odds)


@torch.inference_mode()
def forward_batches(model: nn.Module, batches: Iterable[Any],
                    to_input: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[tuple[torch.Tensor, list[Any]]]:
    """The one forward loop: each batch's logits in fp32, with the rest of the batch as it came.

    Args:
        model: in whatever precision it was given (``LoadedClassifier.autocast``, or an Accelerator's).
        batches: ``(uint8 images, *rest)`` tuples, e.g. a loader's ``(images, targets, indices)``.
        to_input: turns the uint8 images into the model's input (``data.presets.ModelInput``).
    """
    model.eval()
    for images, *rest in batches:
        yield model(to_input(images)).float(), rest


class FeatureTap:
    """The penultimate features (the input of the head, ``meta["head"]``) of the last forward pass
    of ``model``, while the tap is open (a context manager)."""

    def __init__(self, model: nn.Module, head: str):
        self.features: torch.Tensor | None = None
        self._handle = model.get_submodule(head).register_forward_hook(self._keep)

    def _keep(self, _module: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
        self.features = args[0].detach().float().flatten(1)

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *_: Any) -> None:
        self._handle.remove()


@dataclass(frozen=True)
class Prediction:
    """The top classes of one image, best first; for a multi-label classifier, every class whose
    probability is at or over its threshold (none, one or several), most probable first."""

    source: str  # the image's path, or "<image N>" for an in-memory image (N: its position in the input)
    classes: list[str]
    probabilities: list[float]  # calibrated where the checkpoint records a temperature (and calibrated=True)
    ood_score: float | None = None  # distance to the training images' features: higher is less like them
    # (None: the checkpoint predates OOD scores)
    unknown: bool = False  # top probability below min_confidence, or ood_score above the checkpoint's threshold


class LoadedClassifier:
    """A trained classifier ready for inference (see ``load_classifier``).

    Attributes:
        model: the network, in eval mode, on its device, as set up for inference.
        classes: class names in the order of the model's outputs.
        preprocessing: crop size, eval resize and its interpolation, mean and std.
        meta: the checkpoint's whole metadata.
        path: the checkpoint file.
        precision: what it computes in: ``no`` (fp32), ``bf16`` or ``fp16`` (see the module's rule).
        to_input: uint8 images to the model's normalised input (in its memory format).
        calibration: the temperature and OOD threshold the checkpoint records (``models.calibration``).
        temperature: what ``probabilities`` divides the logits by: the recorded one, or 1 where
            loaded with ``calibrated=False`` (or the checkpoint records none).
        ood_bank: the training images' unit-length features the OOD score compares with (None
            where the checkpoint has none).
    """

    def __init__(self, model: nn.Module, classes: list[str], preprocessing: Preprocessing, meta: dict[str, Any],
                 path: Path, *, precision: str = "no", channels_last: bool = False, calibrated: bool = True,
                 ood_bank: torch.Tensor | None = None):
        self.model = model.eval()
        self.classes = classes
        self.preprocessing = preprocessing
        self.meta = meta
        self.path = path
        self.precision = precision
        self._preset = preprocessing.eval_preset()
        self.to_input = ModelInput(preprocessing.mean, preprocessing.std, channels_last)
        self.calibration = Calibration.of(meta)
        self.temperature = self.calibration.temperature if calibrated else 1.0
        self.ood_bank = ood_bank

    def feature_tap(self) -> FeatureTap:
        """A tap on the head's input, for ``ood_scores`` (``with clf.feature_tap() as tap: ...``)."""
        return FeatureTap(self.model, self.meta["head"])

    def ood_scores(self, features: torch.Tensor | None) -> torch.Tensor | None:
        """Each image's OOD score from its penultimate features (``models.calibration.knn_distance``);
        None where the checkpoint has no training features to compare with."""
        if self.ood_bank is None or features is None:
            return None
        return knn_distance(features, self.ood_bank).cpu()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities of raw logits, the one place the temperature is applied: a softmax over the
        classes, or for a multi-label classifier a sigmoid per class."""
        scaled = logits.float() / self.temperature
        return scaled.sigmoid() if self.multilabel else scaled.softmax(dim=1)

    def unknown(self, confidence: torch.Tensor, ood_score: torch.Tensor | None,
                min_confidence: float = MIN_CONFIDENCE) -> torch.Tensor:
        """Which images to answer "I don't know" for: top probability below ``min_confidence``, or
        an OOD score above the checkpoint's threshold (where it records one)."""
        unsure = confidence.cpu() < min_confidence
        threshold = self.calibration.ood_threshold
        if threshold is None or ood_score is None:
            return unsure
        return unsure | (ood_score.cpu() > threshold)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def task(self) -> str:
        """``single`` (softmax over the classes) or ``multilabel`` (a sigmoid per class)."""
        return self.meta.get("task", "single")

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    @property
    def thresholds(self) -> list[float]:
        """A multi-label classifier's decision threshold per class (chosen on the validation split)."""
        return [float(t) for t in self.meta.get("thresholds") or [0.5] * len(self.classes)]

    def labels_over_threshold(self, probabilities: list[float]) -> tuple[list[str], list[float]]:
        """A multi-label image's classes at or over their thresholds and their probabilities, most probable first."""
        chosen = sorted((i for i, (p, t) in enumerate(zip(probabilities, self.thresholds)) if p >= t),
                        key=lambda i: -probabilities[i])
        return [self.classes[i] for i in chosen], [probabilities[i] for i in chosen]

    @property
    def precision_name(self) -> str:
        """``fp32``, ``bf16`` or ``fp16``: as the commands print it."""
        return precision_name(self.precision)

    @property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """A PIL image to the model's normalised float input (3 x crop x crop), as eval.py prepares it:
        resize the short side (with the checkpoint's interpolation), center-crop, normalise."""
        normalise = ModelInput(self.preprocessing.mean, self.preprocessing.std)
        return lambda img: normalise(self._preset.from_image(to_rgb(img)).unsqueeze(0))[0]

    def uint8_image(self, image: ImageInput) -> torch.Tensor:
        """The resized and cropped uint8 image (3 x crop x crop), before normalisation: a path is
        decoded exactly as eval.py decodes it (large JPEGs at a reduced scale where that suffices)."""
        if isinstance(image, Image.Image):
            return self._preset.from_image(to_rgb(image))
        return self._preset(str(image))

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision context of this classifier's forward passes (none for fp32)."""
        if self.precision not in DTYPES:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """The model's outputs for a batch of uint8 images (N x 3 x crop x crop), in fp32."""
        with self.autocast():
            logits, _ = next(forward_batches(self.model, [(batch.to(self.device),)], self.to_input))
        return logits

    def prepare(self, accelerator: Accelerator) -> nn.Module:
        """The model for a command's loader loop: on the accelerator's device, in its precision (built
        from ``self.precision``), without a DDP wrapper. Inference has no gradients to reduce, and
        with torch 2.11 the wrapper's teardown could hang a multi-process CPU eval at exit."""
        return accelerator.prepare_model(self.model, evaluation_mode=True)

    def predict(self, images: ImageInput | Iterable[ImageInput], top_k: int = 1, batch_size: int = 32,
                bad_data: str = "skip", min_confidence: float = MIN_CONFIDENCE) -> list[Prediction]:
        """Classify images.

        Args:
            images: an image file, a folder (searched recursively for images), a PIL image, or a
                list of these.
            top_k: how many classes to return per image, best first (a multi-label classifier returns
                every class over its threshold instead).
            batch_size: images per forward pass.
            bad_data: ``skip`` an image that cannot be decoded, with a warning (as predict.py
                does), or ``fail`` on it with ``BadImageError``.
            min_confidence: a top probability below it makes the prediction ``unknown``.

        Returns:
            One ``Prediction`` per readable image, in input order (a folder's images sorted by path),
            with its OOD score and whether it is ``unknown``.
        """
        return list(self.iter_predict(images, top_k=top_k, batch_size=batch_size, bad_data=bad_data,
                                      min_confidence=min_confidence))

    def iter_predict(self, images: ImageInput | Iterable[ImageInput], top_k: int = 1, batch_size: int = 32,
                     bad_data: str = "skip", min_confidence: float = MIN_CONFIDENCE) -> Iterator[Prediction]:
        """``predict``, one result at a time: memory stays flat however many images there are."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if bad_data not in ("skip", "fail"):
            raise ValueError(f"bad_data must be 'skip' or 'fail', got {bad_data!r}")
        k = min(top_k, len(self.classes))
        batch: list[tuple[str, torch.Tensor]] = []
        for source, image in _sources(images):
            try:
                batch.append((source, self.uint8_image(image)))
            except BadImageError as err:
                if bad_data == "fail":
                    raise
                warnings.warn(f"skipped unreadable image: {err}", stacklevel=2)
                continue
            if len(batch) == batch_size:
                yield from self._classify(batch, k, min_confidence)
                batch = []
        if batch:
            yield from self._classify(batch, k, min_confidence)

    def _classify(self, batch: list[tuple[str, torch.Tensor]], k: int, min_confidence: float) -> Iterator[Prediction]:
        with self.feature_tap() if self.ood_bank is not None else contextlib.nullcontext() as tap:
            logits = self.logits(torch.stack([image for _, image in batch]))
        probs = self.probabilities(logits)
        scores = self.ood_scores(tap.features if tap else None)
        listed = scores.tolist() if scores is not None else [None] * len(batch)
        if self.multilabel:  # the labels over their thresholds; unknown on the OOD score alone
            unknown = self.unknown(torch.ones(len(batch)), scores)
            for (source, _), p, score, unsure in zip(batch, probs.tolist(), listed, unknown.tolist()):
                yield Prediction(source, *self.labels_over_threshold(p), score, unsure)
            return
        top_p, top_i = probs.topk(k, dim=1)
        unknown = self.unknown(top_p[:, 0], scores, min_confidence)
        for (source, _), p, i, score, unsure in zip(batch, top_p.tolist(), top_i.tolist(), listed, unknown.tolist()):
            yield Prediction(source, [self.classes[j] for j in i], p, score, unsure)


def _sources(images: ImageInput | Iterable[ImageInput]) -> Iterator[tuple[str, ImageInput]]:
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    for position, item in enumerate(images):
        if isinstance(item, Image.Image):
            yield f"<image {position}>", item
        else:
            for path in image_paths([item]):
                yield str(path), path


def load_classifier(path: str | Path, device: str | torch.device = "cpu", *, mixed_precision: str = "auto",
                    channels_last: bool = True, fold_batchnorm: bool = False,
                    calibrated: bool = True) -> LoadedClassifier:
    """Rebuild a classifier from a checkpoint written by train.py, set up for inference.

    Args:
        path: the ``.safetensors`` checkpoint (``model.safetensors`` or ``best.safetensors``), or a
            run folder (its ``model.safetensors``).
        device: where the model goes.
        mixed_precision: ``auto`` (the training's test-pass precision, recorded in the checkpoint),
            ``no`` (fp32), ``bf16`` or ``fp16``: the same choice as the commands' ``--mixed-precision``.
        channels_last: the channels-last memory format (faster convolutions).
        fold_batchnorm: fold BatchNorm into the convolutions (faster on CPUs; an image at the
            decision boundary may flip).
        calibrated: divide the logits by the temperature the checkpoint records (fitted on the
            run's validation split) before the softmax; ``False``: the raw softmax.

    Raises:
        UserError: the file is missing, not a checkpoint, or does not fit its own description.
    """
    path = checkpoint_file(path)  # a run folder means its model.safetensors
    state, meta = load_checkpoint(path)
    classes = list(meta["classes"])
    net = model_from_checkpoint(state, meta, f"{path} does not fit a {meta['arch']} with {len(classes)} classes")
    net = fuse_for_inference(net, meta.get("head")) if fold_batchnorm else net.eval()
    device = torch.device(device)
    net = net.to(device, memory_format=torch.channels_last) if channels_last else net.to(device)
    precision = resolve_precision(eval_precision(mixed_precision, meta), on_cpu=device.type == "cpu")
    bank_file = sidecar(path, OOD_SIDECAR)
    bank = load_safetensors(bank_file).get(OOD_BANK) if meta.get("ood") and bank_file.is_file() else None
    return LoadedClassifier(net, classes, preprocessing_of(meta), meta, path, precision=precision,
                            channels_last=channels_last, calibrated=calibrated,
                            ood_bank=None if bank is None else bank.to(device, copy=True))  # not the file's mapping


def preprocessing_of(meta: dict[str, Any]) -> Preprocessing:
    """The preprocessing a checkpoint's metadata records (bilinear where it predates interpolation)."""
    return Preprocessing(int(meta["image_size"]), int(meta["resize_size"]), tuple(meta["mean"]), tuple(meta["std"]),
                         meta.get("interpolation", "bilinear"))

