"""After the last epoch: each checkpoint's temperature and out-of-distribution score, fitted on
held-out images and added to it (``models.calibration``).

The temperature is fitted on the validation split (``val/`` or ``--val-fraction``): never on the
test split, whose figures must stay unbiased, nor on the training images, on which a fine-tuned
network is more confident than on new ones. The OOD score compares an image's features with those
of (up to ``MAX_TRAIN_IMAGES`` of) the training images, stored in the checkpoint; its threshold
comes from the validation images, else from the training images, each left out of the comparison
with itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from finetune.data.folders import Splits
from finetune.data.loader import make_eval_loader
from finetune.models.calibration import OOD_BANK, OOD_SIDECAR, calibration_meta, feature_bank, knn_distance
from finetune.models.checkpoint import (
    load_checkpoint,
    load_safetensors,
    read_metadata,
    save_checkpoint,
    save_tensors,
    sidecar,
)
from finetune.models.inference import LoadedClassifier, forward_batches, load_classifier
from finetune.utils.files import atomic_link

CHECKPOINTS = ("model.safetensors", "best.safetensors")
# The OOD score's reference images: enough to cover a small dataset whole (fp16 features: 2000 x 1280
# of mobilenet_v2 add 5 MB to the checkpoint); a pass over a large training set would cost minutes.
MAX_TRAIN_IMAGES = 2000
UNCALIBRATED_NOTE = ("note: no validation split, so the probabilities are the network's uncalibrated softmax "
                     "(typically overconfident); hold out a validation split with --val-fraction 0.1 (or a val/ "
                     "folder) for calibrated ones")


class _Ignore:
    """An unreadable image (``--bad-data skip``) comes back blank with index -1: left out below."""

    def record(self, path: str, why: str) -> None:
        pass


class _Subset:
    """Every n-th sample of a dataset, as the ``samples`` list the eval loader reads."""

    def __init__(self, samples: list[tuple[str, Any]], limit: int, classes: list[str]):
        step = max(1, -(-len(samples) // limit))
        self.samples = samples[::step]
        self.classes = classes  # a multi-label sample's tuple of classes becomes a vector of this length

    def __len__(self) -> int:
        return len(self.samples)


def held_out_outputs(clfs: Sequence[LoadedClassifier], dataset: Any, *, batch_size: int,
                     num_workers: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Raw logits, penultimate features and labels of every readable image of ``dataset``, computed
    as eval.py computes them (its preprocessing and precision; with BatchNorm folded where ``clfs``
    were loaded so), for each of ``clfs`` (one run's checkpoints, which share their preprocessing):
    each image is read and decoded once for all of them."""
    loader = make_eval_loader(dataset, clfs[0].preprocessing, batch_size=batch_size, num_workers=num_workers,
                              skipped=_Ignore())
    outputs: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = [([], []) for _ in clfs]
    targets = []
    for images, labels, indices in loader:
        kept = indices >= 0
        targets.append(labels[kept])
        batch = clfs[0].to_input(images.to(clfs[0].device))  # normalised once for all of them
        for clf, (logits, features) in zip(clfs, outputs):
            with clf.autocast(), clf.feature_tap() as tap:
                out, _ = next(forward_batches(clf.model, [(batch,)], lambda x: x))
            logits.append(out.cpu()[kept])
            features.append(tap.features.cpu()[kept])
    labels = torch.cat(targets)
    return [(torch.cat(logits), torch.cat(features), labels) for logits, features in outputs]


