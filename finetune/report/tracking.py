"""Experiment trackers (TensorBoard by default, or W&B, MLflow, Aim) through Accelerate's own API,
and the train-loss points the loop sends them without waiting on the device every step.

Logs go under ``RUN/logs/`` (TensorBoard: ``RUN/logs/finetune/``). Steps are optimizer steps
since the start of the run, so a resumed run continues the same curves: TensorBoard hides the
points a killed run wrote after its last saved state (``purge_step``) and the resumed run writes
them again.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import dataclasses
import io
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.tracking import filter_trackers, get_available_trackers
from PIL import Image

from finetune.data.loader import SeededDataset
from finetune.data.presets import EvalPreset
from finetune.errors import UserError
from finetune.report import painter, plots

PROJECT = "finetune"  # TensorBoard's sub-folder, W&B's project, MLflow's experiment
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "aim": "aim"}  # name: pip package
POINTS_PER_EPOCH = 50
PICTURE_SECONDS = 120  # a picture takes well under a second; past this its process is taken as stuck


def check_tracker(name: str) -> None:
    """Refuse, before any work, a ``--log-with`` tracker whose package is not installed
    (Accelerate would drop it with a warning only).

    Args:
        name: a key of ``TRACKERS`` or ``none``.
    """
    if name == "none":
        return
    if name not in {str(t) for t in get_available_trackers()}:
        raise UserError(f"--log-with {name} needs the '{TRACKERS[name]}' package: pip install {TRACKERS[name]} "
                        "(or --log-with none)")


def log_every_steps(requested: int, optimizer_steps_per_epoch: int) -> int:
    """Optimizer steps between train-loss points: ``requested``, or for 0 about
    ``POINTS_PER_EPOCH`` points an epoch (at least every step)."""
    return requested if requested > 0 else max(1, optimizer_steps_per_epoch // POINTS_PER_EPOCH)


def hyperparameters(config: Any) -> dict[str, Any]:
    """A dataclass configuration as the flat values trackers take: numbers, strings and booleans
    as they are, anything else (None, lists) as text."""
    def flat(value: Any) -> Any:
        if value is None:
            return "none"
        return value if isinstance(value, (bool, int, float, str)) else str(value)

    return {k: flat(v) for k, v in dataclasses.asdict(config).items()}


def start_trackers(accelerator: Accelerator, name: str, log_dir: Path, run_name: str,
                   hparams: dict[str, Any] | None = None, resume_step: int | None = None,
                   own_run: bool = False) -> None:
    """Start ``--log-with`` tracker ``name`` on the main process, writing under ``log_dir``.

    Args:
        accelerator: the run's Accelerator; its ``log`` then reaches the tracker.
        name: a key of ``TRACKERS`` or ``none``.
        log_dir: where local trackers write (``RUN/logs``).
        run_name: the run's name for trackers that show many runs (W&B, MLflow).
        hparams: logged as the run's hyperparameters (a fresh start; a resumed run logged them).
        resume_step: the optimizer step the run resumes after: TensorBoard hides the points a
            killed run wrote beyond it, which the resumed run writes again.
        own_run: TensorBoard's events in a folder of their own for each call,
            ``log_dir/finetune/RUN_NAME-DATE-TIME``: eval.py's runs into one output folder show
            apart, where in one folder each would write the same step 0 over the last.
    """
    if name == "none":
        return
    check_tracker(name)
    project, tracker_dir = PROJECT, log_dir
    if own_run and name == "tensorboard":  # TensorBoard writes in tracker_dir/project
        tracker_dir, project = log_dir / PROJECT, new_run_name(log_dir / PROJECT, run_name)
    # The run folder is known only once the Accelerator exists (the demo dataset is written
    # under it), so the logging directory and tracker are given to it here, before init_trackers.
    accelerator.project_configuration.logging_dir = str(tracker_dir)
    accelerator.log_with = filter_trackers([name], str(tracker_dir))
    init_kwargs: dict[str, dict[str, Any]] = {
        "tensorboard": {"purge_step": resume_step + 1} if resume_step is not None else {},
        "wandb": {"name": run_name, "dir": str(log_dir)},
        "mlflow": {"run_name": run_name},
    }
    if accelerator.is_main_process:
        log_dir.mkdir(parents=True, exist_ok=True)
    # Accelerate's TensorBoard tracker would write the hyperparameters as a run of their own
    # (logs/finetune/TIMESTAMP, with hparams.yml in a second folder): they go into the run itself.
    accelerator.init_trackers(project, config=None if name == "tensorboard" else hparams, init_kwargs=init_kwargs)
    if name == "tensorboard" and hparams and accelerator.is_main_process:
        log_hparams(accelerator.get_tracker("tensorboard"), hparams)


def new_run_name(folder: Path, prefix: str) -> str:
    """``PREFIX-YYYYMMDD-HHMMSS``, with ``-2``, ``-3``... if ``folder`` holds that name already."""
    stamp = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, n = stamp, 1
    while (folder / name).exists():
        n += 1
        name = f"{stamp}-{n}"
    return name


def log_hparams(tracker: Any, hparams: dict[str, Any]) -> None:
    """The run's hyperparameters in its own TensorBoard folder, for the HParams tab beside its
    epoch figures (its metrics); a text table where the writer takes no summaries (tensorboardX).

    Args:
        tracker: Accelerate's TensorBoard tracker, started.
        hparams: flat values (``hyperparameters``).
    """
    file_writer = getattr(tracker.writer, "file_writer", None)
    if file_writer is None:
        table = "\n".join(["| hyperparameter | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in hparams.items())])
        tracker.writer.add_text("hparams", table, global_step=0)
    else:
        from torch.utils.tensorboard.summary import hparams as hparams_summaries  # only with TensorBoard

        for summary in hparams_summaries(hparams, {tag: 0.0 for tag in EPOCH_TAGS.values()}):
            file_writer.add_summary(summary, 0)
    tracker.writer.flush()


def log_png(accelerator: Accelerator, tag: str, png: bytes, step: int) -> None:
    """Send a picture (PNG bytes) to TensorBoard's images tab, where TensorBoard is a tracker.

    The PNG goes into the event file as it is: an image summary holds PNG bytes, and the writer's
    ``add_images`` would take pixels and encode them again (70 ms for curves.png, each epoch).
    """
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name != "tensorboard":
            continue
        file_writer = getattr(tracker.writer, "file_writer", None)
        if file_writer is None:  # tensorboardX's writer (Accelerate's fallback): it takes pixels
            with Image.open(io.BytesIO(png)) as img:
                tracker.log_images({tag: np.asarray(img.convert("RGB"))[None]}, step=step, dataformats="NHWC")
            continue
        from tensorboard.compat.proto.summary_pb2 import Summary  # only with TensorBoard

        width, height = plots.png_size(png)
        image = Summary.Image(height=height, width=width, colorspace=plots.png_channels(png), encoded_image_string=png)
        file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
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

    Works from the loop's running sums, which stay on the device: ``end_step`` keeps a copy of
    the loss sum at each point, and ``flush`` reads every pending point back in one go and logs
    it. The loop calls ``flush`` where it reads values back anyway (every few steps, before a
    save, at the end of an epoch), so logging adds no host sync of its own per step. ``flush``
    is a collective: every process must call it at the same steps.

    Args:
        accelerator: the run's Accelerator (its trackers, processes and device).
        every: optimizer steps between points.
        enabled: whether the run logs (``--log-with`` is not ``none``): the same on every process.
    """

    def __init__(self, accelerator: Accelerator, every: int, enabled: bool = True):
        self.accelerator = accelerator
        self.every = every
        self.enabled = enabled
        self._pending: list[tuple[int, torch.Tensor, int, dict[str, float]]] = []
        self._base_sum: torch.Tensor | None = None
        self._base_seen = 0
        self._since = time.perf_counter()

    @property
    def active(self) -> bool:
        # Not accelerator.trackers: Accelerate starts them on the main process only, and every
        # process must reach flush's reduction at the same steps (else the run hangs).
        return self.enabled

    def start_epoch(self, loss_sum: torch.Tensor, seen: int) -> None:
        """At an epoch's start (or its resumption): the loop's running loss sum (a device scalar)
        and images so far; images/s counts from now."""
        if self.active:
            self._base_sum, self._base_seen, self._since = loss_sum.detach().clone(), seen, time.perf_counter()

    def end_step(self, step: int, loss_sum: torch.Tensor, seen: int, optimizer: torch.optim.Optimizer) -> None:
        """After optimizer step ``step`` (counted from the run's start), with the epoch's running
        loss sum and images: close a point when one is due. No read-back."""
        if not self.active or step % self.every or self._base_sum is None:
            return
        now = time.perf_counter()
        images = seen - self._base_seen
        values = {**learning_rates(optimizer),
                  "train/images_per_s": images * self.accelerator.num_processes / max(now - self._since, 1e-9)}
        loss_sum = loss_sum.detach().float()
        self._pending.append((step, loss_sum - self._base_sum, images, values))
        self._base_sum, self._base_seen, self._since = loss_sum.clone(), seen, now

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


