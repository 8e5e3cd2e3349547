"""The epoch loop, read top to bottom in ``fit``; saving, stopping and the numerical checks are
the small named helpers below it.

Where to hook in: ``after_step`` runs after every batch and ``after_epoch`` after every
evaluation, both on every process (anything they do collectively, every process does at the
same step). Each takes the ``Session``, which holds the run's pieces and its ``Progress``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from finetune.data.loader import start_workers
from finetune.errors import Stopped, UserError
from finetune.models.build import describe_checkpoint
from finetune.models.checkpoint import save_checkpoint
from finetune.report.metrics import DEFAULT_THRESHOLD, choose_thresholds
from finetune.training.engine import (
    SYNC_EVERY_STEPS,
    EpochStats,
    MultiLabelPredictions,
    NonFiniteLossError,
    Predictions,
    evaluate,
    evaluate_multilabel,
)
from finetune.training.session import Session
from finetune.training.state import Progress, latest_state, save_training_state
from finetune.utils.files import atomic_link
from finetune.utils.runtime import rss_mib


def fit(session: Session) -> Progress:
    """Train from ``session.progress`` to the last epoch; return the final progress.

    Saves ``model.safetensors`` (and ``best.safetensors``, chosen on the validation split where
    there is one, else on the test split) after every epoch, a resumable state
    after every epoch and every ``--save-every`` optimizer steps, and stops cleanly on a stop
    signal (``session.stop``, installed by the caller since start-up).

    Raises:
        Stopped: after saving a state, when a stop signal arrived.
        UserError: when the loss or the weights became NaN or infinite, naming the step and the
            last good files.
    """
    config, progress, trainer, clock = session.config, session.progress, session.trainer, session.clock
    session.stop.defer()  # from here on a stop signal waits for a safe point
    clock.mark("fit_start")
    try:
        for epoch in range(progress.epoch, config.epochs):
            start_step = progress.step if epoch == progress.epoch else 0
            trainer.start_epoch(epoch, start_step, resumed_sums(session, start_step))
            session.log.steps.start_epoch(trainer.loss_sum, trainer.seen)
            session.report.start_epoch(epoch, config.epochs, session.steps_per_epoch, start_step)
            if session.batchnorm and start_step > session.batchnorm_from:  # resumed inside the window
                session.batchnorm.open(fresh=False)
            with clock("train"):
                for step, (images, targets) in enumerate(epoch_batches(session, epoch, start_step), start=start_step):
                    if "first_step" not in clock.marks:  # the first batch is here: the held-out loaders' workers start
                        start_held_out_workers(session)
                    clock.mark("first_step")
                    if session.batchnorm and step == session.batchnorm_from:
                        session.batchnorm.open(fresh=True)
                    trainer.train_step(step, images, targets)
                    after_step(session, epoch, step)
                stats = trainer.end_epoch()
                if session.batchnorm:
                    session.batchnorm.close(session.accelerator)
            with clock("test"):
                preds, val = evaluate_splits(session)
            name_skipped(session)
            with clock("logging"):
                after_epoch(session, epoch, stats, preds, val)
            with clock("saving"):
                check_weights(session, f"in epoch {epoch + 1}")
                save_checkpoints(session, epoch, stats, preds, val)
                save_state(session, epoch + 1, 0)
            if stop_agreed_at_epoch_end(session, epoch):  # a signal during evaluation or saving
                raise stopped(session, epoch + 1, 0)  # the state of the epoch's end is saved just above
    except NonFiniteLossError as err:
        raise non_finite_error(session, err) from None
    return progress


def start_held_out_workers(session: Session) -> None:
    """On a CPU, fork the held-out loaders' workers before the first optimizer step
    (``data.start_workers``): the gradients (and on a fresh start the optimizer state) do not exist
    yet, so the copy-on-write they cause later is mostly the weights'. After the training loader's
    first batch, which they would delay. On a GPU those live in its memory, and starting early
    would only hold the first batches, pinned, through the first epoch."""
    if session.accelerator.device.type != "cpu":
        return
    for loader in (session.test_loader, session.val_loader):
        if loader is not None:
            start_workers(loader)


def evaluate_splits(session: Session) -> tuple[Any, Any]:
    """The test split's predictions and the validation split's (None without one).

    Multi-label: each class's decision threshold is chosen on the validation split (to maximise
    its F1) and used for both; 0.5 without one."""
    run = evaluate_multilabel if session.multilabel else evaluate
    preds, val = (None if loader is None else run(session.accelerator, session.model, loader, len(session.classes),
                                                   to_input=session.to_input)
                  for loader in (session.test_loader, session.val_loader))
    if session.multilabel and val is not None:
        preds.thresholds = val.thresholds = choose_thresholds(val.targets, val.probabilities)
    return preds, val


def epoch_batches(session: Session, epoch: int, start_step: int) -> Any:
    """The training loader of ``epoch``, from batch ``start_step`` on."""
    full = session.train_loader
    loader = session.accelerator.skip_first_batches(full, start_step) if start_step else full
    # Through Accelerate's loader (it would reset our sampler to its own iteration count)
    # and directly (its skip wrapper does not pass the epoch on).
    loader.set_epoch(epoch)
    session.epoch_sampler.set_epoch(epoch)
    return loader


def resumed_sums(session: Session, start_step: int) -> list[float]:
    """The sums of a resumed epoch's earlier batches, added once (on the main process) to its figures."""
    sums = session.progress.epoch_sums if start_step and session.accelerator.is_main_process else None
    return sums or [0.0, 0.0, 0.0]


