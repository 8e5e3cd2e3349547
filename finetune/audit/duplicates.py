"""Exact copies (the same bytes) and near-duplicates (resized, recompressed, slightly cropped
copies: embeddings whose cosine similarity passes a threshold), within and across splits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from finetune.utils.files import file_digest

# Cosine similarity of centred, L2-normalised embeddings at or above which two images count as
# near-duplicates. Measured by bench.audit_quality with the default backbone (docs/trust.md): on
# 256-pixel photos every planted copy scores 0.90 or more (0.93 loses a sixth of them); distinct
# images of 25-96 pixels pass it too, and copies of them may not (see the docs' limits).
NEAR_THRESHOLD = 0.90


@dataclass(frozen=True)
class Pair:
    """Two images, ``first`` < ``second`` by index, and how alike they are."""

    first: int
    second: int
    similarity: float
    exact: bool


def exact_copies(paths: Sequence[str]) -> list[Pair]:
    """Pairs of files with the same bytes: each copy paired with the first file of its content."""
    first_of: dict[str, int] = {}
    pairs = []
    for i, path in enumerate(paths):
        digest = file_digest(path)
        if digest in first_of:
            pairs.append(Pair(first_of[digest], i, 1.0, True))
        else:
            first_of[digest] = i
    return pairs


def unit_embeddings(features: np.ndarray) -> np.ndarray:
    """Embeddings centred on their mean and scaled to unit length: what every backbone embedding
    shares (most of a ReLU feature's length) no longer makes unrelated images look alike."""
    centred = features - features.mean(axis=0, keepdims=True)
    return centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)


def near_duplicates(features: np.ndarray, threshold: float = NEAR_THRESHOLD, block: int = 2048) -> list[Pair]:
    """Pairs whose embeddings' cosine similarity (``unit_embeddings``) is at least ``threshold``,
    most alike first; computed a block of rows at a time, so memory stays at ``block`` x images."""
    unit = unit_embeddings(features).astype(np.float32)
    pairs = []
    for start in range(0, len(unit), block):
        sims = unit[start:start + block] @ unit.T
        rows, cols = np.nonzero(sims >= threshold)
        rows += start
        later = cols > rows  # each pair once, and not an image with itself
        pairs += [Pair(int(a), int(b), float(sims[a - start, b]), False)
                  for a, b in zip(rows[later], cols[later])]
    return sorted(pairs, key=lambda p: -p.similarity)


def find_duplicates(paths: Sequence[str], features: np.ndarray, threshold: float = NEAR_THRESHOLD) -> list[Pair]:
    """Exact copies first, then the near-duplicates that are not exact copies, most alike first."""
    exact = exact_copies(paths)
    known = {(p.first, p.second) for p in exact}
    return exact + [p for p in near_duplicates(features, threshold) if (p.first, p.second) not in known]
