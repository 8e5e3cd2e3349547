"""Where a dataset's images are: its splits, their class folders, and parts carved out of them.

Accepted layouts of ``DATA``:

- ``train/`` and ``test/`` (or ``val/``), each with one sub-folder per class; ``train/``,
  ``val/`` and ``test/`` together: the checkpoint is chosen on ``val/``, reported on ``test/``;
- ``train/`` alone, or a flat ``DATA/CLASS/*.jpg``: a test part is held out of it.

A held-out part is carved per class (stratified) by ranking each file on a hash of the split
seed and its path relative to the folder: the same files every time, on every machine, and
adding files to a class moves few others between parts. ``split_fingerprint`` names a list of
files, so that a checkpoint can record exactly which files it was evaluated on.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from PIL import Image, ImageFile
from torchvision import datasets

from finetune.data.images import load_rgb
from finetune.errors import UserError


def _pillow_extensions() -> tuple[str, ...]:
    """File extensions of every format Pillow opens and decodes by itself (GIF, AVIF, ICO, ...).

    Left out: stub formats that need a plugin Pillow lacks (BUFR, GRIB, HDF5, WMF), EPS (it
    needs Ghostscript) and MPEG (Pillow reads only its header).
    """
    Image.init()
    decodable = {fmt for fmt, (factory, _) in Image.OPEN.items()
                 if fmt not in ("EPS", "MPEG")
                 and not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))}
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in decodable))


IMAGE_EXTENSIONS = _pillow_extensions()
_EXTENSIONS = frozenset(IMAGE_EXTENSIONS)
EVAL_SPLITS = ("test", "val")
SPLIT_NAMES = ("train", "val", "test")


def is_image_name(name: str) -> bool:
    """Whether a file name has the extension (any case) of a format Pillow decodes."""
    return os.path.splitext(name)[1].lower() in _EXTENSIONS


def find_split(data_dir: str | Path, names: Sequence[str]) -> Path | None:
    """The first existing sub-folder of ``data_dir`` among ``names``."""
    for name in names:
        if (Path(data_dir) / name).is_dir():
            return Path(data_dir) / name
    return None


def check_split_folder(root: Path) -> None:
    """A UserError naming what is wrong with a split folder's layout: missing, not a folder, or
    without class sub-folders."""
    if not root.exists():
        raise UserError(f"data folder not found: {root}")
    if not root.is_dir():
        raise UserError(f"not a folder: {root}")
    if not class_folders(root):
        has_images = any(is_image_name(p.name) for p in root.iterdir())
        hint = " (images must sit in one sub-folder per class)" if has_images else ""
        raise UserError(f"{root} has no class sub-folders{hint}")


def class_folders(root: Path) -> list[str]:
    """Names of the class sub-folders of an ImageFolder split, sorted (hidden folders left out)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def image_files(folder: Path) -> list[Path]:
    """Image files below ``folder`` (by extension, any case), sorted."""
    return sorted(p for p in folder.rglob("*") if is_image_name(p.name) and p.is_file())


@dataclass(frozen=True)
class Layout:
    """The folders of a dataset: ``train`` holds the class folders (``DATA/train`` or ``DATA``
    itself); ``test`` is None where a test part is to be carved out of ``train``."""

    root: Path
    train: Path
    val: Path | None
    test: Path | None

    def folders(self) -> dict[str, Path]:
        """The split folders that exist, by name (``train``, ``val``, ``test``)."""
        found = {"train": self.train, "val": self.val, "test": self.test}
        return {name: folder for name, folder in found.items() if folder is not None}


