"""Images unlike the rest of their class: each image's mean cosine similarity to its nearest
images of the same given class, compared with its classmates' by a robust z-score."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finetune.audit.duplicates import unit_embeddings

NEIGHBOURS = 10
# Iglewicz and Hoaglin's cut-off for the modified z-score (0.6745 (x - median) / MAD): an image
# whose typicality lies 3.5 robust deviations below its class's median is an outlier.
Z_CUTOFF = -3.5


@dataclass
class Typicality:
    """Per image: ``similarity``, the mean cosine similarity to its nearest classmates; ``z``, its
    modified z-score within the class (negative: less typical); ``outlier``, below ``Z_CUTOFF``."""

    similarity: np.ndarray
    z: np.ndarray
    outlier: np.ndarray


def class_typicality(features: np.ndarray, labels: np.ndarray, neighbours: int = NEIGHBOURS,
                     cutoff: float = Z_CUTOFF, block: int = 2048) -> Typicality:
    """How typical of its given class each image is (see ``Typicality``).

    A class of fewer than three images has no spread to measure: its images get z = 0.
    """
    unit = unit_embeddings(features)
    similarity = np.zeros(len(labels))
    z = np.zeros(len(labels))
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 3:
            continue
        k = min(neighbours, len(members) - 1)
        for start in range(0, len(members), block):  # memory: block x class size
            rows = members[start:start + block]
            sims = unit[rows] @ unit[members].T
            sims[np.arange(len(rows)), np.arange(start, start + len(rows))] = -np.inf  # not itself
            similarity[rows] = -np.partition(-sims, k - 1, axis=1)[:, :k].mean(axis=1)
        median = np.median(similarity[members])
        mad = np.median(np.abs(similarity[members] - median))
        z[members] = 0.6745 * (similarity[members] - median) / max(mad, 1e-12)
    return Typicality(similarity, z, z <= cutoff)
