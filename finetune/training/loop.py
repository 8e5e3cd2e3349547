"""The epoch loop, read top to bottom in ``fit``; saving, stopping and the numerical checks are
the small named helpers below it.

Where to hook in: ``after_step`` runs after every batch and ``after_epoch`` after every
evaluation, both on every process (anything they do collectively, every process does at the
same step). Each takes the ``Loop``, which holds the run's pieces and its ``Progress``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from finetune.models.checkpoint import describe_checkpoint, save_checkpoint
from finetune.config import TrainConfig
from finetune.training.engine import (SYNC_EVERY_STEPS, EpochStats, NonFiniteLossError, Predictions, Trainer, evaluate,
                             recalibrate_batchnorm)
from finetune.errors import Stopped, UserError
from finetune.models.build import Classifier, recorded_arch_kwargs
from finetune.utils.preemption import StopSignal
from finetune.report.console import Reporter
from finetune.utils.runtime import rss_mib
from finetune.training.session import Session
from finetune.report.tracking import RunLog
from finetune.training.state import Progress, latest_state, save_training_state


@dataclass
class Loop:
    """A run in progress: its prepared pieces, where it stands, and how often it checks for a stop."""

    session: Session
    config: TrainConfig
    clf: Classifier
    classes: list[str]
    run_dir: Path
    report: Reporter
    progress: Progress
    trainer: Trainer
    stop: StopSignal
    steps_per_epoch: int  # batches per process
    optimizer_steps_per_epoch: int
    stop_check_every: int  # optimizer steps between agreeing on a stop across processes
    lr_column: str  # the epoch table's learning rate: the first group's (lr_backbone, or lr_head alone)
    log: RunLog  # the tracker's points and figures, the pictures

    @property
    def accelerator(self) -> Accelerator:
        return self.session.accelerator


def fit(session: Session, config: TrainConfig, clf: Classifier, classes: list[str], run_dir: Path,
        report: Reporter, progress: Progress, log: RunLog, stop: StopSignal | None = None) -> Progress:
    """Train from ``progress`` to the last epoch; return the final progress.

    Saves ``model.safetensors`` (and ``best.safetensors``, chosen on the validation split where
    there is one, else on the test split) after every epoch, a resumable state
    after every epoch and every ``--save-every`` optimizer steps, and stops cleanly on a stop
    signal (``stop``, installed by the caller since start-up; None: installed here for the loop).

    Raises:
        Stopped: after saving a state, when a stop signal arrived.
        UserError: when the loss or the weights became NaN or infinite, naming the step and the
            last good files.
    """
    own_stop = stop is None
    loop = start_loop(session, config, clf, classes, run_dir, report, progress, log, stop or StopSignal())
    try:
        for epoch in range(progress.epoch, config.epochs):
            start_step = progress.step if epoch == progress.epoch else 0
            loop.trainer.start_epoch(epoch, start_step, resumed_sums(loop, start_step))
            log.steps.start_epoch(loop.trainer.loss_sum, loop.trainer.seen)
            report.start_epoch(epoch, config.epochs, loop.steps_per_epoch, start_step)
            for step, (images, targets) in enumerate(epoch_batches(loop, epoch, start_step), start=start_step):
                loop.trainer.train_step(step, images, targets)
                after_step(loop, epoch, step)
            stats = loop.trainer.end_epoch()
            recalibrate(loop)
            preds = evaluate(loop.accelerator, session.model, session.test_loader, len(classes),
                             to_input=session.to_input)
            val = None if session.val_loader is None else evaluate(
                loop.accelerator, session.model, session.val_loader, len(classes), to_input=session.to_input)
            name_skipped(loop)
            after_epoch(loop, epoch, stats, preds, val)
            check_weights(loop, f"in epoch {epoch + 1}")
            save_checkpoints(loop, epoch, stats, preds, val)
            save_state(loop, epoch + 1, 0)
            if stop_agreed_at_epoch_end(loop, epoch):  # a signal during evaluation or saving
                raise stopped(loop, epoch + 1, 0)  # the state of the epoch's end is saved just above
    except NonFiniteLossError as err:
        raise non_finite_error(loop, err) from None
    finally:
        if own_stop:
            loop.stop.restore()
    return progress


def recalibrate(loop: Loop) -> None:
    """Fresh BatchNorm statistics for the evaluation and the checkpoint (``--recalibrate-bn-batches``)."""
    s = loop.session
    if s.calibration_loader is not None:
        s.calibration_loader.set_epoch(0)  # Accelerate counts its passes: a resumed run's count starts afresh
        recalibrate_batchnorm(loop.accelerator, s.model, s.calibration_loader,
                              max_batches=loop.config.recalibrate_bn_batches, to_input=s.to_input)


def start_loop(session: Session, config: TrainConfig, clf: Classifier, classes: list[str], run_dir: Path,
               report: Reporter, progress: Progress, log: RunLog, stop: StopSignal) -> Loop:
    """The ``Loop`` of a run about to train; from here on a stop signal waits for a safe point."""
    acc = session.accelerator
    steps_per_epoch = len(session.train_loader)
    weight = session.class_weights.to(acc.device) if session.class_weights is not None else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    trainer = Trainer(acc, session.model, session.optimizer, session.scheduler, loss_fn, seed=config.seed,
                      to_input=session.to_input)
    # Agreeing on a stop across processes reads a flag back from the device: a host sync, which
    # on a GPU would stall the queue of work every step, so there it happens every few steps.
    stop_check_every = 1 if acc.device.type == "cpu" or acc.num_processes == 1 else SYNC_EVERY_STEPS
    stop.defer()
    return Loop(session, config, clf, classes, run_dir, report, progress, trainer, stop,
                steps_per_epoch, math.ceil(steps_per_epoch / config.grad_accum_steps), stop_check_every,
                "lr_" + str(session.optimizer.param_groups[0].get("name", "")).removesuffix("_no_decay"), log)


def epoch_batches(loop: Loop, epoch: int, start_step: int) -> Any:
    """The training loader of ``epoch``, from batch ``start_step`` on."""
    s = loop.session
    loader = loop.accelerator.skip_first_batches(s.train_loader, start_step) if start_step else s.train_loader
    # Through Accelerate's loader (it would reset our sampler to its own iteration count)
    # and directly (its skip wrapper does not pass the epoch on).
    loader.set_epoch(epoch)
    s.epoch_sampler.set_epoch(epoch)
    return loader


def resumed_sums(loop: Loop, start_step: int) -> list[float]:
    """The sums of a resumed epoch's earlier batches, added once (on the main process) to its figures."""
    sums = loop.progress.epoch_sums if start_step and loop.accelerator.is_main_process else None
    return sums or [0.0, 0.0, 0.0]