def calibrate_run(run_dir: Path, splits: Splits, *, device: str | torch.device, batch_size: int,
                  num_workers: int, missing_only: bool = False) -> list[str]:
    """Fit and record the temperature and OOD threshold of each checkpoint in ``run_dir`` (one process).

    Each checkpoint's OOD file is written before the checkpoint that names it: a kill between the
    two leaves a checkpoint without its fit, which ``missing_only`` finds again.

    Args:
        missing_only: only the checkpoints without them (a kill interrupted the calibration).

    Returns:
        The lines to print: what was fitted, or how to get calibrated probabilities (nothing where
        nothing was missing).
    """
    metas = {run_dir / name: read_metadata(run_dir / name) for name in CHECKPOINTS if (run_dir / name).is_file()}
    done = {path for path, meta in metas.items() if missing_only and _calibrated(path, meta)}
    todo = [path for path in metas if path not in done]
    if not todo:
        return []
    epoch = {path: meta.get("metrics", {}).get("epoch") for path, meta in metas.items()}
    source: dict[Any, Path] = {}  # epoch: the checkpoint whose fit serves it (best.safetensors of the last epoch)
    for path in sorted(metas, key=lambda path: path not in done):  # one already fitted first
        source.setdefault(epoch[path], path)
    fit = list(dict.fromkeys(source[epoch[path]] for path in todo if source[epoch[path]] not in done))
    # BatchNorm folded: 10% faster passes on a CPU (resnet18, 192 images: 2.7 -> 2.4 s for both
    # checkpoints), and the fit is a statistic of many images, which a rounding difference in one
    # does not move.
    clfs = [load_classifier(path, device, fold_batchnorm=True) for path in fit]
    fits = dict(zip(fit, _fit(clfs, splits, batch_size=batch_size, num_workers=num_workers))) if fit else {}
    lines = []
    for path in todo:
        src = source[epoch[path]]
        meta_keys = fits[src][0] if src in fits else {k: metas[src][k] for k in ("calibration", "ood") if k in metas[src]}
        if path == src or not _link(src, path):  # a second name of the same epoch's files where it can
            save_tensors(sidecar(path, OOD_SIDECAR),
                         fits[src][1] if src in fits else load_safetensors(sidecar(src, OOD_SIDECAR)))
            state, meta = load_checkpoint(path)
            save_checkpoint(path, state, {**meta, **meta_keys})
        if "calibration" in meta_keys:
            c = meta_keys["calibration"]
            lines.append(f"{path.name}: temperature {c['temperature']:.3f} fitted on {c['images']} val images "
                         f"(NLL {c['val_nll_before']:.3f} -> {c['val_nll_after']:.3f}, "
                         f"ECE {c['val_ece_before']:.3f} -> {c['val_ece_after']:.3f})")
    if splits.val is None:
        lines.append(UNCALIBRATED_NOTE)
    return lines


def _calibrated(path: Path, meta: dict[str, Any]) -> bool:
    """Whether a checkpoint records its fit and has the OOD file it names."""
    return "ood" in meta and sidecar(path, OOD_SIDECAR).is_file()


def _link(source: Path, path: Path) -> bool:
    """``path`` and its OOD file as second names of ``source``'s (the same epoch's weights), the
    OOD file first."""
    return atomic_link(sidecar(source, OOD_SIDECAR), sidecar(path, OOD_SIDECAR)) and atomic_link(source, path)


def _fit(clfs: Sequence[LoadedClassifier], splits: Splits, *, batch_size: int,
         num_workers: int) -> list[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """Per checkpoint: the metadata keys and the extra tensors (the OOD score's training features)."""
    train = _Subset(list(splits.train.samples), MAX_TRAIN_IMAGES, splits.classes)
    train_features = [features for _, features, _ in
                      held_out_outputs(clfs, train, batch_size=batch_size, num_workers=num_workers)]
    banks = [feature_bank(features) for features in train_features]
    if splits.val is None:
        return [(calibration_meta(None, None, knn_distance(features, bank, exclude_self=True), "train"),
                 {OOD_BANK: bank}) for features, bank in zip(train_features, banks)]
    val = held_out_outputs(clfs, splits.val, batch_size=batch_size, num_workers=num_workers)
    fits = []
    for clf, bank, (logits, features, targets) in zip(clfs, banks, val):
        scores = knn_distance(features, bank)
        # temperature scaling fits a softmax; a multi-label head keeps its per-class thresholds
        fits.append((calibration_meta(None if clf.multilabel else logits, None if clf.multilabel else targets,
                                      scores, "val"), {OOD_BANK: bank}))
    return fits
