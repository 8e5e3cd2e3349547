"""Hugging Face datasets: ``--data`` naming a dataset written by ``save_to_disk`` (a ``Dataset``, or a
``DatasetDict`` of train, validation and test splits), a folder of parquet files (its top level or
its ``data/`` folder, as the Hub keeps them; or one ``.parquet`` file), or ``hf:NAME[:CONFIG]``,
which ``datasets.load_dataset`` loads (from the Hub, or its cache).

Columns (``--image-column``, ``--label-column`` and ``--split-column`` name them):

- the image: the ``Image`` feature's column, else one named ``image`` or ``img`` holding bytes;
- the labels: the ``ClassLabel`` column (a list of them: several labels a row), else one named
  ``label``, ``labels``, ``class`` or ``tags`` holding strings (or lists of strings);
- the split: a DatasetDict's own splits (``train``, ``validation`` (``val``, ``valid``), ``test``;
  others are left out, with a note); a single Dataset may hold a split column (``split``).

Rows are read where they are (memory-mapped Arrow files). Each row is named by a path of its own,
``SOURCE/SPLIT[ROW]`` (``hf:beans/train[17]``), whose bytes the dataset's ``RowReader`` gives
``images.read_image_bytes``: a row goes through the very decoding, crops, preflight and
``--bad-data`` of a file. The splits follow the folder layouts (``folders``), as a label file's do
(``labelfiles``): without a test split a test part is carved out and recorded; a validation
split alone is the test split. The classes are the ``ClassLabel``'s names in its order (those
with training rows), else the training labels sorted; samples are ordered by class, then row, as
an ImageFolder orders its files, so that the same images as class folders train the same.

A label column of lists (``Sequence(ClassLabel)``, lists of strings) gives a row several labels:
``--task auto`` then trains a multi-label classifier where any row has several, as for a label
file (``labelfiles.choose_task``); a multi-label set's samples are in row order, and its held-out
parts are carved from all its rows as one group.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from torch.utils.data import Dataset

from finetune.data.folders import Splits, carve, hold_out
from finetune.data.images import load_rgb, register_rows
from finetune.data.labelfiles import LABEL_COLUMNS, SPLIT_COLUMN, SPLIT_VALUES, Columns, Row, rows_for, rows_task
from finetune.errors import UserError, first_line

HF_PREFIX = "hf:"
IMAGE_COLUMNS = ("image", "img")  # by name, where no column is an Image feature
WHOLE = "rows"  # the name of a single Dataset (without a split of its own) in its rows' paths


def is_hf_data(data: str | Path) -> bool:
    """Whether ``--data`` names a Hugging Face dataset: ``hf:NAME``, a ``save_to_disk`` folder, a
    folder of parquet files (at its top or in ``data/``), or a parquet file."""
    text = str(data)
    if text.startswith(HF_PREFIX):
        return True
    path = Path(data)
    if path.is_file():
        return path.suffix.lower() == ".parquet"
    if not path.is_dir():
        return False
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return True
    return any(path.glob("*.parquet")) or any((path / "data").glob("*.parquet"))


def source_of(data: str | Path) -> str:
    """The name a dataset is recorded by: ``hf:NAME[:CONFIG]`` as given, else the absolute path."""
    text = str(data)
    return text if text.startswith(HF_PREFIX) else os.path.abspath(text)


def _datasets() -> Any:
    try:
        import datasets  # here, not at the top: it takes seconds to import, and only this source needs it
    except ImportError:
        raise UserError("Hugging Face datasets need the datasets package: pip install datasets") from None
    return datasets


@contextlib.contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """No progress bars while a local dataset is opened: they show nothing worth the lines."""
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _hub_quiet() -> Iterator[None]:
    """The Hub client's warnings held back while ``hf:NAME`` loads: where the Hub is unreachable, it
    logs each of its retries (and its fall-back to the cache) before the error that ``load_parts``
    reports in one line. Errors still show."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "datasets")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def load_parts(source: str) -> dict[str, Any]:
    """The parts of a dataset, by name: a DatasetDict's splits, or one Dataset (under its split's
    name where it has one, else ``rows``).

    Args:
        source: ``source_of(--data)``.

    Raises:
        UserError: naming the source, where ``datasets`` cannot load it.
    """
    datasets = _datasets()
    try:
        if source.startswith(HF_PREFIX):
            name, _, config = source[len(HF_PREFIX):].partition(":")
            if not name:
                raise UserError("hf: needs a dataset's name: --data hf:NAME or hf:NAME:CONFIG")
            # The Hub (or its cache, offline): progress bars kept, a download can take a while.
            with _hub_quiet():
                loaded = datasets.load_dataset(name, config or None)
        else:
            path = Path(source)
            with _quiet(datasets):
                if path.is_file():
                    loaded = datasets.load_dataset("parquet", data_files=source)
                elif (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                    loaded = datasets.load_from_disk(source)
                else:
                    loaded = datasets.load_dataset("parquet", data_dir=source)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
        raise UserError(f"cannot load {source}: {first_line(err)}") from None
    if isinstance(loaded, datasets.Dataset):
        return {str(loaded.split) if loaded.split else WHOLE: loaded}
    if not isinstance(loaded, (datasets.DatasetDict, dict)) or not loaded:
        raise UserError(f"{source} holds no dataset of rows ({type(loaded).__name__})")
    return dict(loaded)


class RowReader:
    """The image bytes of one part's rows, by row number, straight from its Arrow table (``datasets``
    decodes nothing). It registers itself with ``images`` for its rows' paths where it is made and
    wherever it is unpickled (a loader worker started by spawn).

    Args:
        prefix: its rows' paths up to the row number, ``SOURCE/SPLIT[``.
        part: the ``datasets.Dataset``.
        column: the image column.
        folder: where a row's relative image path is (a row that holds a path instead of bytes).
    """

    def __init__(self, prefix: str, part: Any, column: str, folder: str | None):
        self.prefix = prefix
        self.images = part.select_columns([column]).with_format("arrow")
        self.folder = folder
        register_rows(prefix, self)

    def __call__(self, row: int) -> bytes:
        if row >= len(self.images):
            raise ValueError(f"the dataset has no row {row} (it has {len(self.images)})")
        value = self.images[row].column(0)[0].as_py()
        data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
        if data is not None:
            return data
        if path:
            return Path(self.folder or "", path).read_bytes()  # an absolute path stays as it is
        raise ValueError("the row holds no image")

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        register_rows(self.prefix, self)


@dataclass
class RowTable:
    """A dataset's rows and how they were read.

    Attributes:
        source: ``source_of(--data)``.
        rows: every row of the parts used, each with its labels and split (``train``, ``val``,
            ``test``; None where the data says none), named by its path (see the module docstring).
        columns: the columns as resolved (image, label, split), for the checkpoint.
        readers: part name -> its ``RowReader``.
        order: the ClassLabel's names, the classes' order; None: sorted.
        notes: what was left out, and why.
    """

    source: str
    rows: list[Row]
    columns: Columns
    readers: dict[str, RowReader]
    order: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def has_split(self) -> bool:
        return any(row.split is not None for row in self.rows)


def read_rows(data: str | Path, columns: Columns = Columns()) -> RowTable:
    """Open a dataset and read its labels and splits; images are not read here.

    The last few tables read are kept while the dataset's folder is unchanged: the preflight and
    the splits read the same dataset.

    Raises:
        UserError: naming the dataset (and the row), for a dataset that cannot be loaded, a missing
            or unusable column, a split value that is none of the three, or no train split.
    """
    source = source_of(data)
    stamp = None
    if not source.startswith(HF_PREFIX):
        try:
            stamp = tuple(sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(source))) if Path(
                source).is_dir() else os.stat(source).st_mtime_ns
        except OSError as err:
            raise UserError(f"cannot read {source}: {err}") from None
    return _read_rows(source, stamp, columns)


