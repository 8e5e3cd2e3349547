"""Experiment trackers (TensorBoard by default, or W&B, MLflow, Aim) through Accelerate's own API,
and the train-loss points the loop sends them without waiting on the device every step.

Logs go under ``RUN/logs/`` (TensorBoard: ``RUN/logs/finetune/``). Steps are optimizer steps
since the start of the run, so a resumed run continues the same curves: TensorBoard hides the
points a killed run wrote after its last saved state (``purge_step``) and the resumed run writes
them again.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from finetune.errors import UserError

PROJECT = "finetune"  # TensorBoard's sub-folder, W&B's project, MLflow's experiment
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "aim": "aim"}  # name: pip package
POINTS_PER_EPOCH = 50


def check_tracker(name: str) -> None:
    """Refuse, before any work, a ``--log-with`` tracker whose package is not installed
    (Accelerate would drop it with a warning only).

    Args:
        name: a key of ``TRACKERS`` or ``none``.
    """
    if name == "none":
        return
    from accelerate.tracking import get_available_trackers

    if name not in {str(t) for t in get_available_trackers()}:
        raise UserError(f"--log-with {name} needs the '{TRACKERS[name]}' package: pip install {TRACKERS[name]} "
                        "(or --log-with none)")


def log_every_steps(requested: int, optimizer_steps_per_epoch: int) -> int:
    """Optimizer steps between train-loss points: ``requested``, or for 0 about
    ``POINTS_PER_EPOCH`` points an epoch (at least every step)."""
    return requested if requested > 0 else max(1, optimizer_steps_per_epoch // POINTS_PER_EPOCH)


def hyperparameters(config: Any) -> dict[str, Any]:
    """A dataclass configuration as the flat values trackers take (None as ``"none"``)."""
    return {k: "none" if v is None else v for k, v in dataclasses.asdict(config).items()}


def start_trackers(accelerator: Accelerator, name: str, log_dir: Path, run_name: str,
                   hparams: dict[str, Any] | None = None, resume_step: int | None = None) -> None:
    """Start ``--log-with`` tracker ``name`` on the main process, writing under ``log_dir``.

    Args:
        accelerator: the run's Accelerator; its ``log`` then reaches the tracker.
        name: a key of ``TRACKERS`` or ``none``.
        log_dir: where local trackers write (``RUN/logs``).
        run_name: the run's name for trackers that show many runs (W&B, MLflow).
        hparams: logged as the run's hyperparameters (a fresh start; a resumed run logged them).
        resume_step: the optimizer step the run resumes after: TensorBoard hides the points a
            killed run wrote beyond it, which the resumed run writes again.
    """
    if name == "none":
        return
    check_tracker(name)
    from accelerate.tracking import filter_trackers

    # The run folder is known only once the Accelerator exists (the demo dataset is written
    # under it), so the logging directory and tracker are given to it here, before init_trackers.
    accelerator.project_configuration.logging_dir = str(log_dir)
    accelerator.log_with = filter_trackers([name], str(log_dir))
    init_kwargs: dict[str, dict[str, Any]] = {
        "tensorboard": {"purge_step": resume_step + 1} if resume_step is not None else {},
        "wandb": {"name": run_name, "dir": str(log_dir)},
        "mlflow": {"run_name": run_name},
    }
    if accelerator.is_main_process:
        log_dir.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers(PROJECT, config=hparams, init_kwargs=init_kwargs)


def log_png(accelerator: Accelerator, tag: str, image: np.ndarray, step: int) -> None:
    """Send a picture (an RGB uint8 array) to TensorBoard's images tab, where TensorBoard is a tracker."""
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: image[None]}, step=step, dataformats="NHWC")
            tracker.writer.flush()


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``lr/PART`` for each part of the model (backbone, head) from the optimizer's named groups."""
    rates: dict[str, float] = {}
    for i, group in enumerate(optimizer.param_groups):
        part = str(group.get("name", f"group{i}")).removesuffix("_no_decay")
        rates.setdefault(f"lr/{part}", float(group["lr"]))
    return rates


class StepLog:
    """Train loss, learning rates and images/s every ``every`` optimizer steps.

    The loss stays on the device: ``add`` sums it there each batch and ``end_step`` closes a
    window at each point; ``flush`` reads every pending point back in one go and logs it. The
    loop calls ``flush`` where it reads values back anyway (every few steps, before a save and
    at the end of an epoch), so logging adds no host sync of its own per step. ``flush`` is a
    collective: every process must call it at the same steps.

    Args:
        accelerator: the run's Accelerator (its trackers, processes and device).
        every: optimizer steps between points.
    """

    def __init__(self, accelerator: Accelerator, every: int):
        self.accelerator = accelerator
        self.every = every
        self._loss_sum = torch.zeros((), device=accelerator.device)
        self._window_images = 0
        self._pending: list[tuple[int, torch.Tensor, int, dict[str, float]]] = []
        self._images = 0
        self._since = time.perf_counter()

    @property
    def active(self) -> bool:
        return bool(self.accelerator.trackers)  # the same on every process: init_trackers lists them on all

    def restart_clock(self) -> None:
        """Images/s counts from now (an epoch's start: evaluation and saving are not training)."""
        self._images, self._since = 0, time.perf_counter()

    def add(self, loss: torch.Tensor, images: int) -> None:
        """One batch's mean loss (a device scalar) over ``images`` images; no read-back."""
        if self.active:
            self._loss_sum += loss.detach().float() * images  # a Python number: no copy to the device
            self._window_images += images
            self._images += images

    def end_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """After optimizer step ``step`` (counted from the run's start): close a point when due."""
        if not self.active or step % self.every:
            return
        now = time.perf_counter()
        speed = self._images * self.accelerator.num_processes / max(now - self._since, 1e-9)
        values = {**learning_rates(optimizer), "train/images_per_s": speed}
        self._pending.append((step, self._loss_sum.clone(), self._window_images, values))
        self._loss_sum.zero_()
        self._window_images = 0
        self._images, self._since = 0, now

    def flush(self) -> None:
        """Log the pending points: one reduction over processes and one read-back."""
        if not self._pending:
            return
        sums = torch.stack([loss for _, loss, _, _ in self._pending])
        images = torch.tensor([n for _, _, n, _ in self._pending], dtype=sums.dtype, device=sums.device)
        totals = self.accelerator.reduce(torch.stack([sums, images]), reduction="sum").tolist()
        for (step, _, _, values), loss_sum, seen in zip(self._pending, *totals):
            self.accelerator.log({"train/loss": loss_sum / max(seen, 1), **values}, step=step)
        self._pending.clear()
