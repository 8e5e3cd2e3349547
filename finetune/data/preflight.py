"""Dataset preflight: find what would break or mislead a run before it starts.

Two depths. ``quick`` (at the start of every run) reads each file's header: zero-byte files,
files that are not images, decompression bombs, files whose content does not match their
extension. ``full`` (``train.py --check-data``) also decodes every image (truncated files) and
hashes every file to find images shared between train and test.

The folder layout itself (splits, class folders, classes with no images left once bad files are
skipped) is ``sources.load_splits``'s to check: the preflight reports on files. For a label file it
checks the images the rows list, and reports rows that name no image and images that are missing.
For a Hugging Face dataset (``hfdatasets``) it checks each row's image bytes, as it checks a file's,
without a cache (the rows are read from memory-mapped Arrow files).

At scale, the quick check is cached: each file's result is kept with its size and modification
time, so a restart (a requeued job, a second run on the same data) reads only the files that
changed. Listing the files and reading their sizes is what remains of a second start.
"""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from finetune.data.demo import cache_dir
from finetune.data.folders import class_folders, find_layout
from finetune.data.hfdatasets import is_hf_data, read_rows
from finetune.data.images import BadImageError, read_image_bytes
from finetune.data.labelfiles import Columns, is_label_file, read_table
from finetune.data.listing import DirListing, ResultCache, list_folder
from finetune.errors import UserError
from finetune.utils.files import file_digest

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
    except OSError as err:
        return f"cannot be decoded ({err})", None, None
    problem, fmt = _open_image(path, full)
    if problem:
        return problem, None, None
    expected = EXPECTED_FORMATS.get(path.suffix.lower())
    wrong = fmt if expected and fmt and fmt != expected else None
    digest = file_digest(path) if full else None
    return None, wrong, digest


def _open_image(source: Path | io.BytesIO, full: bool) -> tuple[str | None, str | None]:
    """(problem, Pillow's format) of an image file or bytes: its header read, all of it decoded if ``full``."""
    try:
        with Image.open(source) as img:
            fmt = img.format
            width, height = img.size
            if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
                return f"{width}x{height} pixels, over Pillow's decompression-bomb limit", None
            if full:
                img.load()
    except Image.DecompressionBombError:
        return "over Pillow's decompression-bomb limit", None
    except Image.UnidentifiedImageError:
        return "not an image", None
    except (OSError, SyntaxError, ValueError) as err:
        return f"cannot be decoded ({err})", None
    return None, fmt


def _check_row(path: str, full: bool) -> tuple[str | None, str | None]:
    """(problem, content hash if ``full``) of a dataset row's image (``hfdatasets``)."""
    try:
        data = read_image_bytes(path)
    except BadImageError as err:
        return str(err).removeprefix(f"cannot decode image {path}: "), None
    if not data:
        return "empty image (0 bytes)", None
    problem, _ = _open_image(io.BytesIO(data), full)
    return problem, hashlib.sha256(data).hexdigest() if full and not problem else None


