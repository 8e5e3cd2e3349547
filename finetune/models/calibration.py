"""Calibrated probabilities and "I don't know": pure functions on logits and labels.

A short fine-tune leaves a network overconfident: its softmax says 0.99 where it is right far less
often. Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017)
divides the logits by one scalar ``T``, fitted on held-out images by minimising the negative log
likelihood: the predicted class never changes, only how sure the probabilities say it is.

The out-of-distribution score is the cosine distance of an image's penultimate features (the
head's input) to the nearest of the training images' (Sun et al., "Out-of-Distribution Detection
with Deep Nearest Neighbors", ICML 2022): low for the kind of image the network was trained on,
high for others. Chosen by measurement over the energy ``-logsumexp(logits)`` (Liu et al.,
NeurIPS 2020), the top softmax probability and a Mahalanobis distance: ``bench.ood_quality``. An
image scoring above a threshold taken from in-distribution images (a high percentile of theirs)
is "unknown".

The checkpoint records what was fitted in its metadata (``calibration_meta``), and the training
features as an extra tensor (``OOD_BANK``): a checkpoint without them has ``T = 1`` and no OOD score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

ECE_BINS = 15  # Guo et al.'s choice; equal-width bins of the top-class confidence
OOD_QUANTILE = 0.95  # the share of in-distribution images that stay below the threshold
MAX_TEMPERATURE = 100.0  # a fitted T beyond this means the held-out logits carry no information
OOD_BANK = "train_features"  # unit-length training features, fp16, in the checkpoint's OOD sidecar file
OOD_SIDECAR = "ood"  # model.safetensors -> model.ood.safetensors beside it (checkpoint.sidecar)
OOD_SCORE = "knn_cosine"


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature ``T`` that minimises the NLL of ``softmax(logits / T)`` on ``targets``.

    Optimised over ``log T`` (so ``T`` stays positive) with L-BFGS, in float64.

    Args:
        logits: N x C raw outputs on held-out images.
        targets: N class indices.
        max_iter: L-BFGS iterations (a scalar problem: it converges in a few).
    """
    if logits.ndim != 2 or len(logits) != len(targets) or not len(logits):
        raise ValueError(f"need N x C logits and N targets, got {tuple(logits.shape)} and {tuple(targets.shape)}")
    x, y = logits.detach().double().cpu(), targets.detach().long().cpu()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):
        return 1.0
    return min(max(t, 1.0 / MAX_TEMPERATURE), MAX_TEMPERATURE)


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log likelihood of ``targets`` under ``softmax(logits / temperature)``."""
    return float(nn.functional.cross_entropy(logits.double() / temperature, targets.long()))


def reliability(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Per confidence bin: the mean top-class confidence, the accuracy and the image count.

    Bins are equal-width over (0, 1], by the top-class probability; an empty bin has 0 for both.
    """
    confidence, predicted = probs.double().max(dim=1)
    correct = (predicted == targets.long()).double()
    # Bin b holds confidences in (b/bins, (b+1)/bins]: ceil - 1 puts exactly 1.0 in the last bin.
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1
    counts = torch.bincount(which, minlength=bins).double()
    conf_sum = torch.bincount(which, weights=confidence, minlength=bins)
    acc_sum = torch.bincount(which, weights=correct, minlength=bins)
    safe = counts.clamp(min=1)
    return {"confidence": (conf_sum / safe).tolist(), "accuracy": (acc_sum / safe).tolist(),
            "count": counts.tolist()}


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over ``bins`` bins."""
    table = reliability(probs, targets, bins)
    total = sum(table["count"])
    if not total:
        return 0.0
    return sum(n * abs(a - c) for c, a, n in zip(table["confidence"], table["accuracy"], table["count"])) / total


def energy_score(logits: torch.Tensor) -> torch.Tensor:
    """The energy ``-logsumexp(logits)`` of each image (Liu et al. 2020, T = 1): higher is less
    like the training data. Computed on the raw logits: temperature scaling would rescale it."""
    return -torch.logsumexp(logits.float(), dim=1)


def feature_bank(features: torch.Tensor) -> torch.Tensor:
    """Training features as the OOD score compares with them: unit length, fp16 (half the bytes;
    cosine similarities move by about 1e-3)."""
    return nn.functional.normalize(features.float(), dim=1).half()


def knn_distance(features: torch.Tensor, bank: torch.Tensor, exclude_self: bool = False,
                 chunk: int = 1024) -> torch.Tensor:
    """1 - the cosine similarity of each row of ``features`` to its nearest row of ``bank``.

    Args:
        features: N x D penultimate features.
        bank: M x D unit-length training features (``feature_bank``).
        exclude_self: ``features`` are ``bank``'s own rows, in order: take the second nearest
            (leave-one-out), so that the training images are scored as new ones would be.
    """
    unit = nn.functional.normalize(features.float(), dim=1)
    bank = bank.to(unit.device, torch.float32)
    out = []
    for start in range(0, len(unit), chunk):
        sims = unit[start:start + chunk] @ bank.T
        if exclude_self:
            rows = torch.arange(len(sims), device=sims.device)
            sims[rows, rows + start] = -2.0
        out.append(1 - sims.max(dim=1).values)
    return torch.cat(out) if out else torch.zeros(0, device=unit.device)


def ood_threshold(scores: torch.Tensor, quantile: float = OOD_QUANTILE) -> float:
    """The score below which ``quantile`` of the in-distribution ``scores`` fall."""
    if not len(scores):
        raise ValueError("no in-distribution scores to choose a threshold from")
    return float(torch.quantile(scores.double(), quantile))


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """Area under the ROC curve for telling ``out_scores`` (positives, expected higher) from
    ``in_scores``: the chance that a random out-of-distribution image scores above a random
    in-distribution one, ties counting half (the Mann-Whitney U statistic)."""
    scores = torch.cat([in_scores.double(), out_scores.double()])
    ranks = _average_ranks(scores)
    n_in, n_out = len(in_scores), len(out_scores)
    u = float(ranks[n_in:].sum()) - n_out * (n_out + 1) / 2
    return u / (n_in * n_out)


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = values.argsort()
    sorted_values = values[order]
    ranks = torch.empty_like(values)
    start = 0
    n = len(values)
    while start < n:
        end = start
        while end + 1 < n and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


@dataclass(frozen=True)
class Calibration:
    """What a checkpoint records about its probabilities (all optional: an older checkpoint has none).

    Attributes:
        temperature: divide the logits by it before the softmax (1: uncalibrated).
        ood_threshold: an OOD score above it is out of distribution (None: not fitted).
        fitted_on: which split ``temperature`` was fitted on (``val``), or None.
    """

    temperature: float = 1.0
    ood_threshold: float | None = None
    fitted_on: str | None = None

    @classmethod
    def of(cls, meta: dict[str, Any]) -> "Calibration":
        """The calibration a checkpoint's metadata records; the neutral one where it records none."""
        cal = meta.get("calibration") or {}
        ood = meta.get("ood") or {}
        t = float(cal.get("temperature", 1.0))
        if not math.isfinite(t) or t <= 0:
            t = 1.0
        threshold = ood.get("threshold")
        return cls(t, None if threshold is None else float(threshold), cal.get("fitted_on"))

    @property
    def calibrated(self) -> bool:
        return self.fitted_on is not None


