"""Labels kept in a file: a CSV, TSV, JSON Lines or JSON table of one row per image.

The columns (matched without regard to case; ``--image-column`` and the others name them):

- the image's path: ``image``, ``path``, ``file`` or ``filename``; relative to the label file's folder;
- its labels: one column (``label``, ``labels``, ``class`` or ``tags``) where several labels are
  joined by ``;``, ``|`` or ``,`` (the first of them found in the file, or ``--label-sep``); or one
  0/1 column per class (one-hot: ``--label-columns a,b,c``, or found where every other column is 0/1);
- optionally the split: ``split``, holding ``train``, ``val`` (``valid``, ``validation``) or ``test``.

Files as tools write them are read as they are: a UTF-8 byte-order mark, CRLF line ends, quoted
fields with commas, blank lines, and the unnamed index column of pandas' ``to_csv`` (a column
named ``""`` or ``Unnamed: N`` is no data). JSON holds a list of row objects (pandas' ``records``)
or a mapping of columns (pandas' default, ``columns``).

Each row keeps its list of labels (``Row.labels``): a single-label run refuses a row with several,
naming it. The splits follow the folder layouts (``folders``): without a split column, or with
train rows only, a test part is carved out by path hash and recorded; with val rows alone, they
are the test split. Samples are ordered by class, then path, as an ImageFolder orders them, so
that the same images give the same run whether they sit in class folders or in a label file.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from torch.utils.data import Dataset

from finetune.data.folders import Splits, carve, hold_out, is_image_name, missing_classes
from finetune.data.images import load_rgb
from finetune.errors import UserError

LABEL_FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
IMAGE_COLUMNS = ("image", "path", "file", "filename")
LABEL_COLUMNS = ("label", "labels", "class", "tags")
SPLIT_COLUMN = "split"
LABEL_SEPARATORS = (";", "|", ",")
SPLIT_VALUES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_TRUE, _FALSE = ("1", "1.0", "true"), ("0", "0.0", "false")  # one-hot cells as pandas writes them too


def is_label_file(path: str | Path) -> bool:
    """Whether ``--data`` names a label file (by its extension) rather than a dataset folder."""
    return Path(path).suffix.lower() in LABEL_FILE_SUFFIXES and not Path(path).is_dir()


@dataclass(frozen=True)
class Columns:
    """Which columns of a label file hold what; None: found by name (see the module docstring).

    Attributes:
        image: the path column.
        label: the labels column.
        sep: what joins several labels in it.
        onehot: the 0/1 columns, one per class.
        split: the split column.
    """

    image: str | None = None
    label: str | None = None
    sep: str | None = None
    onehot: tuple[str, ...] | None = None
    split: str | None = None

    def __post_init__(self) -> None:
        if self.label and self.onehot:
            raise UserError("--label-column (labels in one column) and --label-columns (one 0/1 column per class) "
                            "exclude each other: choose one")
        if self.sep is not None and not self.sep:
            raise UserError("--label-sep may not be empty")

    @classmethod
    def from_config(cls, config: Any) -> "Columns":
        """The columns a TrainConfig (or EvalConfig) names."""
        onehot = getattr(config, "label_columns", None)
        names = tuple(n.strip() for n in onehot.split(",") if n.strip()) if onehot else None
        return cls(getattr(config, "image_column", None), getattr(config, "label_column", None),
                   getattr(config, "label_sep", None), names or None, getattr(config, "split_column", None))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "onehot": list(self.onehot) if self.onehot else None}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Columns":
        return cls(**{**raw, "onehot": tuple(raw["onehot"]) if raw.get("onehot") else None})


@dataclass(frozen=True)
class Row:
    """One image of a label file.

    Attributes:
        path: the image's path, absolute and normalised ("" where the row's path is empty).
        labels: its labels, in the row's order (one for single-label data; none or several are kept
            for multi-label training).
        split: ``train``, ``val`` or ``test``; None without a split column.
        where: where the row is, for messages: ``labels.csv line 7``.
    """

    path: str
    labels: tuple[str, ...]
    split: str | None
    where: str


@dataclass
class LabelTable:
    """A label file's rows and how they were read (``Columns`` as resolved, for the checkpoint).

    ``bad`` holds rows that name no image, as ``(where, why)``: the preflight reports them, and
    ``--bad-data skip`` leaves them out.
    """

    file: Path
    rows: list[Row]
    columns: Columns
    layout: str  # "column" (labels in one column) or "onehot"
    bad: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def folder(self) -> str:
        return os.path.dirname(os.path.abspath(self.file))

    @property
    def has_split(self) -> bool:
        return self.columns.split is not None


def read_table(file: str | Path, columns: Columns = Columns()) -> LabelTable:
    """Read and check a label file (see the module docstring); files are not opened here.

    The last few tables read are kept while their file is unchanged: the preflight and the
    splits read the same file.

    Raises:
        UserError: naming the file and row, for a missing header, an unknown column, a split value
            that is none of the three, a one-hot cell that is not 0/1, a path listed twice with
            other labels or in two splits, or no row that names an image.
    """
    file = Path(file)
    try:
        st = file.stat()
    except FileNotFoundError:
        raise UserError(f"label file not found: {file}") from None
    except OSError as err:
        raise UserError(f"cannot read label file {file}: {err}") from None
    return _read_table(os.path.abspath(file), st.st_size, st.st_mtime_ns, columns)


@functools.lru_cache(maxsize=4)
def _read_table(file: str, size: int, mtime: int, columns: Columns) -> LabelTable:
    path = Path(file)
    header, records = _records(path)
    return _table(path, header, records, columns)


def _records(file: Path) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """The column names and the ``(where, {column: value})`` records of a label file."""
    name = file.name
    try:
        text = file.read_text(encoding="utf-8-sig")  # a byte-order mark is no part of the first column's name
    except UnicodeDecodeError as err:
        raise UserError(f"{file} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise UserError(f"cannot read label file {file}: {err}") from None
    suffix = file.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _delimited(file, text, "\t" if suffix == ".tsv" else ",")
    if suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as err:
                raise UserError(f"{name} line {number} is not JSON: {err}") from None
            if not isinstance(item, dict):
                raise UserError(f"{name} line {number} is not a JSON object (one object per image, "
                                'e.g. {"image": "a.jpg", "label": "cat"})')
            records.append((f"{name} line {number}", item))
        return _keys(records), records
    try:
        data = json.loads(text)
    except ValueError as err:
        raise UserError(f"{file} is not JSON: {err}") from None
    if isinstance(data, list):
        for number, item in enumerate(data, 1):
            if not isinstance(item, dict):
                raise UserError(f"{name} row {number} is not a JSON object (a list of one object per image, "
                                'e.g. [{"image": "a.jpg", "label": "cat"}])')
        records = [(f"{name} row {number}", item) for number, item in enumerate(data, 1)]
        return _keys(records), records
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        # pandas' default to_json: {column: {index: value}}
        index = list(dict.fromkeys(k for values in data.values() for k in values))
        records = [(f"{name} row {key!r}", {col: values.get(key) for col, values in data.items()}) for key in index]
        return list(data), records
    raise UserError(f"{file} must hold a list of objects, one per image (pandas' orient='records'), or a mapping "
                    "of columns (orient='columns')")


def _keys(records: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    return list(dict.fromkeys(k for _, item in records for k in item))


def _delimited(file: Path, text: str, delimiter: str) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)
    header: list[str] | None = None
    records = []
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):  # blank lines, and ",,," as spreadsheets write them
                continue
            if header is None:
                header = [cell.strip() for cell in row]
                continue
            where = f"{file.name} line {reader.line_num}"
            if len(row) > len(header):
                if any(cell.strip() for cell in row[len(header):]):
                    raise UserError(f"{where} has {len(row)} fields, the header {len(header)} (a field with "
                                    f"{'commas' if delimiter == ',' else 'tabs'} in it needs quotes)")
                row = row[:len(header)]
            records.append((where, dict(zip(header, row + [""] * (len(header) - len(row))))))
    except csv.Error as err:
        raise UserError(f"{file.name} line {reader.line_num}: {err}") from None
    if header is None:
        raise UserError(f"{file} has no rows")
    return header, records


def _index_column(name: str) -> bool:
    """pandas' index column: unnamed in to_csv, ``Unnamed: 0`` once read back and written again."""
    return not name.strip() or (name.startswith("Unnamed: ") and name[9:].isdigit())