def after_step(session: Session, epoch: int, step: int) -> None:
    """After batch ``step`` of ``epoch``: the periodic checks and display, saves and stops.

    Reads from the device only every ``SYNC_EVERY_STEPS`` batches (and at the epoch's first).
    """
    optimizer_step = optimizer_step_done(session, epoch, step)
    last = step + 1 == session.steps_per_epoch
    logged_step = (epoch + 1) * session.optimizer_steps_per_epoch if last else optimizer_step
    if logged_step is not None:
        session.log.steps.end_step(logged_step, session.trainer.loss_sum, session.trainer.seen, session.optimizer)
    sync = (step + 1) % SYNC_EVERY_STEPS == 0 or step == session.trainer.start_step
    if sync:
        session.trainer.check_finite()
        session.log.steps.flush()
    # A bar at every sync; a plain line (a pipe, a SLURM log) every --log-every-seconds: no reads for nobody.
    if sync if session.report.live else session.report.due():
        session.report.update(step + 1, *session.trainer.running())
    if optimizer_step is None:
        return
    stopping = stop_agreed(session, optimizer_step)
    if stopping or (session.config.save_every and optimizer_step % session.config.save_every == 0):
        session.trainer.check_finite()  # no state of a run that has gone NaN (a host sync: only here)
        check_weights(session, f"in epoch {epoch + 1} by step {step + 1}")
        save_state(session, epoch, step + 1, session.trainer.epoch_sums())
    if stopping:
        raise stopped(session, epoch, step + 1)


def after_epoch(session: Session, epoch: int, stats: EpochStats, preds: Predictions | MultiLabelPredictions,
                val: Predictions | MultiLabelPredictions | None) -> None:
    """After ``epoch`` was trained and evaluated: its row of figures, shown and kept in the history.

    Multi-label: ``train_acc`` and ``test_acc`` are exact-match ratios; ``val_map`` and ``test_map``
    the mAP, ``test_f1`` the micro F1 (at the validation split's thresholds)."""
    if isinstance(preds, MultiLabelPredictions):
        figures = {**({"val_map": val.map} if val is not None else {}), "test_map": preds.map,
                   "test_f1": preds.scores["micro_f1"]}
    else:
        figures = {"val_acc": val.accuracy} if val is not None else {}
    row = {"epoch": epoch + 1, "train_loss": stats.loss, "train_acc": stats.accuracy, **figures,
           "test_acc": preds.accuracy, "test_loss": preds.mean_loss,
           session.lr_column: session.scheduler.get_last_lr()[0],
           "images_per_s": stats.images_per_s,
           "seconds": stats.seconds, "rss_mib": rss_mib()}
    session.report.end_epoch(row)
    session.progress.history.append(row)
    session.log.end_epoch((epoch + 1) * session.optimizer_steps_per_epoch, session.progress.history)


def name_skipped(session: Session) -> None:
    """Name the images that failed to decode since the last call (``--bad-data skip``): each
    process names its own, once."""
    skipped = session.skipped
    for _, why in (skipped.new() if skipped else []):
        message = f"warning: --bad-data skip: {why}"
        session.report.print(message) if session.accelerator.is_main_process else print(message, file=sys.stderr)


def optimizer_step_done(session: Session, epoch: int, step: int) -> int | None:
    """The run's count of optimizer steps after batch ``step``, where that batch ended an
    accumulation inside the epoch; else None. Saves and stops happen only there: Accelerate
    counts accumulation within each epoch, and the epoch's last batch is saved with its end."""
    accum = session.config.grad_accum_steps
    if (step + 1) % accum or step + 1 >= session.steps_per_epoch:
        return None
    return epoch * session.optimizer_steps_per_epoch + (step + 1) // accum


def stop_agreed(session: Session, optimizer_step: int) -> bool:
    """Whether the processes agree to stop now (asked every ``stop_check_every`` optimizer steps)."""
    return optimizer_step % session.stop_check_every == 0 and session.stop.agreed(session.accelerator)