def calibration_meta(val_logits: torch.Tensor | None, val_targets: torch.Tensor | None,
                     in_scores: torch.Tensor | None, scored_on: str | None) -> dict[str, Any]:
    """The metadata keys a checkpoint gains: ``calibration`` (where there are validation logits)
    and ``ood`` (where there are in-distribution OOD scores).

    Args:
        val_logits, val_targets: the checkpoint's logits on the validation split and its labels.
        in_scores: OOD scores of in-distribution images (validation, else training images).
        scored_on: which split ``in_scores`` came from.
    """
    meta: dict[str, Any] = {}
    if val_logits is not None and val_targets is not None and len(val_targets):
        t = fit_temperature(val_logits, val_targets)
        if bool((val_logits.argmax(1) == val_targets).all()):
            # With no mistake to weigh, the NLL falls for ever as T -> 0: a fitted T < 1 there
            # sharpens on no evidence (measured: test NLL 0.04 -> 0.15 on photos), so it stays 1.
            t = max(t, 1.0)
        before, after = val_logits.softmax(1), (val_logits / t).softmax(1)
        meta["calibration"] = {
            "method": "temperature", "temperature": t, "fitted_on": "val", "images": len(val_targets),
            "val_nll_before": nll(val_logits, val_targets), "val_nll_after": nll(val_logits, val_targets, t),
            "val_ece_before": expected_calibration_error(before, val_targets),
            "val_ece_after": expected_calibration_error(after, val_targets)}
    if in_scores is not None and len(in_scores):
        meta["ood"] = {"score": OOD_SCORE, "threshold": ood_threshold(in_scores), "quantile": OOD_QUANTILE,
                       "fitted_on": scored_on, "images": len(in_scores)}
    return meta


def calibration_figures(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                        bins: int = ECE_BINS) -> dict[str, Any]:
    """ECE and NLL of raw and temperature-scaled probabilities, and both reliability tables.

    Args:
        logits: N x C raw outputs; targets: N class indices.
        temperature: the checkpoint's (1 where it records none).
    """
    raw, scaled = logits.float().softmax(1), (logits.float() / temperature).softmax(1)
    return {"temperature": temperature, "bins": bins,
            "ece_before": expected_calibration_error(raw, targets, bins),
            "ece_after": expected_calibration_error(scaled, targets, bins),
            "nll_before": nll(logits, targets), "nll_after": nll(logits, targets, temperature),
            "reliability_before": reliability(raw, targets, bins),
            "reliability_after": reliability(scaled, targets, bins)}
