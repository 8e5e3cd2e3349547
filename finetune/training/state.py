"""Resumable training state: Accelerate's ``save_state`` plus where the run stands, swapped in whole.

The folder ``state/`` holds what ``accelerator.save_state`` writes (model, optimizer, scheduler,
scaler and every process's RNG states; tensors only, loaded with ``weights_only=True``) and
``progress.json`` (epoch, step, history); a finished run's holds ``progress.json`` alone. A new
state is written to ``state.tmp/`` and swapped in by renames, so a kill at any moment leaves the
previous state or the new one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from finetune.errors import UserError, first_line
from finetune.utils.files import atomic_write_text, fsync_tree

STATE = "state"
PROGRESS = "progress.json"


@dataclass
class Progress:
    """Where a run stands: what ``progress.json`` holds.

    ``epoch`` and ``step`` name the next batch to train: batch ``step`` (counted per process)
    of epoch ``epoch`` (both from 0); ``epoch == epochs`` once the run is finished.
    """

    epoch: int = 0
    step: int = 0
    samples: int = 0  # images of epoch ``epoch`` trained, over all processes: the position a resume maps
    setup: dict[str, Any] | None = None  # the run's setup (``resume.RunSetup``), checked on resume
    history: list[dict[str, Any]] = field(default_factory=list)  # one row of figures per finished epoch
    best_accuracy: float = -1.0  # the best accuracy (multi-label: mAP) so far on the split that chooses (-1: none yet)
    best_epoch: int = 0  # the epoch (from 1) of best.safetensors (0: none yet)
    # The epoch's loss sum, correct predictions and images before ``step``, over all processes:
    # a resumed epoch still reports all of its batches.
    epoch_sums: list[float] | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Progress":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def save_training_state(accelerator: Accelerator, run_dir: Path, progress: Progress, *, finished: bool = False) -> None:
    """Save a resumable state of the run (call on every process).

    Args:
        finished: the run has trained its last epoch. A resume may not add epochs, so nothing would
            ever continue from its weights and optimizer: the state is ``progress.json`` alone
            (a resume says the run is finished), which spares a save of twice the model's size.
    """
    final, tmp, old = run_dir / STATE, run_dir / f"{STATE}.tmp", run_dir / f"{STATE}.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        if finished:
            tmp.mkdir(parents=True, exist_ok=True)
        else:
            accelerator.save_state(str(tmp))
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot save the training state in {tmp}: {first_line(err)}; "
                        f"the previous state in {final} is intact") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / PROGRESS, progress.to_json())
        fsync_tree(tmp)  # Accelerate writes without fsync: make the state durable before it replaces the last
        # state -> state.old, state.tmp -> state, drop state.old: one of them is whole at any instant.
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def latest_state(run_dir: Path) -> Path | None:
    """The newest complete state folder of a run, if any (``state/``, else a ``state.old/`` left by a kill)."""
    for name in (STATE, f"{STATE}.old"):
        folder = run_dir / name
        if (folder / PROGRESS).is_file():
            return folder
    return None


def read_progress(folder: Path) -> Progress:
    """The ``progress.json`` of a state folder; a UserError if it is not one."""
    try:
        raw = json.loads((folder / PROGRESS).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {folder / PROGRESS}: {err}") from None
    if not isinstance(raw, dict) or not {"epoch", "step"} <= raw.keys():
        raise UserError(f"{folder / PROGRESS} does not describe a training state")
    return Progress.from_dict(raw)


def load_training_state(accelerator: Accelerator, folder: Path) -> None:
    """Restore a state saved by ``save_training_state`` into the prepared objects."""
    try:
        accelerator.load_state(str(folder))
    except Exception as err:  # a state of another model, a truncated file, a pickle we refuse to run
        raise UserError(f"cannot resume from {folder}: {first_line(err)[:300]}") from None