@functools.lru_cache(maxsize=4)
def _read_rows(source: str, stamp: Any, columns: Columns) -> RowTable:
    if columns.onehot:
        raise UserError("--label-columns (one 0/1 column per class) is for label files; a dataset's labels are one "
                        "column (a ClassLabel, strings, or lists of them): --label-column NAME")
    parts = load_parts(source)
    notes: list[str] = []
    if len(parts) > 1:
        roles = {name: SPLIT_VALUES.get(name.lower()) for name in parts}
        left = [name for name, role in roles.items() if role is None]
        if "train" not in roles.values():
            raise UserError(f"{source} has no train split (its splits: {', '.join(parts)}); expected train, and "
                            "test or validation")
        if left:
            notes.append(f"{source}: left out its split(s) {', '.join(left)} (none of train, validation and test)")
        if columns.split:
            raise UserError(f"{source} has splits of its own ({', '.join(parts)}): --split-column is for a dataset "
                            "of one split")
        parts = {name: part for name, part in parts.items() if roles[name] is not None}
    else:
        roles = {name: None for name in parts}
    first = next(iter(parts.values()))
    features = first.features
    image = _image_column(source, features, columns.image)
    label, labeller = _label_column(source, features, columns.label, columns.sep)
    split = None
    if len(parts) == 1:
        split = _find(source, features, columns.split, (SPLIT_COLUMN,), "--split-column")
    folder = source if Path(source).is_dir() else os.path.dirname(source) if Path(source).exists() else None
    rows: list[Row] = []
    readers: dict[str, RowReader] = {}
    for name, part in parts.items():
        missing = [c for c in (image, label, split) if c is not None and c not in part.column_names]
        if missing:
            raise UserError(f"{source}: its {name} split has no column '{missing[0]}' (the {next(iter(parts))} "
                            f"split has); its columns: {_names(part.column_names)}")
        prefix = f"{source}/{name}["
        readers[name] = RowReader(prefix, part, image, folder)
        table = part.select_columns([c for c in (label, split) if c is not None]).with_format("arrow")
        labels = table[label].to_pylist()
        splits = table[split].to_pylist() if split is not None else [None] * len(labels)
        for number, (value, part_value) in enumerate(zip(labels, splits)):
            where = f"{source} {name} row {number}"
            role = roles[name]
            if split is not None:
                role = SPLIT_VALUES.get(str(part_value if part_value is not None else "").strip().lower())
                if role is None:
                    raise UserError(f"{where}: split {part_value!r} is none of train, val (or valid, validation) "
                                    "and test")
            rows.append(Row(f"{prefix}{number}]", labeller(value, where), role, where))
    if not rows:
        raise UserError(f"{source} has no rows")
    order = _class_order(features[label])
    return RowTable(source, rows, Columns(image, label, columns.sep, None, split), readers, order, notes)