EPOCH_TAGS = {"train_loss": "epoch/train_loss", "train_acc": "epoch/train_accuracy", "test_acc": "epoch/test_accuracy",
              "test_loss": "epoch/test_loss", "test_map": "epoch/test_map", "test_f1": "epoch/test_f1"}  # row key: tag


def model_view(loader_dataset: Any, train: Any, pre: Any) -> Callable[[int], torch.Tensor]:
    """Dataset index -> the image the model trains on: the first epoch's augmented image, drawn as
    the training loader draws it; the eval crop where the loader holds cached features.

    Args:
        loader_dataset: the training loader's dataset.
        train: the training ImageFolder.
        pre: the model's ``Preprocessing``.
    """
    if isinstance(loader_dataset, SeededDataset):
        return lambda i: loader_dataset[(0, i)][0]  # seeded per image: the training's own draws are untouched
    preset = EvalPreset(crop_size=pre.image_size, resize_size=pre.resize_size)
    return lambda i: preset(train.samples[i][0])


class RunLog:
    """What a training run logs and draws, for the loop's hooks: the tracker, the step points
    (``steps``), each epoch's figures, ``samples.png`` and ``curves.png``.

    Args:
        accelerator: the run's Accelerator.
        config: the run's ``TrainConfig`` (``log_with``, ``log_every_steps``, ``plots``,
            ``grad_accum_steps``; all of it is logged as hyperparameters on a fresh start).
        run_dir: the run folder (logs under ``run_dir/logs``, pictures in it).
        batches_per_epoch: training batches per process and epoch.
        resumed_from: the (epoch, batch step) of the state the run resumed from; None: a fresh start.
    """

    def __init__(self, accelerator: Accelerator, config: Any, run_dir: Path, batches_per_epoch: int,
                 resumed_from: tuple[int, int] | None = None):
        self.optimizer_steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum_steps)
        resumed_at = None
        if resumed_from is not None:
            epoch, step = resumed_from
            resumed_at = epoch * self.optimizer_steps_per_epoch + step // config.grad_accum_steps
        start_trackers(accelerator, config.log_with, run_dir / "logs", run_dir.name,
                       hparams=hyperparameters(config) if resumed_at is None else None, resume_step=resumed_at)
        self.steps = StepLog(accelerator, log_every_steps(config.log_every_steps, self.optimizer_steps_per_epoch),
                             enabled=config.log_with != "none")
        self.accelerator, self.run_dir = accelerator, run_dir
        self.draws = config.plots and accelerator.is_main_process
        self.fresh = resumed_from is None
        self.key = f"{os.getpid()}-{id(self)}"  # this run's curves figure in the painter
        # Pictures are drawn in the painter's process (``painter``), one at a time in order, while
        # training goes on; a thread here waits for each and sends it to the trackers: they held the
        # training thread for about 2 s of a 20 s run (issue 23), and as a thread here its GIL.
        self.sender = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pictures") if self.draws else None
        self.pending: list[concurrent.futures.Future] = []

    def draw_samples(self, train: Any, loader_dataset: Any, pre: Any, seed: int) -> None:
        """``samples.png`` (``plots.training_samples``, drawn by ``painter.draw_samples``) at a run's
        start (on a resume, only if missing).

        Args:
            train: the training ImageFolder.
            loader_dataset, pre: for ``model_view``.
            seed: which images are drawn.
        """
        path = self.run_dir / "samples.png"
        if self.draws and (self.fresh or not path.exists()):
            view = model_view(loader_dataset, train, pre)
            # The augmented views here, on the training thread: augmentation forks torch's global
            # generator, which the training draws from.
            self._picture("samples", painter.draw_samples, path,
                          *plots.training_samples(train.samples, train.classes, view, seed), step=0)

    def end_epoch(self, step: int, history: Sequence[dict[str, Any]]) -> None:
        """After an epoch's evaluation, at optimizer step ``step``: the pending points, the epoch's
        figures (the last ``history`` row), and ``curves.png`` redrawn. Before the epoch's state is
        saved, so that a resumed run has them exactly once."""
        self.steps.flush()
        row = history[-1]
        self.accelerator.log({tag: row[key] for key, tag in EPOCH_TAGS.items() if key in row}, step=step)
        if self.draws:
            self._picture("curves", painter.draw_curves, self.key, self.run_dir / "curves.png", list(history),
                          step=step)

    def finish(self) -> None:
        """Wait for the pictures still being drawn (before the trackers end; no more are drawn
        after); a picture that failed raises here (one whose process was killed, or hung, is a
        warning)."""
        pending, self.pending = self.pending, []
        if self.sender is not None:
            self.sender.shutdown(wait=True)
            painter.release(self.key)
        for future in pending:
            future.result()

    def _picture(self, name: str, draw: Callable[..., bytes], *args: Any, step: int) -> None:
        """``draw(*args)`` (a ``painter`` function that writes ``name``.png into the run folder and
        returns its bytes) in the painter's process, then the PNG to the trackers, in order."""
        drawn = painter.submit(draw, *args)  # here, not on the thread: the painter starts now

        def send() -> None:
            try:
                png = drawn.result(timeout=PICTURE_SECONDS)
            except concurrent.futures.process.BrokenProcessPool:  # killed from outside; the next starts anew
                print(f"warning: {name}.png was not drawn: the process drawing it ended", file=sys.stderr)
                return
            except TimeoutError:  # a painter that hangs does not hold the run's end
                print(f"warning: {name}.png was not drawn: its process did not answer in {PICTURE_SECONDS} s",
                      file=sys.stderr)
                return
            log_png(self.accelerator, name, png, step)

        self.pending = [f for f in self.pending if not f.done() or f.exception()]  # keep failures for finish
        self.pending.append(self.sender.submit(send))