def stop_agreed_at_epoch_end(session: Session, epoch: int) -> bool:
    """Whether the processes agree to stop after ``epoch`` (not after the last: the run is done)."""
    return epoch + 1 < session.config.epochs and session.stop.agreed(session.accelerator)


def stopped(session: Session, epoch: int, step: int) -> Stopped:
    """The exception that ends a run stopped by a signal, once its state is saved."""
    return Stopped(f"stopped by {session.stop.received or 'a signal to another process'} at epoch {epoch + 1}, "
                   f"step {step}; state saved in {session.run_dir / 'state'}; "
                   "continue with the same command and --resume")


def weights_finite(model: nn.Module) -> bool:
    """Whether every parameter is finite (one host sync: call it where a save happens anyway).

    A NaN or an infinity makes its tensor's sum non-finite: summing reads each weight once, where
    ``isfinite`` wrote a flag for each (25 ms against 2 ms for resnet18 on 2 cores). In fp32, so that
    half-precision sums cannot overflow.
    """
    return bool(torch.stack([p.detach().sum(dtype=torch.float32) for p in model.parameters()]).isfinite().all())


def check_weights(session: Session, where: str) -> None:
    """Raise a UserError if the weights are NaN or infinite (the last update may break weights
    whose loss was fine): nothing broken is saved."""
    if not weights_finite(session.model):
        raise UserError(f"the weights became NaN or infinite {where}; last good checkpoint: "
                        f"{latest_state(session.run_dir) or 'none yet'}; try a lower --lr")


def non_finite_error(session: Session, err: NonFiniteLossError) -> UserError:
    """A non-finite loss as the user sees it: the step, and the last good files."""
    last = [str(p) for p in (session.run_dir / "model.safetensors", latest_state(session.run_dir)) if p and p.exists()]
    return UserError(f"{err}; last good checkpoint: {' and '.join(last) or 'none yet'}; try a lower --lr")


def save_state(session: Session, epoch: int, step: int, epoch_sums: list[float] | None = None) -> None:
    """Save a resumable state that continues at batch ``step`` of ``epoch`` (on every process;
    check the loss and weights first)."""
    session.log.steps.flush()  # a resumed run hides the points after its state: write them before it
    progress = session.progress
    progress.epoch, progress.step, progress.epoch_sums = epoch, step, epoch_sums
    # The position as a count of images: a resume may split the same global batch differently.
    progress.samples = step * session.config.batch_size * session.accelerator.num_processes
    save_training_state(session.accelerator, session.run_dir, session.progress,
                        finished=epoch == session.config.epochs and step == 0)


def save_checkpoints(session: Session, epoch: int, stats: EpochStats, preds: Predictions | MultiLabelPredictions,
                     val: Predictions | MultiLabelPredictions | None) -> None:
    """``model.safetensors`` after ``epoch``, and ``best.safetensors`` when its accuracy (mAP for a
    multi-label run) is the best so far: on the validation split where there is one, else on the
    test split. A multi-label checkpoint also records ``task`` and its classes' ``thresholds``."""
    progress = session.progress
    chooser = val if val is not None else preds
    improved = chooser.score > progress.best_accuracy
    records = session.splits
    if session.accelerator.is_main_process:
        metrics = {"epoch": epoch + 1, "test_accuracy": preds.accuracy, "train_loss": stats.loss,
                   "num_test_samples": len(preds.targets)}
        if val is not None:
            metrics.update(val_accuracy=val.accuracy, num_val_samples=len(val.targets))
        if isinstance(preds, MultiLabelPredictions):
            metrics.update({f"test_{k}": v for k, v in preds.scores.items()})
            if val is not None:
                metrics["val_map"] = val.map
        meta = describe_checkpoint(session.config, session.clf, session.classes, metrics,
                                   precision=session.accelerator.mixed_precision)
        meta["splits"] = records  # eval.py without --data evaluates these files again
        meta["selected_on"] = session.selected_on
        if isinstance(preds, MultiLabelPredictions):
            meta["task"] = "multilabel"
            meta["thresholds"] = preds.thresholds or [DEFAULT_THRESHOLD] * len(session.classes)
        state_dict = session.clf.net.state_dict()  # the whole model, also when only its head trained
        save_checkpoint(session.run_dir / "model.safetensors", state_dict, meta)
        best = session.run_dir / "best.safetensors"
        # The same weights and metadata: a second name of the file just written, not a second write.
        if improved and not atomic_link(session.run_dir / "model.safetensors", best):
            save_checkpoint(best, state_dict, meta)
    if improved:
        progress.best_epoch = epoch + 1
    progress.best_accuracy = max(progress.best_accuracy, chooser.score)