def cache_folder(data_dir: str | Path) -> Path:
    """Where the quick check's results for ``data_dir`` are kept: a folder per dataset folder, under
    ``$FINETUNE_CACHE`` (default ``~/.cache/finetune``); on a cluster without a shared home, each
    node that runs the main process keeps its own."""
    key = hashlib.sha256(os.path.abspath(data_dir).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return cache_dir() / "preflight" / key


def check_dataset(data_dir: str | Path, full: bool = False, workers: int | None = None,
                  cache: Path | None = None, columns: Columns | None = None) -> Report:
    """Preflight of a dataset's split folders (train, and val and test where they exist), or of the
    images a label file lists; see the module docstring.

    Args:
        data_dir: the dataset folder, or a label file (``labelfiles``).
        full: also decode every image and look for train/test duplicates.
        workers: threads reading files (default: the CPU count).
        cache: a folder keeping the quick check's result per file (``listing.ResultCache``,
            ``cache_folder``): files unchanged since they were checked are not read again.
            The full check always reads everything.
        columns: a label file's columns (see ``labelfiles.Columns``; None: found by name).
    """
    data_dir = Path(data_dir)
    if is_hf_data(data_dir):
        return _finish(_check_rows(data_dir, full, workers, columns or Columns()))
    report = Report()
    if is_label_file(data_dir):
        root, files = _label_file_listings(data_dir, columns or Columns(), report)
    else:
        root = os.path.abspath(data_dir)
        # split -> class -> the directories of its images
        files = {split: {c: list_folder(folder / c) for c in class_folders(folder)}
                 for split, folder in find_layout(data_dir).folders().items()}
    # A label file's classes may share a directory: each directory is checked (and cached) once.
    merged: dict[str, DirListing] = {}
    for by_class in files.values():
        for dirs in by_class.values():
            for listing in dirs:
                merged[listing.path] = _union(merged.get(listing.path), listing)

    store = ResultCache(cache, root) if cache is not None and not full else None
    # Per directory, the files that are not clean: name -> (problem, wrong format, content digest).
    found: dict[str, dict[str, tuple[str | None, str | None, str | None]]] = {}
    jobs: list[tuple[str, str]] = []  # (directory, name) of the files to read
    pending: list[DirListing] = []  # directories to record in the cache once their files are checked
    for listing in merged.values():
        flagged = store.unchanged(listing) if store else None
        if flagged is not None:  # nothing changed here: only its flagged files need naming
            found[listing.path] = {name: (problem, wrong, None) for name, (problem, wrong) in flagged.items()}
            continue
        known = store.entries(listing) if store else {}
        here = found.setdefault(listing.path, {})
        for name, size, mtime in zip(listing.names, listing.sizes, listing.mtimes):
            hit = known.get(name)
            if hit is not None and hit[:2] == [size, mtime]:
                if hit[2] or hit[3]:
                    here[name] = (hit[2], hit[3], None)
            else:
                jobs.append((listing.path, name))
        pending.append(listing)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        checked = pool.map(lambda job: _check_file(Path(job[0], job[1]), full), jobs)
        for (folder, name), result in zip(jobs, checked):
            if any(result):
                found[folder][name] = result
    if store is not None:
        for listing in pending:
            store.record(listing, {name: list(r[:2]) for name, r in found[listing.path].items()})
        store.save()

    hashes: dict[str, dict[str, str]] = {"train": {}, "held-out": {}}
    for split, by_class in files.items():
        report.counts[split] = {}
        for c, dirs in by_class.items():
            usable = 0
            for listing in dirs:
                usable += len(listing.names)
                flagged = found[listing.path]
                for name in (listing.names if full else sorted(flagged)):  # the full check hashes every file
                    problem, wrong, digest = flagged.get(name, (None, None, None))
                    path = os.path.join(listing.path, name)
                    if problem:
                        report.bad.append((path, problem))
                        usable -= 1
                        continue
                    if wrong:
                        report.wrong_extension.append((path, wrong))
                    if digest:
                        hashes["train" if split == "train" else "held-out"].setdefault(digest, path)
            report.counts[split][c] = usable
    report.bad = list(dict.fromkeys(report.bad))  # an image of several labels is listed under each
    report.duplicates = [(hashes["train"][h], p) for h, p in hashes["held-out"].items() if h in hashes["train"]]
    return _finish(report)


def _finish(report: Report) -> Report:
    """``report`` with its warnings: imbalanced classes, train/test duplicates, wrong extensions."""
    train_counts = [n for n in report.counts.get("train", {}).values() if n > 0]
    if train_counts and max(train_counts) > IMBALANCE_RATIO * min(train_counts):
        report.warnings.append(f"classes are very imbalanced in train: {max(train_counts)} vs {min(train_counts)} "
                               "images (consider --class-weights auto or more data)")
    if report.duplicates:
        report.warnings.append(f"{len(report.duplicates)} test image(s) also appear in train: "
                               "test accuracy will be optimistic")
    if report.wrong_extension:
        report.warnings.append(f"{len(report.wrong_extension)} file(s) hold another format than their extension "
                               "says (they load fine)")
    return report


def _check_rows(data: Path, full: bool, workers: int | None, columns: Columns) -> Report:
    """``check_dataset`` of a Hugging Face dataset: each row's image, counted by split and label."""
    table = read_rows(data, columns)
    report = Report()
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        checked = list(pool.map(lambda row: _check_row(row.path, full), table.rows))
    hashes: dict[str, dict[str, str]] = {"train": {}, "held-out": {}}
    for row, (problem, digest) in zip(table.rows, checked):
        split = row.split or "train"
        counts = report.counts.setdefault(split, {})
        for label in row.labels or ("(no label)",):
            counts[label] = counts.get(label, 0) + (problem is None)
        if problem:
            report.bad.append((row.path, problem))
        elif digest:
            hashes["train" if split == "train" else "held-out"].setdefault(digest, row.path)
    report.duplicates = [(hashes["train"][h], p) for h, p in hashes["held-out"].items() if h in hashes["train"]]
    return report


def _union(a: DirListing | None, b: DirListing) -> DirListing:
    """The files of two listings of one directory, sorted by name."""
    if a is None:
        return b
    files = sorted(set(zip(a.names, a.sizes, a.mtimes)) | set(zip(b.names, b.sizes, b.mtimes)))
    return DirListing(a.path, [f[0] for f in files], [f[1] for f in files], [f[2] for f in files])


def _label_file_listings(file: Path, columns: Columns,
                         report: Report) -> tuple[str, dict[str, dict[str, list[DirListing]]]]:
    """The label file's folder, and its images as ``check_dataset`` lists a folder's: split (``train``
    without a split column) -> label -> a listing per directory. Rows that name no image and images
    that are not there go into ``report.bad`` (the first by ``Row.where``, as ``labelfiles`` knows them)."""
    table = read_table(file, columns)
    report.bad.extend((where, why) for where, why in table.bad)
    by_place: dict[tuple[str, str, str], list[tuple[str, int, int]]] = {}
    for row in table.rows:
        try:
            st = os.stat(row.path)
        except OSError:
            report.bad.append((row.path, f"not found, listed at {row.where}"))
            continue
        folder, name = os.path.split(row.path)
        for label in row.labels or ("(no label)",):
            by_place.setdefault((row.split or "train", label, folder), []).append((name, st.st_size, st.st_mtime_ns))
    files: dict[str, dict[str, list[DirListing]]] = {}
    for (split, label, folder), entries in sorted(by_place.items()):
        entries.sort()
        listing = DirListing(folder, [e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries])
        files.setdefault(split, {}).setdefault(label, []).append(listing)
    return table.folder, files


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
