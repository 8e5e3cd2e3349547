"""The run folder: where it is, that it can be written, and the resolved configuration in it."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from finetune.config import TrainConfig, save_yaml
from finetune.errors import UserError


def default_run_dir(config: TrainConfig, data_dir: Path) -> Path:
    """``runs/MODEL-DATANAME`` (``$SLURM_JOB_ID`` appended inside a SLURM job)."""
    name = f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', config.model)}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', data_dir.resolve().name)}"
    if os.environ.get("SLURM_JOB_ID"):
        name += f"-{os.environ['SLURM_JOB_ID']}"
    return Path("runs") / name


def prepare_run_dir(config: TrainConfig, data_dir: Path, is_main: bool) -> Path:
    """Create the run folder, check it can be written before any training, save ``config.yaml``
    (a resume keeps the run's own: the settings it started with).

    Raises:
        UserError: if the folder cannot be created or written.
    """
    run_dir = Path(config.output_dir) if config.output_dir else default_run_dir(config, data_dir)
    if not is_main:
        return run_dir
    ensure_writable(run_dir)
    if not (config.resume and (run_dir / "config.yaml").exists()):
        save_yaml(config, run_dir / "config.yaml")
    return run_dir


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` and check a file can be written in it, before any long work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(f"cannot write to output folder {folder}: {err.strerror or err}") from None