def find_layout(data_dir: str | Path) -> Layout:
    """The layout of ``data_dir`` (see the module docstring); a UserError says what is missing."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise UserError(f"data folder not found: {data_dir}")
    if not data_dir.is_dir():
        raise UserError(f"not a folder: {data_dir}")
    train, val, test = (find_split(data_dir, (name,)) for name in SPLIT_NAMES)
    if train is None and (val or test):
        raise UserError(f"{data_dir} has no train/ folder; expected DATA/train/CLASS/*.jpg and DATA/test/CLASS/*.jpg")
    if train is None:  # a flat DATA/CLASS/*.jpg folder
        check_split_folder(data_dir)
        return Layout(data_dir, data_dir, None, None)
    if val is None and test is None:
        others = [name for name in class_folders(data_dir) if name != "train"]
        if others:  # more likely a misnamed test folder than classes beside train/
            raise UserError(f"{data_dir} has no test/ (or val/) folder but {', '.join(others)}; expected "
                            "DATA/train and DATA/test (or DATA/train alone, to hold a test part out of it)")
    if test is None and val is not None:  # the one held-out split is val/: it is the test split
        val, test = None, val
    return Layout(data_dir, train, val, test)


class _ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder with this project's class folders: hidden folders such as
    ``.ipynb_checkpoints`` are not classes (torchvision's own listing takes them for one)."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = class_folders(Path(directory))
        return classes, {c: i for i, c in enumerate(classes)}


def image_folder(root: str | Path, classes: Sequence[str] | None = None,
                 exclude: frozenset[str] = frozenset()) -> datasets.ImageFolder:
    """A torchvision ImageFolder over ``root`` with RGB loading; a UserError names a bad layout.

    Args:
        root: the split folder, one sub-folder per class.
        classes: the class list to index by (the train split's); ``root`` must not hold others.
        exclude: paths of files to leave out (see ``preflight``).
    """
    root = Path(root)
    check_split_folder(root)
    left_out: list[str] = []  # files Pillow cannot open, to say what was left out and why

    def usable(path: str) -> bool:
        if Path(path).suffix.lower() not in IMAGE_EXTENSIONS:
            if not Path(path).name.startswith("."):  # .DS_Store and the like are nobody's images
                left_out.append(path)
            return False
        return path not in exclude

    ds = _ImageFolder(str(root), loader=load_rgb, allow_empty=True, is_valid_file=usable)
    ds.left_out = left_out
    counts = Counter(ds.targets)
    empty = [c for i, c in enumerate(ds.classes) if counts[i] == 0]
    if empty:
        inside = [p for p in left_out if Path(p).parent.relative_to(root).parts[:1] == (empty[0],)]
        why = f" ({len(inside)} file(s) of types Pillow cannot open: {_suffixes(inside)})" if inside else ""
        raise UserError(f"class '{empty[0]}' in {root} has no images{why}")
    if classes is not None:
        extra = sorted(set(ds.classes) - set(classes))
        if extra:
            raise UserError(f"{root} has classes the training set lacks: {', '.join(extra)}")
        # Index by the train list so a class missing here does not shift the labels.
        index = {c: i for i, c in enumerate(classes)}
        ds.samples = [(p, index[ds.classes[t]]) for p, t in ds.samples]
        ds.targets = [t for _, t in ds.samples]
        ds.imgs = ds.samples
        ds.classes = list(classes)
        ds.class_to_idx = index
    return ds


def _suffixes(paths: Sequence[str]) -> str:
    counts = Counter(Path(p).suffix.lower() or "no extension" for p in paths)
    return ", ".join(f"{ext} x{n}" for ext, n in sorted(counts.items()))


def left_out_note(ds: datasets.ImageFolder) -> str | None:
    """A warning naming the files of ``ds``'s folders that were left out as not images, or None."""
    left_out = getattr(ds, "left_out", [])
    if not left_out:
        return None
    return (f"left out {len(left_out)} file(s) in {ds.root} of types Pillow cannot open ({_suffixes(left_out)}), "
            f"e.g. {left_out[0]}")


def missing_classes(classes: Sequence[str], ds: datasets.ImageFolder) -> list[str]:
    """Classes of the training list that have no image in ``ds`` (whose targets may be tuples of
    class indices: a multi-label set's)."""
    present = {c for t in ds.targets for c in (t if isinstance(t, tuple) else (t,))}
    return [c for i, c in enumerate(classes) if i not in present]


def subset(ds: datasets.ImageFolder, samples: list[tuple[str, int]]) -> datasets.ImageFolder:
    """A copy of ``ds`` holding only ``samples`` (same root, classes and loader)."""
    part = copy.copy(ds)
    part.samples = list(samples)
    part.imgs = part.samples
    part.targets = [t for _, t in part.samples]
    return part


def _rank(seed: int, root: str, path: str) -> bytes:
    rel = Path(os.path.relpath(path, root)).as_posix()
    return hashlib.sha256(f"{seed}:{rel}".encode()).digest()


def carve(ds: datasets.ImageFolder, fraction: float, seed: int,
          stratify: bool = True) -> tuple[datasets.ImageFolder, datasets.ImageFolder]:
    """Split ``ds`` into (kept, held out): ``fraction`` of each class held out, chosen by ``seed``.

    Each class holds out ``round(n * fraction)`` files, at least one where it has two or more and
    ``fraction`` > 0, never all of them. Both parts keep ``ds``'s order.

    Args:
        ds: the ImageFolder to split.
        fraction: the share of each class to hold out, in (0, 1).
        seed: the split seed; the same seed holds out the same files.
        stratify: False: the files are one group (``fraction`` of all of them held out).
    """
    by_class: dict[Any, list[str]] = defaultdict(list)
    for path, target in ds.samples:
        by_class[target if stratify else 0].append(path)
    held: set[str] = set()
    for paths in by_class.values():
        n = len(paths)
        count = min(n - 1, max(1, round(n * fraction))) if n >= 2 and fraction > 0 else 0
        held.update(sorted(paths, key=lambda p: _rank(seed, ds.root, p))[:count])
    kept = [s for s in ds.samples if s[0] not in held]
    out = [s for s in ds.samples if s[0] in held]
    return subset(ds, kept), subset(ds, out)


@dataclass
class HeldOut:
    """The parts ``hold_out`` made of a dataset's rows, and what it has to say about them.

    Attributes:
        carved: split -> its fraction and seed, for a part carved out of the training rows.
        sources: split -> the data's own split it is (``test``, ``val``); None for a carved part.
        notes: what was carved out of what.
        warnings: the classes that a held-out part lacks.
    """

    train: Any
    test: Any
    val: Any | None
    carved: dict[str, dict[str, Any]]
    sources: dict[str, str | None]
    notes: list[str]
    warnings: list[str]

    @property
    def held(self) -> dict[str, Any]:
        """The held-out parts by split: ``test``, and ``val`` where there is one."""
        return {"test": self.test, **({"val": self.val} if self.val is not None else {})}


def hold_out(parts: Mapping[str, Sequence[Any]], make: Callable[[Sequence[Any]], Any], classes: Sequence[str], *,
             name: str, noun: str, kind: str, test_fraction: float, val_fraction: float, split_seed: int,
             stratify: bool = True) -> HeldOut:
    """The train, test and optional val parts of rows sorted by their split (a label file's split
    column, a Hugging Face dataset's splits), as ``load_splits`` makes them of folders: test rows
    are the test part and val rows beside them the val part; val rows alone are the test part;
    without either a test part is carved out of the training rows; ``val_fraction`` carves a val
    part out of them (the caller refuses it beside val rows, in its own words).

    Args:
        parts: split (``train``, ``val``, ``test``) -> its rows; ``train`` must hold some.
        make: rows -> the dataset of them (``samples``, ``targets`` and ``root``, as an ImageFolder).
        classes: the training classes, for the warnings about classes a held-out part lacks.
        name: the data, as the messages name it.
        noun: what the data holds, in the messages: ``images`` or ``rows``.
        kind: what a split of the data is, in the messages: ``rows`` (of a split column) or ``split``.
        test_fraction: the share held out as the test part, where there is no test or val row.
        val_fraction: the share of the training rows held out for validation (0: none).
        split_seed: which rows are held out (the val part: with the next seed).
        stratify: whether a share of each class is held out (False: of all the rows, as one group).

    Raises:
        UserError: where a held-out part would be empty.
    """
    train, val = make(parts["train"]), None
    share = "of each class" if stratify else f"of the {noun}"
    carved: dict[str, dict[str, Any]] = {}
    sources: dict[str, str | None] = {}
    notes: list[str] = []
    if parts.get("test"):
        test, sources["test"] = make(parts["test"]), "test"
        if parts.get("val"):
            val, sources["val"] = make(parts["val"]), "val"
    elif parts.get("val"):  # val rows alone are the test split, as a val/ folder alone is
        test, sources["test"] = make(parts["val"]), "val"
    else:
        train, test = carve(train, test_fraction, split_seed, stratify)
        carved["test"], sources["test"] = {"fraction": test_fraction, "seed": split_seed}, None
        notes.append(f"{name} has no test {kind}: holding out {len(test.samples)} of its {noun} "
                     f"({test_fraction:.0%} {share}, split seed {split_seed}) as the test part")
    if val_fraction > 0 and val is None:
        train, val = carve(train, val_fraction, split_seed + 1, stratify)  # another seed: independent of the test part
        carved["val"], sources["val"] = {"fraction": val_fraction, "seed": split_seed + 1}, None
        notes.append(f"holding out {len(val.samples)} training {noun} ({val_fraction:.0%} {share}) for validation")
    result = HeldOut(train, test, val, carved, sources, notes, [])
    for split, part in result.held.items():
        if not part.samples:
            raise UserError(f"no {noun} left for the {split} split of {name} (too few {noun} per class to hold "
                            "some out)")
    result.warnings = [f"class '{c}' has no {noun} in the {split} {kind} of {name}" + (" (the held-out part)"
                       if split in carved else "") for split, part in result.held.items()
                       for c in missing_classes(classes, part)]
    return result


def split_fingerprint(paths: Iterable[str | Path], root: str | Path) -> str:
    """A digest naming a list of files: sha256 of their sorted paths relative to ``root``.

    Two listings have the same fingerprint exactly when they hold the same files under the same
    relative paths (the class folder is part of the path, so labels count too); moving the whole
    dataset elsewhere keeps it.

    Args:
        paths: the files.
        root: the folder the paths are taken relative to (the dataset or split folder).
    """
    rel = sorted(Path(os.path.relpath(p, root)).as_posix() for p in paths)
    return hashlib.sha256("\n".join(rel).encode()).hexdigest()


def describe_split(ds: datasets.ImageFolder, name: str, carved: dict[str, Any] | None = None) -> dict[str, Any]:
    """A record of one split for a checkpoint's metadata: which files it holds, and how it was made.

    Args:
        ds: the split.
        name: its role (``val`` or ``test``).
        carved: for a part held out of another folder, ``{"fraction": F, "seed": S}``.
    """
    root = os.path.abspath(ds.root)
    return {"name": name, "root": root, "carved": carved, "num_files": len(ds.samples),
            "fingerprint": split_fingerprint((p for p, _ in ds.samples), root)}


def recorded_part(data_dir: str | Path, classes: Sequence[str],
                  record: dict[str, Any] | None) -> datasets.ImageFolder | None:
    """The part a run held out of ``data_dir`` (a flat folder, or ``train/`` alone), carved again
    from the run's record of it (``describe_split``), so that eval.py evaluates exactly those files.

    Returns None where the record is not of a carved part, ``data_dir`` has a test (or val) split
    of its own, or it is another folder than the one the part was carved from.

    Raises:
        UserError: where ``data_dir`` is the folder the part was carved from, but its files changed.
    """
    carved = (record or {}).get("carved")
    if not carved:
        return None
    layout = find_layout(data_dir)
    if layout.test is not None:
        return None
    _, part = carve(image_folder(layout.train, classes), carved["fraction"], carved["seed"])
    if split_fingerprint((p for p, _ in part.samples), os.path.abspath(part.root)) == record["fingerprint"]:
        return part
    if os.path.abspath(layout.train) == record["root"]:
        raise UserError(f"the {record['name']} part held out of {layout.train} is not the one the checkpoint was "
                        f"evaluated on ({len(part.samples)} files now, {record['num_files']} then): files were added, "
                        "removed or renamed since")
    return None


@dataclass
class Splits:
    """A dataset's train, optional validation and test ImageFolders, sharing one class list.

    ``best.safetensors`` is chosen on ``val`` where there is one, else on ``test``. ``records`` describe the held-out splits for the checkpoint (``describe_split``).
    """

    train: datasets.ImageFolder
    test: datasets.ImageFolder
    classes: list[str]
    warnings: list[str]
    val: datasets.ImageFolder | None = None
    notes: list[str] = field(default_factory=list)  # what was carved out of what
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    task: str = "single"  # or "multilabel": the targets are tuples of class indices
    task_why: str = "class folders give each image one class"

    @property
    def selected_on(self) -> str:
        """The split that chooses ``best.safetensors``, as the checkpoint names it (``val`` or ``test``)."""
        return self.records["val" if self.val is not None else "test"]["name"]


def load_splits(data_dir: str | Path, exclude: frozenset[str] = frozenset(), *, test_fraction: float = 0.2,
                val_fraction: float = 0.0, split_seed: int = 0) -> Splits:
    """The splits of a dataset folder (see the module docstring); the class list is train's.

    A class in val or test that train lacks is an error; a train class missing from them a warning.

    Args:
        data_dir: the dataset folder.
        exclude: paths of files to leave out (see ``preflight``).
        test_fraction: the share of each class held out as the test part, where there is no test
            (or val) folder.
        val_fraction: the share of each training class held out for validation (0: none), where
            there is no val/ beside test/.
        split_seed: which files are held out.
    """
    layout = find_layout(data_dir)
    train = image_folder(layout.train, exclude=exclude)
    notes: list[str] = []
    carved: dict[str, dict[str, Any]] = {}
    if layout.test is not None:
        test = image_folder(layout.test, train.classes, exclude)
    else:
        train, test = carve(train, test_fraction, split_seed)
        carved["test"] = {"fraction": test_fraction, "seed": split_seed}
        notes.append(f"{layout.train} has no separate test split: holding out {len(test.samples)} of its images "
                     f"({test_fraction:.0%} of each class, split seed {split_seed}) as the test part")
    val = image_folder(layout.val, train.classes, exclude) if layout.val is not None else None
    if val_fraction > 0:
        if val is not None:
            raise UserError(f"{layout.root} has a val/ folder: --val-fraction carves one from train only where "
                            "there is none")
        train, val = carve(train, val_fraction, split_seed + 1)  # another seed: independent of the test part
        carved["val"] = {"fraction": val_fraction, "seed": split_seed + 1}
        notes.append(f"holding out {len(val.samples)} training images ({val_fraction:.0%} of each class) "
                     "for validation")
    held = {"test": test, **({"val": val} if val is not None else {})}
    for name, part in held.items():
        if not part.samples:
            raise UserError(f"no images left for the {name} split of {layout.root} (too few images per class "
                            "to hold some out)")
    warnings = [f"class '{c}' has no images in {part.root}" + (" (the held-out part)" if name in carved else "")
                for name, part in held.items() for c in missing_classes(train.classes, part)]
    folders = {part.root: part for part in (train, *held.values())}  # a carved part shares its folder's note
    warnings += [note for note in map(left_out_note, folders.values()) if note]
    # A held-out folder is recorded under its own name (val/ alone serves as the test split).
    records = {name: describe_split(part, Path(part.root).name if name not in carved else name, carved.get(name))
               for name, part in held.items()}
    return Splits(train, test, list(train.classes), warnings, val=val, notes=notes, records=records)
