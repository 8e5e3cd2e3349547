"""Dataset preflight: find what would break or mislead a run before it starts.

Two depths. ``quick`` (at the start of every run) reads each file's header: zero-byte files,
files that are not images, decompression bombs, files whose content does not match their
extension. ``full`` (``train.py --check-data``) also decodes every image (truncated files) and
hashes every file to find images shared between train and test.

The folder layout itself (splits, class folders, classes with no images left once bad files are
skipped) is ``data.load_splits``'s to check: the preflight reports on files.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from finetune.data import EVAL_SPLITS, class_folders, find_split, image_files
from finetune.errors import UserError
from finetune.files import file_digest

IMBALANCE_RATIO = 10  # largest class / smallest class above this is reported
# What each extension should hold (Pillow's format names).
EXPECTED_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF",
                    ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM", ".pgm": "PPM"}


@dataclass
class Report:
    """What a preflight found. ``bad`` files cannot be used; the rest are warnings."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> images
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    wrong_extension: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (train path, test path)
    warnings: list[str] = field(default_factory=list)

    def bad_paths(self) -> set[str]:
        return {p for p, _ in self.bad}


def _check_file(path: Path, full: bool) -> tuple[str | None, str | None, str | None]:
    """(problem, actual format if the extension is wrong, content hash if ``full``)."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)", None, None
        with Image.open(path) as img:
            fmt = img.format
            width, height = img.size
            if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
                return f"{width}x{height} pixels, over Pillow's decompression-bomb limit", None, None
            if full:
                img.load()
    except Image.DecompressionBombError:
        return "over Pillow's decompression-bomb limit", None, None
    except Image.UnidentifiedImageError:
        return "not an image", None, None
    except (OSError, SyntaxError, ValueError) as err:
        return f"cannot be decoded ({err})", None, None
    expected = EXPECTED_FORMATS.get(path.suffix.lower())
    wrong = fmt if expected and fmt and fmt != expected else None
    digest = file_digest(path) if full else None
    return None, wrong, digest


def check_dataset(data_dir: str | Path, full: bool = False, workers: int | None = None) -> Report:
    """Preflight of ``DATA/train`` and ``DATA/test`` (or ``val``); see the module docstring.

    Args:
        data_dir: the dataset folder.
        full: also decode every image and look for train/test duplicates.
        workers: threads reading files (default: the CPU count).
    """
    data_dir = Path(data_dir)
    report = Report()
    splits = {"train": find_split(data_dir, ("train",)), "test": find_split(data_dir, EVAL_SPLITS)}
    files: dict[str, dict[str, list[Path]]] = {}
    for split, folder in splits.items():
        if folder is None or not folder.is_dir():
            continue
        files[split] = {c: image_files(folder / c) for c in class_folders(folder)}

    jobs = [(split, c, p) for split, by_class in files.items() for c, paths in by_class.items() for p in paths]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        results = list(pool.map(lambda job: _check_file(job[2], full), jobs))
    hashes: dict[str, dict[str, str]] = {"train": {}, "test": {}}
    bad = set()
    for (split, _, path), (problem, wrong, digest) in zip(jobs, results):
        if problem:
            report.bad.append((str(path), problem))
            bad.add(path)
            continue
        if wrong:
            report.wrong_extension.append((str(path), wrong))
        if digest:
            hashes[split].setdefault(digest, str(path))

    for split, by_class in files.items():
        report.counts[split] = {c: sum(p not in bad for p in paths) for c, paths in by_class.items()}
    train_counts = [n for n in report.counts.get("train", {}).values() if n > 0]
    if train_counts and max(train_counts) > IMBALANCE_RATIO * min(train_counts):
        report.warnings.append(f"classes are very imbalanced in train: {max(train_counts)} vs {min(train_counts)} "
                               "images (consider --class-weights auto or more data)")
    report.duplicates = [(hashes["train"][h], p) for h, p in hashes["test"].items() if h in hashes["train"]]
    if report.duplicates:
        report.warnings.append(f"{len(report.duplicates)} test image(s) also appear in train: "
                               "test accuracy will be optimistic")
    if report.wrong_extension:
        report.warnings.append(f"{len(report.wrong_extension)} file(s) hold another format than their extension "
                               "says (they load fine)")
    return report


def _listing(items: list[tuple[str, str]], limit: int = 10) -> str:
    shown = "; ".join(f"{path} ({why})" for path, why in items[:limit])
    return shown + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def apply_policy(report: Report, policy: str) -> tuple[set[str], list[str]]:
    """The files to leave out of the run and the lines to print, under ``--bad-data fail|skip``.

    Raises:
        UserError: on bad files when the policy is ``fail``.
    """
    notes = list(report.warnings)
    if report.bad:
        if policy == "fail":
            raise UserError(f"{len(report.bad)} image(s) cannot be used: {_listing(report.bad)}; "
                            "fix or remove them, or pass --bad-data skip")
        notes.insert(0, f"skipping {len(report.bad)} image(s) that cannot be used: {_listing(report.bad)}")
    return report.bad_paths(), notes
