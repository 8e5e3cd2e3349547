"""Whether a saved state continues the run the current command describes.

A state records its run's setup: the settings that shape the training, the class list, a
fingerprint of the file listing, and how its global batch was split (processes x images per
process x accumulation steps). A resume may change where things are and how fast they run, and
may split the same global batch differently (another process count, with ``--grad-accum-steps``
making up the difference): the saved position is a count of samples, so it maps exactly. Any
other change is refused, naming what changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from finetune.errors import UserError
from finetune.training.state import Progress, read_progress

# Settings a resume may change: locations, speed, the device, what is logged, and how the same
# global batch is split. Any other setting (a new one too) must stay as the run started.
MAY_CHANGE = frozenset({"data", "output_dir", "resume", "save_every", "num_workers", "threads", "channels_last",
                        "cpu", "check_data", "bad_data", "batch_size", "grad_accum_steps", "log_with",
                        "log_every_steps", "log_every_seconds", "plots"})


@dataclass(frozen=True)
class RunSetup:
    """What a saved state may only be resumed under (``progress.json``'s ``setup``)."""

    settings: dict[str, Any]  # every setting outside MAY_CHANGE
    classes: list[str]
    files: str  # sha256 of the train and evaluation file listings (``listing_fingerprint``)
    processes: int
    batch_size: int  # images per process per step
    grad_accum_steps: int

    @property
    def global_batch(self) -> int:
        """Images per optimizer step, over all processes."""
        return self.processes * self.batch_size * self.grad_accum_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunSetup":
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls)})


def run_setup(config: Any, classes: Sequence[str], splits: Sequence[tuple[str, Any]], processes: int) -> RunSetup:
    """The setup of the run ``config`` describes.

    Args:
        config: the resolved ``TrainConfig``.
        classes: the class list, in label order.
        splits: ``(name, ImageFolder)`` of every split the run reads (train first).
        processes: the number of training processes.
    """
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in MAY_CHANGE}
    return RunSetup(settings, list(classes), listing_fingerprint(splits), processes, config.batch_size,
                    config.grad_accum_steps)


def listing_fingerprint(splits: Sequence[tuple[str, Any]]) -> str:
    """sha256 of each split's files (paths relative to the split's folder) and labels: the same
    data in a moved or copied folder has the same fingerprint."""
    digest = hashlib.sha256()
    for name, dataset in splits:
        for path, label in dataset.samples:
            digest.update(f"{name}\t{os.path.relpath(path, dataset.root)}\t{label}\n".encode())
    return digest.hexdigest()


def changes(saved: RunSetup, now: RunSetup) -> list[str]:
    """What differs between a saved setup and the current one, in words; empty if it may resume."""
    found = []
    for key in sorted(saved.settings.keys() | now.settings.keys()):
        before, after = saved.settings.get(key), now.settings.get(key)
        if before != after:
            found.append(f"--{key.replace('_', '-')} changed ({before} -> {after})")
    if saved.classes != now.classes:
        found.append(f"the classes changed ({len(saved.classes)}: {', '.join(saved.classes)[:80]} -> "
                     f"{len(now.classes)}: {', '.join(now.classes)[:80]})")
    elif saved.files != now.files:
        found.append("the data changed (images added, removed or moved between classes, or another dataset)")
    if saved.global_batch != now.global_batch:
        found.append(f"the global batch changed ({_split(saved)} -> {_split(now)}); keep processes x "
                     f"--batch-size x --grad-accum-steps at {saved.global_batch}")
    return found


def _split(setup: RunSetup) -> str:
    return (f"{setup.global_batch} = {setup.processes} process(es) x {setup.batch_size} x "
            f"{setup.grad_accum_steps} accumulation step(s)")


def check_resumable(saved: dict[str, Any] | None, now: RunSetup, state: Path) -> None:
    """Raise a UserError naming every change, if the state in ``state`` cannot continue under ``now``.

    Args:
        saved: the state's recorded setup.
    """
    try:
        before = RunSetup.from_dict(saved)
    except (KeyError, TypeError):
        raise UserError(f"{state}: its record of the run's setup is damaged; start afresh in another "
                        "--output-dir") from None
    found = changes(before, now)
    if found:
        run_dir = state.parent
        raise UserError(f"cannot resume the run in {run_dir}: {'; '.join(found)}. Resume with its settings "
                        f"(--config {run_dir / 'config.yaml'} --resume), or start afresh in another --output-dir")


def resumed_step(samples: int, now: RunSetup) -> int:
    """The batch index (per process) that continues after ``samples`` images of an epoch, under ``now``."""
    per_step = now.processes * now.batch_size
    if samples % per_step:  # cannot happen with the same global batch: saves fall between optimizer steps
        raise UserError(f"the saved position ({samples} images into the epoch) is not a whole number of "
                        f"steps of {per_step} images; resume with the run's --batch-size and process count")
    return samples // per_step


def resumed_progress(state: Path, now: RunSetup) -> Progress:
    """Where the run saved in ``state`` continues under ``now``: its progress, with the step mapped
    to the current split of the global batch.

    Raises:
        UserError: when the state is unreadable or cannot continue under ``now`` (naming what changed).
    """
    progress = read_progress(state)
    check_resumable(progress.setup, now, state)
    progress.step = resumed_step(progress.samples, now)
    progress.setup = now.to_dict()
    return progress
