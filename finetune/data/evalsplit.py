"""The evaluation split a run was tested on, recorded in its checkpoint, so that
``eval.py --ckpt FILE`` without ``--data`` evaluates exactly those files again.

The record names the folder (label file, or Hugging Face dataset) by its absolute path and the files by a fingerprint of
their listing: eval.py refuses, with one line asking for ``--data``, a folder that is gone or whose
files were added, removed or renamed since.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from finetune.data import hfdatasets, labelfiles
from finetune.data.folders import describe_split, image_folder, recorded_part, split_fingerprint
from finetune.errors import UserError

__all__ = ["describe_split", "recorded_split", "split_fingerprint"]  # the record is folders' (held-out parts too)


def recorded_split(meta: dict[str, Any], classes: Sequence[str], ckpt: str | Path) -> Any:
    """The test split a checkpoint records, as an ImageFolder indexed by ``classes``.

    Raises:
        UserError: asking for ``--data`` where the checkpoint records no split, the folder is gone,
            or its files changed since training.
    """
    record = (meta.get("splits") or {}).get("test")
    if not record:
        raise UserError(f"{ckpt} does not record the folder it was tested on (written by an older train.py); "
                        "pass --data DIR")
    if record.get("labels"):  # rows of a label file
        return labelfiles.recorded_split(record, classes, ckpt, meta.get("task", "single"))
    if record.get("dataset"):  # rows of a Hugging Face dataset
        return hfdatasets.recorded_split(record, classes, ckpt, meta.get("task", "single"))
    root = Path(record["root"])
    if not root.is_dir():
        raise UserError(f"the test folder recorded in {ckpt}, {root}, is gone; pass --data DIR")
    if record.get("carved"):  # a part held out of root: the same files again (refused if they changed)
        part = recorded_part(root, classes, record)
        if part is None:
            raise UserError(f"{ckpt} was tested on a part held out of {root}; pass --data with the dataset folder")
        return part
    ds = image_folder(root, classes)
    if split_fingerprint((p for p, _ in ds.samples), root) != record["fingerprint"]:
        raise UserError(f"the files in {root} changed since training ({record['num_files']} images then, "
                        f"{len(ds.samples)} now: added, removed or renamed); pass --data {root} to evaluate "
                        "them as they are")
    return ds
