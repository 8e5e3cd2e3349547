"""Exact copies (the same bytes) and near-duplicates (resized, recompressed, slightly cropped
copies), within and across splits.

Near-duplicates are told by the pixels, not by the embedding: the embedding says what an image
shows, so two different trousers on black, or two crops of one texture, are as alike to it as a
copy (bench.audit_quality, docs/trust.md). Each image gets a small signature, an 8x8 grayscale
thumbnail with its mean removed, scaled to unit length, of the whole image and of nine 92%
crops of it; and a pair counts by a ratio test (Lowe's, as in image matching) rather than by an
absolute threshold: the two are each other's nearest image and their distance is at most
``ratio`` times the distance from either to its next-nearest image. A copy stands out from every
other image; two alike images of one kind stand among many others just as alike.

The ratio test compares shapes (mean and contrast removed), and in a small or varied dataset a
rare shape has no next-nearest image to measure against: two distinct images of one plain edge,
one white and one grey, pass it. A resized, recompressed or slightly cropped copy keeps its grey
levels too, so a pair is confirmed on them: its thumbnails, aligned by the best of the crops, must
differ by at most ``LEVEL_RMS`` grey levels (root mean square).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from finetune.data.images import load_rgb, read_image_bytes

# The ratio test's bound for whole thumbnails, measured by bench.audit_quality (docs/trust.md).
NEAR_RATIO = 0.4
# Comparing every image with nine crops of the others also brings distinct images closer: the
# crop-tolerant comparison must pass at this share of the ratio (bench.audit_quality).
CROP_RATIO_SHARE = 0.5
# The largest root-mean-square difference, in grey levels of 0-255, between a pair's aligned
# thumbnails: a tenth of the range. The planted copies of bench.audit_quality differ by 3-14; the
# distinct images alike in shape that pass the ratio test at 0.5, by 8-69 (docs/trust.md).
LEVEL_RMS = 25.5
THUMB = 8  # thumbnail side: fine enough to tell two photos of one kind apart, coarse enough to ignore JPEG and blur
CROP = 0.92  # the crops' side, a share of the image's: what a slightly cropped copy keeps
_BASE = 64  # the grayscale image the thumbnails are cut from


@dataclass(frozen=True)
class Pair:
    """Two images, ``first`` < ``second`` by index, and how alike they are (for near-duplicates, the
    cosine similarity of their signatures)."""

    first: int
    second: int
    similarity: float
    exact: bool


def exact_copies(paths: Sequence[str]) -> list[Pair]:
    """Pairs of images with the same bytes (files, or a dataset's rows): each copy paired with the
    first image of its content."""
    first_of: dict[str, int] = {}
    pairs = []
    for i, path in enumerate(paths):
        digest = hashlib.sha256(read_image_bytes(path)).hexdigest()
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


def _unit(a: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=-1, keepdims=True)
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-6)


def signature(image: Image.Image) -> np.ndarray:
    """(10, 64) float32: the 8x8 grayscale thumbnail (grey levels 0-255) of the whole image, then of
    its nine ``CROP`` crops (each corner, each edge's middle, the centre)."""
    gray = image.convert("L").resize((_BASE, _BASE), Image.Resampling.BOX)
    side = _BASE * CROP
    slack = _BASE - side
    boxes = [(0.0, 0.0, _BASE, _BASE)] + [(x * slack, y * slack, x * slack + side, y * slack + side)
                                          for y in (0, 0.5, 1) for x in (0, 0.5, 1)]
    views = [np.asarray(gray.resize((THUMB, THUMB), Image.Resampling.BOX, box=box), np.float32).ravel()
             for box in boxes]
    return np.stack(views)


def signatures(paths: Sequence[str]) -> np.ndarray:
    """(images, 10, 64): each image's ``signature``, decoded as training decodes it (any mode, EXIF
    orientation, dataset rows), a JPEG at a fraction of its size (much faster)."""
    out = np.zeros((len(paths), 1 + 9, THUMB * THUMB), np.float32)
    for i, path in enumerate(paths):
        out[i] = signature(load_rgb(path, reduce_to=(2 * _BASE, 2 * _BASE)))
    return out


def _levels_agree(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two images' thumbnails (``signature``s), aligned by the best of the whole-against-crop
    comparisons, differ by at most ``LEVEL_RMS`` grey levels."""
    shapes = [(a[0], b[0])] + [(a[v], b[0]) for v in range(1, len(a))] + [(a[0], b[v]) for v in range(1, len(b))]
    x, y = max(shapes, key=lambda s: float(_unit(s[0]) @ _unit(s[1])))
    return float(np.sqrt(np.mean((x - y) ** 2))) <= LEVEL_RMS


def _nearest_two(sims: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row of a block of similarities: the most similar column (not the row's own image),
    its similarity and the second-highest similarity."""
    sims[np.arange(len(rows)), rows] = -np.inf
    best = sims.argmax(axis=1)
    top = sims[np.arange(len(rows)), best]
    sims[np.arange(len(rows)), best] = -np.inf
    return best, top, sims.max(axis=1)


def near_duplicates(sigs: np.ndarray, ratio: float = NEAR_RATIO, skip: np.ndarray | None = None,
                    block: int = 1024) -> list[Pair]:
    """Pairs that pass the ratio test (module docstring) on whole thumbnails at ``ratio``, or on
    crop-tolerant ones (each image's crops against the other's whole thumbnail, the best of both
    ways) at ``CROP_RATIO_SHARE * ratio``, and whose grey levels agree (``LEVEL_RMS``); most alike
    first. Memory stays at ``block`` x images.

    Args:
        sigs: (images, views, dims) ``signatures``, the whole image's first.
        ratio: the largest share of the next-nearest distance a pair's distance may be.
        skip: (images,) bool, images left out (exact copies of another: they would hide its pairs).
    """
    n = len(sigs)
    keep = np.flatnonzero(np.ones(n, bool) if skip is None else ~skip)
    if len(keep) < 3:
        return []
    levels = sigs[keep]
    sigs = _unit(levels)
    whole = sigs[:, 0]
    found: dict[tuple[int, int], float] = {}
    for crops, bound in ((False, ratio), (True, ratio * CROP_RATIO_SHARE)):
        nearest = np.zeros(len(keep), int)
        top, second = np.zeros(len(keep)), np.zeros(len(keep))
        for start in range(0, len(keep), block):
            rows = np.arange(start, min(start + block, len(keep)))
            sims = whole[rows] @ whole.T
            for view in range(1, sigs.shape[1]) if crops else ():  # a's crops against b's whole, and back
                np.maximum(sims, sigs[rows, view] @ whole.T, out=sims)
                np.maximum(sims, whole[rows] @ sigs[:, view].T, out=sims)
            nearest[rows], top[rows], second[rows] = _nearest_two(sims, rows)
        for a in range(len(keep)):
            b = nearest[a]
            if a < b and nearest[b] == a:  # each other's nearest
                distance = 1 - top[a]
                if distance <= bound * min(1 - second[a], 1 - second[b]) and _levels_agree(levels[a], levels[b]):
                    pair = (int(keep[a]), int(keep[b]))
                    found[pair] = max(found.get(pair, -1.0), float(top[a]))
    return sorted((Pair(a, b, s, False) for (a, b), s in found.items()), key=lambda p: -p.similarity)


def find_duplicates(paths: Sequence[str], ratio: float = NEAR_RATIO) -> list[Pair]:
    """Exact copies first, then the near-duplicates that are not exact copies, most alike first."""
    exact = exact_copies(paths)
    skip = np.zeros(len(paths), bool)
    skip[[p.second for p in exact]] = True
    return exact + near_duplicates(signatures(paths), ratio, skip)
