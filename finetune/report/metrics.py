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


# Multi-label: each class a yes/no decision on a probability (a sigmoid output), ``targets`` and
# ``probabilities`` (N images x C classes), targets 0/1.

DEFAULT_THRESHOLD = 0.5  # a class's decision threshold where no validation split chose one


def _ranked(scores: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each distinct score, highest first: the true positives and images at or above it, and the score.

    As scikit-learn's precision-recall curve: tied scores are one threshold."""
    order = torch.argsort(scores, descending=True, stable=True)
    s, y = scores[order].double(), positives[order].double()
    last = torch.ones(len(s), dtype=torch.bool)  # the last image of each run of tied scores
    last[:-1] = s[1:] != s[:-1]
    return y.cumsum(0)[last], torch.arange(1, len(s) + 1, dtype=torch.float64)[last], s[last]


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float | None:
    """The area under one class's precision-recall curve as scikit-learn's ``average_precision_score``
    computes it (sum over thresholds of the recall gained times the precision there); None where the
    class has no positive image (undefined)."""
    if len(scores) == 0 or not bool(positives.any()):
        return None
    tps, counted, _ = _ranked(scores, positives.bool())
    recall = tps / tps[-1]
    gained = torch.diff(recall, prepend=torch.zeros(1, dtype=recall.dtype))
    return float((gained * tps / counted).sum())


def best_f1_threshold(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """The decision threshold that maximises one class's F1 on these images: halfway between the
    lowest score kept and the next lower one (a margin each way); ``DEFAULT_THRESHOLD`` for a
    class without a positive image."""
    if len(scores) == 0 or not bool(positives.any()):
        return DEFAULT_THRESHOLD
    tps, counted, s = _ranked(scores, positives.bool())
    f1 = 2 * tps / (counted + tps[-1])  # 2TP / (2TP + FP + FN); predicted = counted, actual = tps[-1]
    cut = int(torch.argmax(f1))  # the first of equal maxima: the highest threshold
    return float((s[cut] + s[cut + 1]) / 2) if cut + 1 < len(s) else float(s[cut])


def choose_thresholds(targets: torch.Tensor, probabilities: torch.Tensor) -> list[float]:
    """Per-class decision thresholds that maximise each class's F1 on a (validation) split."""
    return [best_f1_threshold(probabilities[:, c], targets[:, c] > 0.5) for c in range(probabilities.shape[1])]


def decisions(probabilities: torch.Tensor, thresholds: Sequence[float] | None = None) -> torch.Tensor:
    """Which classes each image is predicted to have: probability at or over its class's threshold."""
    limit = torch.tensor(thresholds if thresholds is not None else [DEFAULT_THRESHOLD] * probabilities.shape[1],
                         dtype=probabilities.dtype)
    return probabilities >= limit


def _f1(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    total = 2 * tp + fp + fn
    return torch.where(total > 0, 2 * tp / total.clamp(min=1), torch.zeros_like(tp))  # 0 where undefined


def mean_average_precision(targets: torch.Tensor, probabilities: torch.Tensor) -> float:
    """mAP: the mean of the per-class average precisions over the classes with a positive image
    (0 where none has one)."""
    aps = [average_precision(probabilities[:, c], targets[:, c] > 0.5) for c in range(probabilities.shape[1])]
    defined = [ap for ap in aps if ap is not None]
    return sum(defined) / len(defined) if defined else 0.0


def multilabel_scores(targets: torch.Tensor, probabilities: torch.Tensor,
                      thresholds: Sequence[float] | None = None) -> dict[str, float]:
    """The headline figures: ``map``, ``micro_f1``, ``macro_f1`` and ``exact_match`` (the share of
    images whose predicted label set is exactly right), at ``thresholds`` (None: 0.5 each)."""
    truth, predicted = targets > 0.5, decisions(probabilities, thresholds)
    tp = (truth & predicted).sum(dim=0).double()
    fp = (~truth & predicted).sum(dim=0).double()
    fn = (truth & ~predicted).sum(dim=0).double()
    n = len(targets)
    return {"map": mean_average_precision(targets, probabilities),
            "micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())),
            "macro_f1": float(_f1(tp, fp, fn).mean()) if tp.numel() else 0.0,
            "exact_match": float((truth == predicted).all(dim=1).double().mean()) if n else 0.0}


def summarise_multilabel(classes: Sequence[str], targets: torch.Tensor, probabilities: torch.Tensor,
                         thresholds: Sequence[float] | None = None) -> dict[str, Any]:
    """``metrics.json`` content of a multi-label evaluation: mAP (the headline), micro and macro F1,
    the exact-match ratio, and per class its AP (None without a positive image), precision, recall,
    F1, support (images that have it) and threshold.

    Args:
        classes: the class names, in output order.
        targets: N x C, 1 where an image has the class.
        probabilities: N x C sigmoid outputs.
        thresholds: per-class decision thresholds (None: 0.5 each).
    """
    thresholds = list(thresholds) if thresholds is not None else [DEFAULT_THRESHOLD] * len(classes)
    truth, predicted = targets > 0.5, decisions(probabilities, thresholds)
    tp = (truth & predicted).sum(dim=0).double()
    fp = (~truth & predicted).sum(dim=0).double()
    fn = (truth & ~predicted).sum(dim=0).double()
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), torch.zeros_like(tp))
    f1 = _f1(tp, fp, fn)
    per_class = {c: {"ap": average_precision(probabilities[:, i], truth[:, i]), "precision": float(precision[i]),
                     "recall": float(recall[i]), "f1": float(f1[i]), "support": int(truth[:, i].sum()),
                     "threshold": float(thresholds[i])} for i, c in enumerate(classes)}
    return {"task": "multilabel", **multilabel_scores(targets, probabilities, thresholds), "num_samples": len(targets),
            "per_class": per_class, "classes": list(classes), "thresholds": thresholds}
