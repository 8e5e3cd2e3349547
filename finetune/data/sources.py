"""What ``--data`` names, a dataset folder (``folders``), a label file (``labelfiles``) or a Hugging
Face dataset (``hfdatasets``), and its splits in each case."""

from __future__ import annotations

from pathlib import Path

from finetune.data.folders import Splits
from finetune.data.folders import load_splits as load_folder_splits
from finetune.data.hfdatasets import is_hf_data, load_hf_splits
from finetune.data.labelfiles import Columns, is_label_file, load_label_splits
from finetune.errors import UserError


def load_splits(data: str | Path, exclude: frozenset[str] = frozenset(), *, test_fraction: float = 0.2,
                val_fraction: float = 0.0, split_seed: int = 0, columns: Columns | None = None,
                task: str = "auto") -> Splits:
    """The train, optional validation and test splits of ``data``, a dataset folder, a label file or a
    Hugging Face dataset.

    Args:
        data: the dataset folder, label file or Hugging Face dataset (``hf:NAME``, a ``save_to_disk``
            folder, parquet files).
        exclude: paths of files (and a label file's rows) to leave out (see ``preflight``).
        test_fraction: the share of each class held out as the test part, where the data has none.
        val_fraction: the share of each training class held out for validation (0: none), where the
            data has no validation split beside its test split.
        split_seed: which files are held out.
        columns: a label file's or Hugging Face dataset's columns (None: found by name; ignored for
            a folder).
        task: ``auto``, ``single`` or ``multilabel`` (``labelfiles.choose_task``,
            ``hfdatasets.choose_task``); class folders are single-label.

    Raises:
        UserError: for ``multilabel`` on class folders.
    """
    if is_label_file(data):
        return load_label_splits(data, exclude, test_fraction=test_fraction, val_fraction=val_fraction,
                                 split_seed=split_seed, columns=columns or Columns(), task=task)
    if is_hf_data(data):
        return load_hf_splits(data, exclude, test_fraction=test_fraction, val_fraction=val_fraction,
                              split_seed=split_seed, columns=columns or Columns(), task=task)
    if task == "multilabel":
        raise UserError(f"--task multilabel needs a label file (--data labels.csv): {data} gives each image "
                        "one class")
    return load_folder_splits(data, exclude, test_fraction=test_fraction, val_fraction=val_fraction,
                              split_seed=split_seed)
