"""Classification metrics from predictions, as plain functions on tensors."""

from __future__ import annotations

from typing import Any, Sequence

import torch


def confusion_matrix(targets: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``m[t, p]`` counts images of true class ``t`` predicted as ``p``."""
    flat = targets.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def precision_recall(matrix: torch.Tensor) -> tuple[list[float], list[float], list[int]]:
    """Per-class precision, recall and support from a confusion matrix (0 where undefined)."""
    m = matrix.double()
    tp = m.diagonal()
    predicted, actual = m.sum(dim=0), m.sum(dim=1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    return precision.tolist(), recall.tolist(), actual.long().tolist()


def summarise(classes: Sequence[str], targets: torch.Tensor, topk: torch.Tensor) -> dict[str, Any]:
    """``metrics.json`` content: accuracy (a fraction), top-5 where there are more than 5 classes,
    per-class precision/recall, and the confusion matrix."""
    n = len(targets)
    matrix = confusion_matrix(targets, topk[:, 0], len(classes))
    precision, recall, support = precision_recall(matrix)
    result: dict[str, Any] = {
        "accuracy": (topk[:, 0] == targets).float().mean().item() if n else 0.0,
        "num_samples": n,
    }
    if len(classes) > 5:
        result["top5_accuracy"] = (topk[:, :5] == targets[:, None]).any(dim=1).float().mean().item() if n else 0.0
    result["per_class"] = {c: {"precision": p, "recall": r, "support": s}
                           for c, p, r, s in zip(classes, precision, recall, support)}
    result["classes"] = list(classes)
    result["confusion_matrix"] = matrix.tolist()
    return result
