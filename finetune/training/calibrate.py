"""After the last epoch: each checkpoint's temperature and out-of-distribution threshold, fitted on
held-out images and added to its metadata (``models.calibration``).

The temperature is fitted on the validation split (``val/`` or ``--val-fraction``): never on the
test split, whose figures must stay unbiased, nor on the training images, on which a fine-tuned
network is more confident than on new ones. The OOD threshold comes from the validation images
too, else from (up to ``MAX_TRAIN_IMAGES`` of) the training images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from finetune.data.folders import Splits
from finetune.data.loader import make_eval_loader
from finetune.models.calibration import calibration_meta, energy_score
from finetune.models.checkpoint import load_checkpoint, save_checkpoint
from finetune.models.inference import LoadedClassifier, forward_batches, load_classifier

CHECKPOINTS = ("model.safetensors", "best.safetensors")
MAX_TRAIN_IMAGES = 2000  # enough for a 95th percentile; a pass over a large training set would cost minutes
UNCALIBRATED_NOTE = ("note: no validation split, so the probabilities are the network's uncalibrated softmax "
                     "(typically overconfident); hold out a validation split with --val-fraction 0.1 (or a val/ "
                     "folder) for calibrated ones")


class _Ignore:
    """An unreadable image (``--bad-data skip``) comes back blank with index -1: left out below."""

    def record(self, path: str, why: str) -> None:
        pass


class _Subset:
    """Every n-th sample of a dataset, as the ``samples`` list the eval loader reads."""

    def __init__(self, samples: list[tuple[str, int]], limit: int):
        step = max(1, -(-len(samples) // limit))
        self.samples = samples[::step]

    def __len__(self) -> int:
        return len(self.samples)


def held_out_logits(clf: LoadedClassifier, dataset: Any, *, batch_size: int,
                    num_workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw logits and labels of every readable image of ``dataset``, computed as eval.py computes them."""
    loader = make_eval_loader(dataset, clf.preprocessing, batch_size=batch_size, num_workers=num_workers,
                              skipped=_Ignore())
    device = clf.device
    logits, targets = [], []
    with clf.autocast():
        batches = ((images.to(device), labels, indices) for images, labels, indices in loader)
        for out, (labels, indices) in forward_batches(clf.model, batches, clf.to_input):
            kept = indices >= 0
            logits.append(out.cpu()[kept])
            targets.append(labels[kept])
    return torch.cat(logits), torch.cat(targets)


def calibrate_run(run_dir: Path, splits: Splits, *, device: str | torch.device, batch_size: int,
                  num_workers: int) -> list[str]:
    """Fit and record the temperature and OOD threshold of each checkpoint in ``run_dir`` (one process).

    Returns:
        The lines to print: what was fitted, or how to get calibrated probabilities.
    """
    lines, done = [], {}
    for name in CHECKPOINTS:
        path = run_dir / name
        if not path.is_file():
            continue
        clf = load_classifier(path, device)
        epoch = clf.meta.get("metrics", {}).get("epoch")
        if epoch not in done:  # best.safetensors of the last epoch has the weights of model.safetensors
            done[epoch] = _fit(clf, splits, batch_size=batch_size, num_workers=num_workers)
        extra = done[epoch]
        state, meta = load_checkpoint(path)
        save_checkpoint(path, state, {**meta, **extra})
        if "calibration" in extra:
            c = extra["calibration"]
            lines.append(f"{name}: temperature {c['temperature']:.3f} fitted on {c['images']} val images "
                         f"(NLL {c['val_nll_before']:.3f} -> {c['val_nll_after']:.3f}, "
                         f"ECE {c['val_ece_before']:.3f} -> {c['val_ece_after']:.3f})")
    if splits.val is None:
        lines.append(UNCALIBRATED_NOTE)
    return lines


def _fit(clf: LoadedClassifier, splits: Splits, *, batch_size: int, num_workers: int) -> dict[str, Any]:
    if splits.val is not None:
        logits, targets = held_out_logits(clf, splits.val, batch_size=batch_size, num_workers=num_workers)
        return calibration_meta(logits, targets, energy_score(logits), "val")
    train = _Subset(list(splits.train.samples), MAX_TRAIN_IMAGES)
    logits, _ = held_out_logits(clf, train, batch_size=batch_size, num_workers=num_workers)
    return calibration_meta(None, None, energy_score(logits), "train")