def after_step(loop: Loop, epoch: int, step: int) -> None:
    """After batch ``step`` of ``epoch``: the periodic checks and display, saves and stops.

    Reads from the device only every ``SYNC_EVERY_STEPS`` batches (and at the epoch's first).
    """
    optimizer_step = optimizer_step_done(loop, epoch, step)
    logged_step = (epoch + 1) * loop.optimizer_steps_per_epoch if step + 1 == loop.steps_per_epoch else optimizer_step
    if logged_step is not None:
        loop.log.steps.end_step(logged_step, loop.trainer.loss_sum, loop.trainer.seen, loop.session.optimizer)
    sync = (step + 1) % SYNC_EVERY_STEPS == 0 or step == loop.trainer.start_step
    if sync:
        loop.trainer.check_finite()
        loop.log.steps.flush()
    # A bar at every sync; a plain line (a pipe, a SLURM log) every --log-every-seconds: no reads for nobody.
    if sync if loop.report.live else loop.report.due():
        loop.report.update(step + 1, *loop.trainer.running())
    if optimizer_step is None:
        return
    stopping = stop_agreed(loop, optimizer_step)
    if stopping or (loop.config.save_every and optimizer_step % loop.config.save_every == 0):
        loop.trainer.check_finite()  # no state of a run that has gone NaN (a host sync: only here)
        check_weights(loop, f"in epoch {epoch + 1} by step {step + 1}")
        save_state(loop, epoch, step + 1, loop.trainer.epoch_sums())
    if stopping:
        raise stopped(loop, epoch, step + 1)


def after_epoch(loop: Loop, epoch: int, stats: EpochStats, preds: Predictions, val: Predictions | None) -> None:
    """After ``epoch`` was trained and evaluated: its row of figures, shown and kept in the history."""
    row = {"epoch": epoch + 1, "train_loss": stats.loss, "train_acc": stats.accuracy,
           **({"val_acc": val.accuracy} if val is not None else {}),
           "test_acc": preds.accuracy, "test_loss": preds.mean_loss, loop.lr_column: loop.session.scheduler.get_last_lr()[0],
           "images_per_s": stats.images_per_s,
           "seconds": stats.seconds, "rss_mib": rss_mib()}
    loop.report.end_epoch(row)
    loop.progress.history.append(row)
    loop.log.end_epoch((epoch + 1) * loop.optimizer_steps_per_epoch, loop.progress.history)


def name_skipped(loop: Loop) -> None:
    """Name the images that failed to decode since the last call (``--bad-data skip``): each
    process names its own, once."""
    skipped = loop.session.skipped
    for _, why in (skipped.new() if skipped else []):
        message = f"warning: --bad-data skip: {why}"
        loop.report.print(message) if loop.accelerator.is_main_process else print(message, file=sys.stderr)