def _names(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names) or "none"


def _columns_of(features: Any) -> str:
    return ", ".join(f"{name} ({_kind(feature)})" for name, feature in features.items()) or "none"


def _kind(feature: Any) -> str:
    inner = getattr(feature, "feature", None)
    if inner is not None:
        return f"list of {_kind(inner)}"
    dtype = getattr(feature, "dtype", None)
    return type(feature).__name__ if type(feature).__name__ != "Value" else str(dtype)


def _find(source: str, features: Any, given: str | None, known: Sequence[str], flag: str) -> str | None:
    if given is not None:
        if given in features:
            return given
        raise UserError(f"{source} has no column '{given}' ({flag}); its columns: {_columns_of(features)}")
    by_lower = {name.lower(): name for name in features}
    return next((by_lower[k] for k in known if k in by_lower), None)


def _is_image(feature: Any) -> bool:
    datasets = _datasets()
    if isinstance(feature, datasets.Image):
        return True
    if getattr(feature, "dtype", None) in ("binary", "large_binary"):
        return True
    return isinstance(feature, dict) and "bytes" in feature  # a struct of bytes and path, as Image stores it


def _image_column(source: str, features: Any, given: str | None) -> str:
    datasets = _datasets()
    if given is None:
        found = [name for name, f in features.items() if isinstance(f, datasets.Image)]
        if len(found) > 1:
            preferred = [n for n in found if n.lower() in IMAGE_COLUMNS]
            if len(preferred) != 1:
                raise UserError(f"{source} has several image columns ({_names(found)}): name one with "
                                "--image-column NAME")
            found = preferred
        given = found[0] if found else _find(source, features, None, IMAGE_COLUMNS, "--image-column")
        if given is None:
            raise UserError(f"{source} has no image column (an Image feature, or image or img; or --image-column "
                            f"NAME); its columns: {_columns_of(features)}")
    given = _find(source, features, given, (), "--image-column")
    if not _is_image(features[given]):
        raise UserError(f"{source}: column '{given}' holds {_kind(features[given])}, not images (an Image feature "
                        "or bytes)")
    return given


