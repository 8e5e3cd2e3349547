"""The run folder: where it is, that it can be written, that it does not replace another run, and
the resolved configuration in it."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from finetune.config import TrainConfig, save_yaml
from finetune.errors import UserError

# What a run leaves in its folder (eval/ is eval.py's default output beside the checkpoint).
RUN_FILES = ("model.safetensors", "best.safetensors", "model.ood.safetensors", "best.ood.safetensors", "state",
             "state.old", "state.tmp", "config.yaml", "eval")
LOGGED = ("samples.png", "curves.png", "logs")  # pictures and tracker logs: --overwrite clears them too
SAVED = ("model.safetensors", "state", "state.old")  # present once a run has saved anything worth keeping


def default_run_dir(config: TrainConfig, data_dir: Path) -> Path:
    """``runs/MODEL-DATANAME`` (``$SLURM_JOB_ID`` appended inside a SLURM job).

    DATANAME is the folder's name as given: a symlink is named after the link, not its target
    (two links to one folder are two datasets as far as the user is concerned).
    """
    model, data = (re.sub(r"[^A-Za-z0-9_.-]+", "_", text)
                   for text in (config.model, Path(os.path.abspath(data_dir)).name))
    name = f"{model}-{data}"
    if os.environ.get("SLURM_JOB_ID"):
        name += f"-{os.environ['SLURM_JOB_ID']}"
    return Path("runs") / name


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds (part of) a previous run."""
    return any((folder / name).exists() for name in RUN_FILES)


def has_saved(folder: Path) -> bool:
    """Whether a run in ``folder`` has saved a model or a state (what a failed start must not remove)."""
    return any((folder / name).exists() for name in SAVED)


def choose_run_dir(config: TrainConfig, data_dir: Path) -> Path:
    """The run folder: ``--output-dir``, else the default name, moved on to ``NAME-2``, ``NAME-3``...
    past folders that hold other runs (with ``--resume``: the newest of them).

    Raises:
        UserError: if ``--output-dir`` holds a previous run and neither ``--resume`` nor
            ``--overwrite`` was given.
    """
    if config.output_dir:
        run_dir = Path(config.output_dir)
        if holds_run(run_dir) and not (config.resume or config.overwrite):
            raise UserError(f"{run_dir} holds a previous run: continue it with --resume, replace it with "
                            "--overwrite, or choose another --output-dir")
        return run_dir
    base = default_run_dir(config, data_dir)
    names = (base if k == 1 else base.with_name(f"{base.name}-{k}") for k in itertools.count(1))
    if config.overwrite:
        return base
    if config.resume:  # the newest run of this name
        previous = base
        for candidate in names:
            if not holds_run(candidate):
                return previous
            previous = candidate
    return next(candidate for candidate in names if not holds_run(candidate))


@dataclass(frozen=True)
class RunDir:
    """The run folder, and what it held before this run (what ``discard_unsaved`` must keep)."""

    path: Path
    created: bool  # this run made the folder
    kept: tuple[str, ...] = ()  # names of LOGGED that were there before this run (not its own)


def prepare_run_dir(config: TrainConfig, data_dir: Path) -> RunDir:
    """Choose the run folder, create it, check it can be written before any training, clear a run
    it held if ``--overwrite``, save ``config.yaml``. Call on the main process only.

    Returns:
        The folder, whether this run created it, and the pictures and logs it already held.

    Raises:
        UserError: if the folder holds another run (``choose_run_dir``), or cannot be created or written.
    """
    run_dir = choose_run_dir(config, data_dir)
    created = not run_dir.exists()
    ensure_writable(run_dir)
    resuming = config.resume and (run_dir / "config.yaml").exists()
    if config.overwrite:
        remove(run_dir, RUN_FILES + LOGGED)
    elif resuming and not has_saved(run_dir):
        # An attempt of this run that stopped before its first save: it starts again from the
        # beginning, and its pictures and logs would show twice.
        remove(run_dir, LOGGED)
    if not resuming:  # a resume keeps the settings it started with
        save_yaml(config, run_dir / "config.yaml")
    return RunDir(run_dir, created, tuple(name for name in LOGGED if (run_dir / name).exists()))


def discard_unsaved(run: RunDir) -> None:
    """After a run failed: if it saved nothing, remove what it wrote (the folder too if it made it),
    so that a failed start leaves no folder holding only ``config.yaml``, pictures or logs; what
    the folder held before the run stays."""
    run_dir = run.path
    if has_saved(run_dir):
        return
    if run.created:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    remove(run_dir, ("config.yaml", "state.tmp", *(n for n in LOGGED if n not in run.kept)))


def remove(folder: Path, names: Sequence[str]) -> None:
    """Remove these files and folders of ``folder`` where they exist."""
    for name in names:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` and check a file can be written in it, before any long work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(f"cannot write to output folder {folder}: {err.strerror or err}") from None
