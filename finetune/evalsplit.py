"""The evaluation split a run was tested on, recorded in its checkpoint, so that
``eval.py --ckpt FILE`` without ``--data`` evaluates exactly those files again.

The record names the folder by its absolute path and the files by a fingerprint of their
listing: eval.py refuses, with one line asking for ``--data``, a folder that is gone or whose
files were added, removed or renamed since.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from finetune.errors import UserError


def split_fingerprint(paths: Iterable[str | Path], root: str | Path) -> str:
    """A digest naming a list of files: sha256 of their sorted paths relative to ``root``.

    Two listings have the same fingerprint exactly when they hold the same files under the same
    relative paths (the class folder is part of the path, so labels count too).

    Args:
        paths: the files.
        root: the folder the paths are taken relative to (the split folder).
    """
    rel = sorted(Path(os.path.relpath(p, root)).as_posix() for p in paths)
    return hashlib.sha256("\n".join(rel).encode()).hexdigest()


def describe_split(ds: Any, name: str) -> dict[str, Any]:
    """A checkpoint's record of an ImageFolder split: its folder, file count and fingerprint."""
    root = os.path.abspath(ds.root)
    return {"name": name, "root": root, "carved": None, "num_files": len(ds.samples),
            "fingerprint": split_fingerprint((p for p, _ in ds.samples), root)}


def recorded_split(meta: dict[str, Any], classes: Sequence[str], ckpt: str | Path) -> Any:
    """The test split a checkpoint records, as an ImageFolder indexed by ``classes``.

    Raises:
        UserError: asking for ``--data`` where the checkpoint records no split, the folder is gone,
            or its files changed since training.
    """
    from finetune.data import image_folder

    record = (meta.get("splits") or {}).get("test")
    if not record:
        raise UserError(f"{ckpt} does not record the folder it was tested on (written by an older train.py); "
                        "pass --data DIR")
    root = Path(record["root"])
    if record.get("carved"):
        raise UserError(f"{ckpt} was tested on a part held out of {root}; pass --data with the dataset folder")
    if not root.is_dir():
        raise UserError(f"the test folder recorded in {ckpt}, {root}, is gone; pass --data DIR")
    ds = image_folder(root, classes)
    if split_fingerprint((p for p, _ in ds.samples), root) != record["fingerprint"]:
        raise UserError(f"the files in {root} changed since training ({record['num_files']} images then, "
                        f"{len(ds.samples)} now: added, removed or renamed); pass --data {root} to evaluate "
                        "them as they are")
    return ds