def _is_class_label(feature: Any) -> bool:
    datasets = _datasets()
    inner = getattr(feature, "feature", None)
    return isinstance(feature, datasets.ClassLabel) or (inner is not None and _is_class_label(inner))


def _label_column(source: str, features: Any, given: str | None,
                  sep: str | None) -> tuple[str, Callable[[Any, str], tuple[str, ...]]]:
    if given is None:
        found = [name for name, f in features.items() if _is_class_label(f)]
        if len(found) > 1:
            preferred = [n for n in found if n.lower() in LABEL_COLUMNS]
            if len(preferred) != 1:
                raise UserError(f"{source} has several ClassLabel columns ({_names(found)}): name one with "
                                "--label-column NAME")
            found = preferred
        given = found[0] if found else _find(source, features, None, LABEL_COLUMNS, "--label-column")
        if given is None:
            raise UserError(f"{source} has no label column (a ClassLabel, or label, labels, class or tags; or "
                            f"--label-column NAME); its columns: {_columns_of(features)}")
    given = _find(source, features, given, (), "--label-column")
    feature = features[given]
    if _is_image(feature):
        raise UserError(f"{source}: column '{given}' holds images, not labels")
    return given, _labeller(feature, sep)


def _labeller(feature: Any, sep: str | None) -> Callable[[Any, str], tuple[str, ...]]:
    """value of a row's label column, where -> its labels (none, one, or several for a list)."""
    datasets = _datasets()
    inner = getattr(feature, "feature", None)
    if inner is not None:  # a list: several labels a row
        one = _labeller(inner, sep)
        return lambda value, where: tuple(dict.fromkeys(label for item in value or () for label in one(item, where)))
    if isinstance(feature, datasets.ClassLabel):
        names = feature.names

        def named(value: Any, where: str) -> tuple[str, ...]:
            if value is None or value < 0:  # -1: no label, as ClassLabel writes a missing one
                return ()
            if value >= len(names):
                raise UserError(f"{where}: label {value} is none of the ClassLabel's {len(names)} names")
            return (names[value],)
        return named

    def text(value: Any, where: str) -> tuple[str, ...]:
        if value is None:
            return ()
        parts = str(value).split(sep) if sep else [str(value)]
        return tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))
    return text


def _class_order(feature: Any) -> list[str] | None:
    datasets = _datasets()
    while getattr(feature, "feature", None) is not None:
        feature = feature.feature
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


class RowImages(Dataset):
    """Rows of a dataset and their class indices: what an ImageFolder offers the rest of the
    package (``samples`` of (path, target), ``targets``, ``classes``, ``class_to_idx``, ``root``).

    A multi-label target is the tuple of the row's class indices, ascending (as ``LabelledImages``).

    Attributes:
        root: the source (``source_of``); rows' paths are ``root/SPLIT[ROW]``.
        source: the same, naming the dataset in messages.
        multilabel: whether targets are tuples of class indices.
        where: path -> the row, for messages.
        label_lists: path -> every label of its row (for multi-label training).
        readers: the parts' ``RowReader``s (pickled with the dataset: a spawned worker reads rows too).
    """

    def __init__(self, table: RowTable, rows: Iterable[Row], classes: Sequence[str], multilabel: bool = False):
        self.root = self.source = table.source
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.multilabel = multilabel
        rows = list(rows)
        self.where = {r.path: r.where for r in rows}
        self.label_lists = {r.path: r.labels for r in rows}
        self.readers = table.readers
        self.loader = load_rgb
        position = {r.path: i for i, r in enumerate(table.rows)}
        if multilabel:  # in row order: there is no one class to order by
            self.samples = [(r.path, tuple(sorted(self.class_to_idx[c] for c in r.labels)))
                            for r in sorted(rows, key=lambda r: position[r.path])]
        else:  # ordered as an ImageFolder orders its files: by class, then (part and) row
            ordered = sorted(rows, key=lambda r: (self.class_to_idx[r.labels[0]], position[r.path]))
            self.samples = [(r.path, self.class_to_idx[r.labels[0]]) for r in ordered]
        self.imgs = self.samples
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        return self.loader(path), target


