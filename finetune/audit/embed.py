"""One embedding per image of every split: the input of the backbone's classifier layer (the
linear probe's cached features, ``training.features``), under evaluation preprocessing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from finetune.data.folders import Splits
from finetune.data.presets import ModelInput, Preprocessing
from finetune.models.build import build_classifier
from finetune.models.inference import load_classifier
from finetune.training.features import extract_features


@dataclass
class Backbone:
    """A network whose classifier layer's input is the embedding.

    Attributes:
        net: the network, in eval mode.
        head: dotted name of its classifier layer.
        preprocessing: the evaluation resize, crop and normalisation it expects.
        name: what to call it in messages (model and weights, or the checkpoint).
        precision: the precision to compute in (``no``, ``bf16``, ``fp16``); None: the accelerator's choice.
    """

    net: nn.Module
    head: str
    preprocessing: Preprocessing
    name: str
    precision: str | None = None


def pretrained_backbone(model: str, weights: str, image_size: int) -> Backbone:
    """A pretrained torchvision (or ``timm/``) model as ``train.py`` builds it (``--model``, ``--weights``)."""
    clf = build_classifier(model, weights, ["a", "b"], image_size=image_size)  # the new head is never run for use
    return Backbone(clf.net.eval(), clf.head, clf.preprocessing, f"{model} from {clf.weights.name}")


def checkpoint_backbone(path: str, mixed_precision: str = "auto") -> Backbone:
    """A checkpoint's own fine-tuned network (``--ckpt``), at the precision its training tested in."""
    clf = load_classifier(path, mixed_precision=mixed_precision, channels_last=False)
    return Backbone(clf.model, clf.meta["head"], clf.preprocessing, str(clf.path), clf.precision)


@dataclass
class Embeddings:
    """Every image of a dataset, split after split, with its embedding.

    Attributes:
        features: (images, dimensions) float32.
        labels: (images,) class index of each image's given label.
        paths: each image's file.
        splits: each image's split (``train``, ``val`` or ``test``).
        classes: class names, in label order.
    """

    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    splits: list[str]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def embed(accelerator: Accelerator, splits: Splits, backbone: Backbone, *, batch_size: int,
          num_workers: int) -> Embeddings:
    """The embeddings of every image of ``splits`` (train, then val, then test), on every process.

    Each process computes its shard of each split; the shards are gathered in dataset order
    (``training.features.extract_features``), so every process ends with the same arrays.
    """
    pre = backbone.preprocessing
    net = backbone.net.to(memory_format=torch.channels_last)  # the loader's batches come channels-last
    to_input = ModelInput(pre.mean, pre.std, channels_last=True)
    parts = [("train", splits.train), ("val", splits.val), ("test", splits.test)]
    features, labels, paths, names = [], [], [], []
    for name, dataset in parts:
        if dataset is None or not dataset.samples:
            continue
        x, y = extract_features(accelerator, net, backbone.head, dataset, pre, to_input, batch_size=batch_size,
                                num_workers=num_workers)
        features.append(x.flatten(1).numpy().astype(np.float32))
        labels.append(y.numpy().astype(np.int64))
        paths += [path for path, _ in dataset.samples]
        names += [name] * len(dataset.samples)
    return Embeddings(np.concatenate(features), np.concatenate(labels), paths, names, list(splits.classes))