def _find(header: Sequence[str], given: str | None, known: Sequence[str], flag: str, what: str, file: Path) -> str | None:
    by_lower = {h.strip().lower(): h for h in header}
    if given is not None:
        if given in header:
            return given
        if given.strip().lower() in by_lower:
            return by_lower[given.strip().lower()]
        raise UserError(f"{file} has no column '{given}' ({flag}); its columns: {_names(header)}")
    return next((by_lower[k] for k in known if k in by_lower), None)


def _names(header: Sequence[str]) -> str:
    return ", ".join(repr(h) for h in header if not _index_column(h)) or "none"


def _onehot_value(value: Any) -> bool | None:
    """True/False for a one-hot cell (1/0, 1.0/0.0, true/false), None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower() if isinstance(value, str) else None
    return True if text in _TRUE else False if text in _FALSE else None


def _table(file: Path, header: list[str], records: list[tuple[str, dict[str, Any]]], columns: Columns) -> LabelTable:
    image = _find(header, columns.image, IMAGE_COLUMNS, "--image-column", "image", file)
    if image is None:
        if any(is_image_name(h) or "/" in h for h in header):
            raise UserError(f"{file} has no header row: its first line is data ({', '.join(header)[:80]}); "
                            "add one such as image,label")
        raise UserError(f"{file} has no image column (image, path, file or filename; or --image-column NAME); "
                        f"its columns: {_names(header)}")
    split = _find(header, columns.split, (SPLIT_COLUMN,), "--split-column", "split", file)
    label = _find(header, columns.label, () if columns.onehot else LABEL_COLUMNS, "--label-column", "label", file)
    onehot: tuple[str, ...] | None = None
    if columns.onehot:
        onehot = tuple(_find(header, name, (), "--label-columns", "label", file) or name for name in columns.onehot)
    elif label is None:
        others = [h for h in header if h not in (image, split) and not _index_column(h)]
        bad = next(((c, where, item.get(c)) for c in others for where, item in records
                    if _onehot_value(item.get(c)) is None), None)
        if len(others) < 2 or bad is not None:
            why = (f"; column '{bad[0]}' holds {bad[2]!r} at {bad[1]}, so the other columns are not one 0/1 column "
                   "per class" if bad is not None and len(others) >= 2 else "")
            raise UserError(f"{file} has no label column (label, labels, class or tags; or --label-column NAME, or "
                            f"--label-columns A,B,C for one 0/1 column per class); its columns: {_names(header)}{why}")
        onehot = tuple(others)
    sep = columns.sep
    if label is not None and sep is None:  # the first separator any row uses (a row of lists needs none)
        values = [item.get(label) for _, item in records]
        sep = next((s for s in LABEL_SEPARATORS if any(isinstance(v, str) and s in v for v in values)), None)
    resolved = Columns(image, label, sep, onehot, split)

    rows: dict[str, Row] = {}
    bad_rows: list[tuple[str, str]] = []
    notes: list[str] = []
    duplicates = 0
    for where, item in records:
        raw = item.get(image)
        text = "" if raw is None else str(raw).strip()
        if not text:
            bad_rows.append((where, "empty image path"))
            continue
        path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(file)), os.path.expanduser(text)))
        labels = _onehot_labels(item, onehot, where) if onehot else _column_labels(item.get(label), sep)
        part = None
        if split is not None:
            value = item.get(split)
            part = SPLIT_VALUES.get(str(value if value is not None else "").strip().lower())
            if part is None:
                raise UserError(f"{where}: split {value!r} is none of train, val (or valid, validation) and test")
        row = Row(path, labels, part, where)
        seen = rows.get(path)
        if seen is None:
            rows[path] = row
            continue
        if set(seen.labels) != set(labels):
            raise UserError(f"{where} lists {text} again with other labels ({_joined(labels)}; {seen.where}: "
                            f"{_joined(seen.labels)})")
        if seen.split != part:
            raise UserError(f"{where} lists {text} again in another split ({part}; {seen.where}: {seen.split})")
        duplicates += 1
    if duplicates:
        notes.append(f"{file.name} lists {duplicates} image(s) twice with the same labels: each is used once")
    if not rows:
        why = f" ({len(bad_rows)} with an empty image path)" if bad_rows else ""
        raise UserError(f"{file} has no usable row{why}")
    layout = "onehot" if onehot else "column"
    return LabelTable(file, list(rows.values()), resolved, layout, bad_rows, notes)


def _joined(labels: Sequence[str]) -> str:
    return ";".join(labels) or "no label"


def _column_labels(value: Any, sep: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, list):  # JSON: a list of labels
        parts = [_text(v) for v in value]
    else:
        text = _text(value)
        parts = text.split(sep) if sep else [text]
    return tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # a class id as pandas may write it (3.0)
    return str(value)


def _onehot_labels(item: dict[str, Any], onehot: Sequence[str], where: str) -> tuple[str, ...]:
    labels = []
    for name in onehot:
        value = _onehot_value(item.get(name))
        if value is None:
            raise UserError(f"{where}: one-hot column '{name}' holds {item.get(name)!r}, not 0 or 1")
        if value:
            labels.append(name)
    return tuple(labels)


class LabelledImages(Dataset):
    """Images and their class indices from a label file: what an ImageFolder offers the rest of the
    package (``samples`` of (path, target), ``targets``, ``classes``, ``class_to_idx``, ``root``).

    A single-label target is the class index; a multi-label target is the tuple of the image's class
    indices, ascending (empty for an image without a label: a negative of every class), which the
    loader hands over as a multi-hot vector (``loader.target_tensor``).

    Attributes:
        root: the label file's folder (paths are recorded relative to it).
        label_file: the label file.
        multilabel: whether targets are tuples of class indices.
        where: path -> the row that lists it, for messages.
        label_lists: path -> every label of its row.
    """

    def __init__(self, table: LabelTable, rows: Iterable[Row], classes: Sequence[str], multilabel: bool = False):
        self.root = table.folder
        self.label_file = str(os.path.abspath(table.file))
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.multilabel = multilabel
        rows = list(rows)
        self.where = {r.path: r.where for r in rows}
        self.label_lists = {r.path: r.labels for r in rows}
        self.loader = load_rgb
        if multilabel:  # by path: there is no one class to order by
            self.samples = sorted((r.path, tuple(sorted(self.class_to_idx[c] for c in r.labels))) for r in rows)
        else:  # ordered as an ImageFolder orders its files: by class, then path
            samples = sorted((r.path, self.class_to_idx[r.labels[0]]) for r in rows)
            self.samples = sorted(samples, key=lambda s: s[1])
        self.imgs = self.samples
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        return self.loader(path), target


def choose_task(table: LabelTable, rows: Sequence[Row], task: str = "auto") -> tuple[str, str]:
    """Whether a label file trains a single-label or a multi-label classifier, and why.

    ``auto`` is multi-label where the layout is one-hot, else as ``rows_task`` decides.

    Args:
        table: the label file as read.
        rows: its usable rows.
        task: ``auto``, ``single`` or ``multilabel`` (``--task``).
    """
    if task == "auto" and table.layout == "onehot":
        return "multilabel", f"{table.file.name} has one 0/1 column per class"
    return rows_task(rows, table.file.name, task)


def rows_task(rows: Sequence[Row], source: str, task: str = "auto") -> tuple[str, str]:
    """The task of rows (a label file's, a Hugging Face dataset's), and why: ``auto`` is multi-label
    where any row has several labels; else single-label (a row without a label is then refused by
    ``single_label``, which says so).

    Args:
        rows: the usable rows.
        source: the data, as the reason names it.
        task: ``auto``, ``single`` or ``multilabel`` (``--task``).
    """
    if task != "auto":
        return task, f"--task {task}"
    several = next((row for row in rows if len(row.labels) > 1), None)
    if several is not None:
        return "multilabel", f"{several.where} has several labels ({_joined(several.labels)})"
    return "single", f"every row of {source} has one label"


def single_label(rows: Iterable[Row], item: str = "an image") -> list[Row]:
    """``rows``, each of which must hold exactly one label.

    Args:
        item: what a row stands for, in the message about a row without a label (``a row`` for a
            dataset's).

    Raises:
        UserError: naming the first row with none or several.
    """
    rows = list(rows)
    for row in rows:
        if len(row.labels) > 1:
            raise UserError(f"{row.where} has several labels ({_joined(row.labels)}), which --task single "
                            "refuses: pass --task multilabel (or auto) to train a multi-label classifier")
        if not row.labels:
            raise UserError(f"{row.where} has no label: single-label training needs one per image "
                            f"(with --task multilabel {item} without a label is a negative of every class)")
    return rows


def rows_for(task: str, rows: Iterable[Row], item: str = "an image") -> list[Row]:
    """The rows a task trains on: every one for multi-label, else each with one label (``single_label``)."""
    return list(rows) if task == "multilabel" else single_label(rows, item)


def _carve(ds: LabelledImages, fraction: float, seed: int) -> tuple[LabelledImages, LabelledImages]:
    """``folders.carve``; a multi-label set is ranked as one group (its label sets are too many and
    too small to stratify by)."""
    return carve(ds, fraction, seed, stratify=not ds.multilabel)


def usable_rows(table: LabelTable, exclude: frozenset[str] = frozenset()) -> list[Row]:
    """The rows whose images exist and are not in ``exclude`` (files and rows the preflight left out
    under ``--bad-data skip``; a bad row is named there as ``where``).

    Raises:
        UserError: naming the file and row, for a bad row or a missing image that ``exclude`` lacks.
    """
    for where, why in table.bad:
        if where not in exclude:
            raise UserError(f"{where}: {why} (fix the row, or pass --bad-data skip)")
    rows = []
    for row in table.rows:
        if row.path in exclude:
            continue
        if not os.path.isfile(row.path):
            raise UserError(f"{row.where}: image not found: {row.path} (fix the row, or pass --bad-data skip)")
        rows.append(row)
    if not rows:
        raise UserError(f"{table.file} has no usable row (every image listed is missing or unusable)")
    return rows


def labelled_fingerprint(ds: LabelledImages) -> str:
    """A digest naming a split of a label file: its files, relative to the label file's folder, with
    their labels (here the label is no part of the path, as a class folder is)."""
    lines = sorted(f"{Path(os.path.relpath(p, ds.root)).as_posix()}\t{_names_of(ds, t)}" for p, t in ds.samples)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _names_of(ds: LabelledImages, target: int | tuple[int, ...]) -> str:
    return ";".join(ds.classes[t] for t in target) if isinstance(target, tuple) else ds.classes[target]


def describe_labelled(ds: LabelledImages, name: str, table: LabelTable, split: str | None,
                      carved: dict[str, Any] | None = None) -> dict[str, Any]:
    """``folders.describe_split`` for a split of a label file: also the file, its columns and which
    of its rows (``split``: the split column's value; None: the training rows, which ``carved`` cut)."""
    return {"name": name, "root": os.path.abspath(ds.root), "carved": carved, "num_files": len(ds.samples),
            "fingerprint": labelled_fingerprint(ds),
            "labels": {"file": ds.label_file, "split": split, "columns": table.columns.to_dict()}}


def _by_split(rows: Sequence[Row]) -> dict[str, list[Row]]:
    parts: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        parts[row.split or "train"].append(row)
    return parts


def _check_known(rows: Iterable[Row], classes: Sequence[str], what: str) -> None:
    known = set(classes)
    for row in rows:
        extra = [label for label in row.labels if label not in known]
        if extra:
            raise UserError(f"{row.where}: label '{extra[0]}' of a {what} image is none of the training set's "
                            "classes")


def load_label_splits(file: str | Path, exclude: frozenset[str] = frozenset(), *, test_fraction: float = 0.2,
                      val_fraction: float = 0.0, split_seed: int = 0, columns: Columns = Columns(),
                      task: str = "auto") -> Splits:
    """The splits of a label file, as ``folders.load_splits`` makes them of a folder; the classes are
    the training rows' labels, sorted (a one-hot file's columns, sorted).

    Args:
        file: the label file.
        exclude: files (and rows, by ``Row.where``) to leave out (see ``preflight``).
        test_fraction: the share of each class held out as the test part, where no row is test or val.
        val_fraction: the share of each training class held out for validation (0: none), where no
            row is val.
        split_seed: which files are held out.
        columns: which columns hold what (None fields: found by name).
        task: ``auto``, ``single`` or ``multilabel`` (see ``choose_task``; the Splits record which, and why).
    """
    table = read_table(file, columns)
    usable = usable_rows(table, exclude)
    task, why = choose_task(table, usable, task)
    multilabel = task == "multilabel"
    parts = _by_split(rows_for(task, usable))
    name = table.file.name
    if not parts.get("train"):
        raise UserError(f"{name} has no train row" + (" left" if exclude else "") +
                        (" (its split column holds only " + ", ".join(sorted(parts)) + ")" if parts else ""))
    if multilabel and table.layout == "onehot":
        classes = sorted(table.columns.onehot or ())
    else:
        classes = sorted({label for row in parts["train"] for label in row.labels})
    for split in ("val", "test"):
        _check_known(parts.get(split, ()), classes, split)
    if val_fraction > 0 and parts.get("test") and parts.get("val"):
        raise UserError(f"{name} has val rows beside its test rows: --val-fraction carves a validation part "
                        "from train only where there is none")
    made = hold_out(parts, lambda rows: LabelledImages(table, rows, classes, multilabel), classes, name=name,
                    noun="images", kind="rows", test_fraction=test_fraction, val_fraction=val_fraction,
                    split_seed=split_seed, stratify=not multilabel)
    # A one-hot column of no training image: multi-label learns the class as never present.
    warnings = [f"class '{c}' has no image in the train rows of {name}" for c in missing_classes(classes, made.train)]
    records = {split: describe_labelled(part, made.sources[split] or split, table, made.sources[split],
                                        made.carved.get(split)) for split, part in made.held.items()}
    return Splits(made.train, made.test, list(classes), warnings + made.warnings, val=made.val,
                  notes=[*table.notes, *made.notes], records=records, task=task, task_why=why)


def eval_split(file: str | Path, classes: Sequence[str], record: dict[str, Any] | None,
               columns: Columns | None = None, task: str = "single") -> tuple[LabelledImages, str]:
    """What eval.py evaluates of a label file, and a line saying which rows those are: the part a
    run held out of it (as its checkpoint ``record`` says), else its test rows, else its val rows,
    else every row.

    Args:
        file: the label file.
        classes: the checkpoint's classes.
        record: the checkpoint's record of its test split (``describe_labelled``), or None.
        columns: the columns to read; None: those the record names where it is of this file, else
            found by name.
        task: the checkpoint's task, ``single`` or ``multilabel``.

    Raises:
        UserError: for a label the checkpoint lacks, or a held-out part whose files changed since.
    """
    labels = (record or {}).get("labels") or {}
    same_file = labels.get("file") == os.path.abspath(file)
    if columns is None:
        columns = Columns.from_dict(labels["columns"]) if same_file else Columns()
    table = read_table(file, columns)
    if same_file and record.get("carved"):
        return _carved_again(table, classes, record, task), (f"the {record['num_files']} images held out of {file} "
                                                              "for testing, as recorded in the checkpoint")
    rows = rows_for(task, usable_rows(table))
    parts = _by_split(rows) if table.has_split else {"all": rows}
    split = next(s for s in ("test", "val", "train", "all") if parts.get(s))
    _check_known(parts[split], classes, "evaluation")
    what = "every row" if split == "all" else f"the {split} rows"
    ds = LabelledImages(table, parts[split], classes, task == "multilabel")
    return ds, f"{what} of {file} ({len(ds.samples)} images)"


def _carved_again(table: LabelTable, classes: Sequence[str], record: dict[str, Any], task: str) -> LabelledImages:
    rows = [r for r in rows_for(task, usable_rows(table)) if (r.split or "train") == "train"]
    _check_known(rows, classes, "training")
    train = LabelledImages(table, rows, classes, task == "multilabel")
    _, part = _carve(train, record["carved"]["fraction"], record["carved"]["seed"])
    if labelled_fingerprint(part) != record["fingerprint"]:
        raise UserError(f"the {record['name']} part held out of {table.file} is not the one the checkpoint was "
                        f"evaluated on ({len(part.samples)} images now, {record['num_files']} then): rows were added, "
                        "removed or relabelled since")
    return part


def recorded_split(record: dict[str, Any], classes: Sequence[str], ckpt: str | Path,
                   task: str = "single") -> LabelledImages:
    """The test split of a label file that a checkpoint records (``evalsplit.recorded_split``;
    ``task``: the checkpoint's).

    Raises:
        UserError: asking for ``--data`` where the label file is gone or its rows changed since.
    """
    file = record["labels"]["file"]
    if not os.path.isfile(file):
        raise UserError(f"the label file recorded in {ckpt}, {file}, is gone; pass --data FILE")
    ds, _ = eval_split(file, classes, record, task=task)
    if not record.get("carved") and labelled_fingerprint(ds) != record["fingerprint"]:
        raise UserError(f"the {record['name']} rows of {file} changed since training ({record['num_files']} images "
                        f"then, {len(ds.samples)} now: added, removed or relabelled); pass --data {file} to evaluate "
                        "them as they are")
    return ds