def choose_task(table: RowTable, rows: Sequence[Row], task: str = "auto") -> tuple[str, str]:
    """Whether a dataset trains a single-label or a multi-label classifier, and why
    (``labelfiles.rows_task``: ``auto`` is multi-label where any row has several labels).

    Args:
        table: the dataset as read.
        rows: its usable rows.
        task: ``auto``, ``single`` or ``multilabel`` (``--task``).
    """
    return rows_task(rows, table.source, task)


def _rows_for(task: str, rows: Iterable[Row]) -> list[Row]:
    return rows_for(task, rows, item="a row")


def _carve(ds: RowImages, fraction: float, seed: int) -> tuple[RowImages, RowImages]:
    """``folders.carve``; a multi-label set is ranked as one group (as ``labelfiles._carve``)."""
    return carve(ds, fraction, seed, stratify=not ds.multilabel)


def rows_fingerprint(ds: RowImages) -> str:
    """A digest naming a split of a dataset: its rows (``SPLIT[ROW]``) with their labels."""
    lines = sorted(f"{os.path.relpath(p, ds.root)}\t{_names_of(ds, t)}" for p, t in ds.samples)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _names_of(ds: RowImages, target: int | tuple[int, ...]) -> str:
    return ";".join(ds.classes[t] for t in target) if isinstance(target, tuple) else ds.classes[target]


def describe_rows(ds: RowImages, name: str, table: RowTable, split: str | None,
                  carved: dict[str, Any] | None = None) -> dict[str, Any]:
    """``folders.describe_split`` for a split of a dataset: also the source, its columns and which of
    its rows (``split``: ``train``, ``val`` or ``test``; None: the training rows, which ``carved`` cut)."""
    return {"name": name, "root": table.source, "carved": carved, "num_files": len(ds.samples),
            "fingerprint": rows_fingerprint(ds),
            "dataset": {"source": table.source, "split": split, "columns": table.columns.to_dict()}}


def _by_split(rows: Sequence[Row]) -> dict[str, list[Row]]:
    parts: dict[str, list[Row]] = {}
    for row in rows:
        parts.setdefault(row.split or "train", []).append(row)
    return parts


def _check_known(rows: Iterable[Row], classes: Sequence[str], what: str) -> None:
    known = set(classes)
    for row in rows:
        extra = [label for label in row.labels if label not in known]
        if extra:
            raise UserError(f"{row.where}: label '{extra[0]}' of a {what} image is none of the training set's "
                            "classes")


def _classes(table: RowTable, train: Sequence[Row]) -> list[str]:
    present = {label for row in train for label in row.labels}
    if table.order is None:
        return sorted(present)
    return [name for name in table.order if name in present]


def load_hf_splits(data: str | Path, exclude: frozenset[str] = frozenset(), *, test_fraction: float = 0.2,
                   val_fraction: float = 0.0, split_seed: int = 0, columns: Columns = Columns(),
                   task: str = "auto") -> Splits:
    """The splits of a dataset, as ``folders.load_splits`` makes them of a folder.

    Args:
        data: the dataset (``is_hf_data``).
        exclude: rows' paths to leave out (see ``preflight``).
        test_fraction: the share of each class held out as the test part, where there is no test or
            validation split.
        val_fraction: the share of each training class held out for validation (0: none), where
            there is no validation split.
        split_seed: which rows are held out.
        columns: which columns hold what (None fields: found by feature and name).
        task: ``auto``, ``single`` or ``multilabel`` (see ``choose_task``; the Splits record which, and why).
    """
    table = read_rows(data, columns)
    usable = [r for r in table.rows if r.path not in exclude]
    task, why = choose_task(table, usable, task)
    multilabel = task == "multilabel"
    parts = _by_split(_rows_for(task, usable))
    source = table.source
    if not parts.get("train"):
        raise UserError(f"{source} has no train row" + (" left" if exclude else "") +
                        (" (its splits hold only " + ", ".join(sorted(parts)) + ")" if parts else ""))
    classes = _classes(table, parts["train"])
    left = [name for name in table.order or () if name not in classes]
    notes = list(table.notes)
    if left:
        notes.append(f"{source}: class(es) without training rows left out: {', '.join(left[:10])}"
                     + (f" and {len(left) - 10} more" if len(left) > 10 else ""))
    for split in ("val", "test"):
        _check_known(parts.get(split, ()), classes, split)
    if val_fraction > 0 and parts.get("test") and parts.get("val"):
        raise UserError(f"{source} has a validation split beside its test split: --val-fraction carves one from "
                        "train only where there is none")
    made = hold_out(parts, lambda rows: RowImages(table, rows, classes, multilabel), classes, name=source,
                    noun="rows", kind="split", test_fraction=test_fraction, val_fraction=val_fraction,
                    split_seed=split_seed, stratify=not multilabel)
    records = {split: describe_rows(part, made.sources[split] or split, table, made.sources[split],
                                    made.carved.get(split)) for split, part in made.held.items()}
    return Splits(made.train, made.test, list(classes), made.warnings, val=made.val, notes=[*notes, *made.notes],
                  records=records, task=task, task_why=why)


