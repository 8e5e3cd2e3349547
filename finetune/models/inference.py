"""Loading a checkpoint for inference: the one path that eval.py, predict.py, export.py and the
Python API share.

    from finetune import load_classifier
    clf = load_classifier("runs/NAME/model.safetensors")
    clf.predict(["a.jpg", "photos/"], top_k=3)

The checkpoint's metadata says everything: the architecture, the class names in order, and the
preprocessing (crop, resize and its interpolation, mean, std).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from PIL import Image
from torch import nn

from finetune.models.checkpoint import checkpoint_file, load_checkpoint
from finetune.data.images import to_rgb
from finetune.data.inputs import image_paths
from finetune.models.build import build_for_checkpoint, load_exactly
from finetune.data.presets import ModelInput, Preprocessing

ImageInput = str | Path | Image.Image


@dataclass(frozen=True)
class Prediction:
    """The top classes of one image, best first."""

    source: str  # the image's path, or "<image N>" for an in-memory image (N: its position in the input)
    classes: list[str]
    probabilities: list[float]


class LoadedClassifier:
    """A trained classifier ready for inference (see ``load_classifier``).

    Attributes:
        model: the network, in eval mode, on the CPU.
        classes: class names in the order of the model's outputs.
        preprocessing: crop size, eval resize and its interpolation, mean and std.
        meta: the checkpoint's whole metadata.
        path: the checkpoint file.
    """

    def __init__(self, model: nn.Module, classes: list[str], preprocessing: Preprocessing, meta: dict[str, Any],
                 path: Path):
        self.model = model.eval()
        self.classes = classes
        self.preprocessing = preprocessing
        self.meta = meta
        self.path = path
        self._preset = preprocessing.eval_preset()
        self._normalise = ModelInput(preprocessing.mean, preprocessing.std)

    @property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """A PIL image to the model's normalised float input (3 x crop x crop), as eval.py prepares it:
        resize the short side (with the checkpoint's interpolation), center-crop, normalise."""
        return lambda img: self._normalise(self._preset.from_image(to_rgb(img)).unsqueeze(0))[0]

    def uint8_image(self, image: ImageInput) -> torch.Tensor:
        """The resized and cropped uint8 image (3 x crop x crop), before normalisation: a path is
        decoded exactly as eval.py decodes it (large JPEGs at a reduced scale where that suffices)."""
        if isinstance(image, Image.Image):
            return self._preset.from_image(to_rgb(image))
        return self._preset(str(image))

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """The model's outputs for a batch of uint8 images (N x 3 x crop x crop), in fp32."""
        device = next(self.model.parameters()).device
        return self.model(self._normalise(batch.to(device))).float()

    def predict(self, images: ImageInput | Iterable[ImageInput], top_k: int = 1,
                batch_size: int = 32) -> list[Prediction]:
        """Classify images.

        Args:
            images: an image file, a folder (searched recursively for images), a PIL image, or a
                list of these.
            top_k: how many classes to return per image, best first.
            batch_size: images per forward pass.

        Returns:
            One ``Prediction`` per image, in input order (a folder's images sorted by path).
        """
        return list(self.iter_predict(images, top_k=top_k, batch_size=batch_size))

    def iter_predict(self, images: ImageInput | Iterable[ImageInput], top_k: int = 1,
                     batch_size: int = 32) -> Iterator[Prediction]:
        """``predict``, one result at a time: memory stays flat however many images there are."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        k = min(top_k, len(self.classes))
        batch: list[tuple[str, torch.Tensor]] = []
        for source, image in _sources(images):
            batch.append((source, self.uint8_image(image)))
            if len(batch) == batch_size:
                yield from self._classify(batch, k)
                batch = []
        if batch:
            yield from self._classify(batch, k)

    def _classify(self, batch: list[tuple[str, torch.Tensor]], k: int) -> Iterator[Prediction]:
        probs = self.logits(torch.stack([image for _, image in batch])).softmax(dim=1)
        top_p, top_i = probs.topk(k, dim=1)
        for (source, _), p, i in zip(batch, top_p.tolist(), top_i.tolist()):
            yield Prediction(source, [self.classes[j] for j in i], p)


def _sources(images: ImageInput | Iterable[ImageInput]) -> Iterator[tuple[str, ImageInput]]:
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    for position, item in enumerate(images):
        if isinstance(item, Image.Image):
            yield f"<image {position}>", item
        else:
            for path in image_paths([item]):
                yield str(path), path


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> LoadedClassifier:
    """Rebuild a classifier from a checkpoint written by train.py.

    Args:
        path: the ``.safetensors`` checkpoint (``model.safetensors`` or ``best.safetensors``), or a
            run folder (its ``model.safetensors``).
        device: where the model goes.

    Raises:
        UserError: the file is missing, not a checkpoint, or does not fit its own description.
    """
    path = checkpoint_file(path)  # a run folder means its model.safetensors
    state, meta = load_checkpoint(path)
    classes = list(meta["classes"])
    net = build_for_checkpoint(meta["arch"], len(classes), meta)
    load_exactly(net, state, f"{path} does not fit a {meta['arch']} with {len(classes)} classes")
    return LoadedClassifier(net.to(device), classes, preprocessing_of(meta), meta, path)


def preprocessing_of(meta: dict[str, Any]) -> Preprocessing:
    """The preprocessing a checkpoint's metadata records (bilinear where it predates interpolation)."""
    return Preprocessing(int(meta["image_size"]), int(meta["resize_size"]), tuple(meta["mean"]), tuple(meta["std"]),
                         meta.get("interpolation", "bilinear"))