def optimizer_step_done(loop: Loop, epoch: int, step: int) -> int | None:
    """The run's count of optimizer steps after batch ``step``, where that batch ended an
    accumulation inside the epoch; else None. Saves and stops happen only there: Accelerate
    counts accumulation within each epoch, and the epoch's last batch is saved with its end."""
    accum = loop.config.grad_accum_steps
    if (step + 1) % accum or step + 1 >= loop.steps_per_epoch:
        return None
    return epoch * loop.optimizer_steps_per_epoch + (step + 1) // accum


def stop_agreed(loop: Loop, optimizer_step: int) -> bool:
    """Whether the processes agree to stop now (asked every ``stop_check_every`` optimizer steps)."""
    return optimizer_step % loop.stop_check_every == 0 and loop.stop.agreed(loop.accelerator)


def stop_agreed_at_epoch_end(loop: Loop, epoch: int) -> bool:
    """Whether the processes agree to stop after ``epoch`` (not after the last: the run is done)."""
    return epoch + 1 < loop.config.epochs and loop.stop.agreed(loop.accelerator)


def stopped(loop: Loop, epoch: int, step: int) -> Stopped:
    """The exception that ends a run stopped by a signal, once its state is saved."""
    return Stopped(f"stopped by {loop.stop.received or 'a signal to another process'} at epoch {epoch + 1}, "
                   f"step {step}; state saved in {loop.run_dir / 'state'}; "
                   "continue with the same command and --resume")


def weights_finite(model: nn.Module) -> bool:
    """Whether every parameter is finite (one host sync: call it where a save happens anyway)."""
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


def check_weights(loop: Loop, where: str) -> None:
    """Raise a UserError if the weights are NaN or infinite (the last update may break weights
    whose loss was fine): nothing broken is saved."""
    if not weights_finite(loop.session.model):
        raise UserError(f"the weights became NaN or infinite {where}; last good checkpoint: "
                        f"{latest_state(loop.run_dir) or 'none yet'}; try a lower --lr")


def non_finite_error(loop: Loop, err: NonFiniteLossError) -> UserError:
    """A non-finite loss as the user sees it: the step, and the last good files."""
    last = [str(p) for p in (loop.run_dir / "model.safetensors", latest_state(loop.run_dir)) if p and p.exists()]
    return UserError(f"{err}; last good checkpoint: {' and '.join(last) or 'none yet'}; try a lower --lr")


def save_state(loop: Loop, epoch: int, step: int, epoch_sums: list[float] | None = None) -> None:
    """Save a resumable state that continues at batch ``step`` of ``epoch`` (on every process;
    check the loss and weights first)."""
    loop.log.steps.flush()  # a resumed run hides the points after its state: write them before it
    progress = loop.progress
    progress.epoch, progress.step, progress.epoch_sums = epoch, step, epoch_sums
    # The position as a count of images: a resume may split the same global batch differently.
    progress.samples = step * loop.config.batch_size * loop.accelerator.num_processes
    save_training_state(loop.accelerator, loop.run_dir, loop.progress)


def save_checkpoints(loop: Loop, epoch: int, stats: EpochStats, preds: Predictions, val: Predictions | None) -> None:
    """``model.safetensors`` after ``epoch``, and ``best.safetensors`` when its accuracy is the best so far:
    on the validation split where there is one, else on the test split."""
    progress = loop.progress
    chooser = val if val is not None else preds
    records = loop.session.splits
    if loop.accelerator.is_main_process:
        metrics = {"epoch": epoch + 1, "test_accuracy": preds.accuracy, "train_loss": stats.loss,
                   "num_test_samples": len(preds.targets)}
        if val is not None:
            metrics.update(val_accuracy=val.accuracy, num_val_samples=len(val.targets))
        meta = describe_checkpoint(loop.config, loop.clf, loop.classes, metrics, recorded_arch_kwargs(loop.clf.net),
                                   precision=loop.accelerator.mixed_precision)
        meta["splits"] = records  # eval.py without --data evaluates these files again
        meta["selected_on"] = records.get("val" if val is not None else "test", {}).get("name")
        state_dict = loop.clf.net.state_dict()  # the whole model, also when only its head trained
        save_checkpoint(loop.run_dir / "model.safetensors", state_dict, meta)
        if chooser.accuracy > progress.best_accuracy:
            save_checkpoint(loop.run_dir / "best.safetensors", state_dict, meta)
    if chooser.accuracy > progress.best_accuracy:
        progress.best_epoch = epoch + 1
    progress.best_accuracy = max(progress.best_accuracy, chooser.accuracy)
