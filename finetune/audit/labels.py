"""Likely mislabeled images: out-of-fold class probabilities from k-fold logistic-regression
probes on the embeddings, and confident learning on them.

Confident learning (Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in
Dataset Labels", JAIR 2021): a class's threshold is the mean probability the probes give that
class on the images labelled with it; an image counts towards the "confident joint" entry
(given label, class) of the class that has the highest probability among those at or above their
threshold. The joint, calibrated to the label counts, estimates how many images of each given
label belong elsewhere; that many per given label are pruned, those whose other classes beat the
given one by the widest margin ("prune by noise rate").

One step beyond the paper's first pass, as its own method recommends (train on the cleaned data):
the probes are fitted again with the pruned images left out of their training folds, so that
mislabeled images no longer pull the probes towards their wrong labels, and the final ranking
ranks every image by the probability of its given label under these cleaner out-of-fold
probabilities, relative to that label's threshold (the paper's per-class threshold: a 0.6 means
less in a class whose images average 0.95 than in one whose images average 0.7); the images
flagged are those either pass pruned. ``bench.audit_quality`` measures the gain over a
plain probe ranked by the probability of the given label.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

# The probes' inverse regularisation strength, on standardised L2-normalised embeddings: chosen by
# bench.audit_quality (stronger regularisation keeps a probe from fitting the wrong labels it sees).
PROBE_C = 0.1


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, num_classes: int, *, folds: int = 5,
                              seed: int = 0, C: float = PROBE_C, standardize: bool = True,
                              keep: np.ndarray | None = None) -> np.ndarray:
    """Each image's class probabilities from a probe that did not train on it.

    Args:
        features: (images, dimensions) embeddings.
        labels: (images,) given class indices.
        num_classes: how many classes there are (a class may lack images).
        folds: the number of folds, reduced to the smallest class's image count (at least 2).
        seed: which images share a fold.
        C: logistic regression's inverse regularisation strength.
        standardize: L2-normalise each embedding, then standardise each dimension on the training folds.
        keep: (images,) bool, the images the probes may train on (all where None); every image is
            still predicted by the probe of its own fold.

    Returns:
        (images, classes) probabilities.
    """
    counts = np.bincount(labels, minlength=num_classes)
    folds = int(max(2, min(folds, counts[counts > 0].min())))
    x = _normalized(features) if standardize else features
    keep = np.ones(len(labels), bool) if keep is None else keep
    probs = np.zeros((len(labels), num_classes))
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    # One BLAS thread: the fits are small, and threads that spin against other processes on a busy
    # machine made them ten times slower (measured on two shared cores).
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", message="The least populated class")
        for fit, held in splitter.split(x, labels):
            fit = fit[keep[fit]]
            train = x[fit]
            scaler = StandardScaler().fit(train) if standardize else None
            scale = scaler.transform if scaler else (lambda a: a)
            present = np.unique(labels[fit])
            if len(present) == 1:  # nothing to tell apart: the one class present gets everything
                probs[np.ix_(held, present)] = 1.0
                continue
            probe = LogisticRegression(C=C, max_iter=1000).fit(scale(train), labels[fit])
            probs[np.ix_(held, probe.classes_)] = probe.predict_proba(scale(x[held]))
    return probs


def _normalized(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


@dataclass
class LabelIssues:
    """Confident learning's verdict on every image.

    Attributes:
        order: image indices, most suspicious first: by the probability of their given label
            divided by that label's threshold, lowest first.
        flagged: (images,) bool, pruned as likely mislabeled.
        suggested: (images,) the most probable other class of each image.
        probabilities: (images, classes) the out-of-fold probabilities the ranking used.
        joint: (classes, classes) the calibrated confident joint, estimated image counts with the
            given label (row) that belong to the class (column).
        thresholds: (classes,) each class's threshold: the mean probability of the class over the
            images labelled with it.
    """

    order: np.ndarray
    flagged: np.ndarray
    suggested: np.ndarray
    probabilities: np.ndarray
    joint: np.ndarray
    thresholds: np.ndarray

    def given_probability(self, labels: np.ndarray) -> np.ndarray:
        return self.probabilities[np.arange(len(labels)), labels]

    def relative_confidence(self, labels: np.ndarray) -> np.ndarray:
        """The probability of each image's given label over that label's threshold: the ranking's key."""
        return self.given_probability(labels) / np.maximum(self.thresholds[labels], 1e-12)


def confident_learning(probs: np.ndarray, labels: np.ndarray) -> LabelIssues:
    """Confident learning's pruned set and ranking from out-of-fold probabilities (module docstring).

    Args:
        probs: (images, classes) out-of-fold probabilities.
        labels: (images,) given class indices.
    """
    n, k = probs.shape
    rows = np.arange(n)
    given = probs[rows, labels]
    counts = np.bincount(labels, minlength=k)
    # Per-class thresholds: the mean self-confidence of the images labelled with the class.
    sums = np.bincount(labels, weights=given, minlength=k)
    thresholds = np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)
    above = probs >= thresholds - 1e-9
    confident = np.where(above, probs, -1.0).argmax(axis=1)
    counted = above.any(axis=1)
    joint = np.zeros((k, k))
    np.add.at(joint, (labels[counted], confident[counted]), 1)
    # Calibrated: each row sums to its label's count.
    joint = joint / np.maximum(joint.sum(axis=1, keepdims=True), 1) * counts[:, None]

    others = probs.copy()
    others[rows, labels] = -np.inf
    suggested = others.argmax(axis=1)
    margin = others[rows, suggested] - given
    flagged = np.zeros(n, bool)
    for c in range(k):
        members = np.flatnonzero(labels == c)
        prune = int(round(joint[c].sum() - joint[c, c]))
        if prune:
            flagged[members[np.argsort(-margin[members], kind="stable")[:prune]]] = True
    issues = LabelIssues(np.empty(0, int), flagged, suggested, probs, joint, thresholds)
    issues.order = np.argsort(issues.relative_confidence(labels), kind="stable")
    return issues


def find_label_issues(features: np.ndarray, labels: np.ndarray, num_classes: int, *, folds: int = 5,
                      seed: int = 0) -> LabelIssues:
    """Likely mislabeled images: confident learning on out-of-fold probes, the probes fitted again
    without the first pass's pruned images (module docstring).

    Args:
        features: (images, dimensions) embeddings.
        labels: (images,) given class indices.
        num_classes: how many classes there are.
        folds: folds of the probes.
        seed: which images share a fold.
    """
    first = confident_learning(out_of_fold_probabilities(features, labels, num_classes, folds=folds, seed=seed),
                               labels)
    cleaner = out_of_fold_probabilities(features, labels, num_classes, folds=folds, seed=seed, keep=~first.flagged)
    second = confident_learning(cleaner, labels)
    # Cleaner probes are more confident, which raises the class thresholds: an image the first
    # pass pruned may miss the second's, so either pass flags it.
    second.flagged |= first.flagged
    return second


def baseline_order(features: np.ndarray, labels: np.ndarray, num_classes: int, *, folds: int = 5,
                   seed: int = 0) -> np.ndarray:
    """The plain baseline that ``bench.audit_quality`` compares with: a k-fold logistic-regression
    probe on the raw embeddings (scikit-learn's defaults), images ranked by the probability of
    their given label, lowest first."""
    probs = out_of_fold_probabilities(features, labels, num_classes, folds=folds, seed=seed, C=1.0,
                                      standardize=False)
    return np.argsort(probs[np.arange(len(labels)), labels], kind="stable")