def eval_split(data: str | Path, classes: Sequence[str], record: dict[str, Any] | None,
               columns: Columns | None = None, task: str = "single") -> tuple[RowImages, str]:
    """What eval.py evaluates of a dataset, and a line saying which rows those are: the part a run
    held out of it (as its checkpoint ``record`` says), else its test split, else its validation
    split, else its training rows, else every row.

    Args:
        data: the dataset.
        classes: the checkpoint's classes.
        record: the checkpoint's record of its test split (``describe_rows``), or None.
        columns: the columns to read; None: those the record names where it is of this dataset,
            else found by feature and name.
        task: the checkpoint's task, ``single`` or ``multilabel``.

    Raises:
        UserError: for a label the checkpoint lacks, or a held-out part whose rows changed since.
    """
    recorded = (record or {}).get("dataset") or {}
    same = recorded.get("source") == source_of(data)
    if columns is None:
        columns = Columns.from_dict(recorded["columns"]) if same else Columns()
    table = read_rows(data, columns)
    if same and record.get("carved"):
        return _carved_again(table, classes, record, task), (f"the {record['num_files']} rows held out of {table.source} "
                                                        "for testing, as recorded in the checkpoint")
    rows = _rows_for(task, table.rows)
    parts = _by_split(rows) if table.has_split else {"all": rows}
    split = next(s for s in ("test", "val", "train", "all") if parts.get(s))
    _check_known(parts[split], classes, "evaluation")
    what = "every row" if split == "all" else f"the {split} rows"
    ds = RowImages(table, parts[split], classes, task == "multilabel")
    return ds, f"{what} of {table.source} ({len(ds.samples)} images)"


def _carved_again(table: RowTable, classes: Sequence[str], record: dict[str, Any], task: str) -> RowImages:
    rows = [r for r in _rows_for(task, table.rows) if (r.split or "train") == "train"]
    _check_known(rows, classes, "training")
    _, part = _carve(RowImages(table, rows, classes, task == "multilabel"), record["carved"]["fraction"],
                     record["carved"]["seed"])
    if rows_fingerprint(part) != record["fingerprint"]:
        raise UserError(f"the {record['name']} part held out of {table.source} is not the one the checkpoint was "
                        f"evaluated on ({len(part.samples)} rows now, {record['num_files']} then): rows were added, "
                        "removed or relabelled since")
    return part


def recorded_split(record: dict[str, Any], classes: Sequence[str], ckpt: str | Path,
                   task: str = "single") -> RowImages:
    """The test split of a dataset that a checkpoint records (``evalsplit.recorded_split``; ``task``:
    the checkpoint's).

    Raises:
        UserError: asking for ``--data`` where the dataset is gone or its rows changed since.
    """
    source = record["dataset"]["source"]
    if not source.startswith(HF_PREFIX) and not os.path.exists(source):
        raise UserError(f"the dataset recorded in {ckpt}, {source}, is gone; pass --data DATASET")
    ds, _ = eval_split(source, classes, record, task=task)
    if not record.get("carved") and rows_fingerprint(ds) != record["fingerprint"]:
        raise UserError(f"the {record['name']} rows of {source} changed since training ({record['num_files']} rows "
                        f"then, {len(ds.samples)} now: added, removed or relabelled); pass --data {source} to "
                        "evaluate them as they are")
    return ds
