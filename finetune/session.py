"""A training run once its pieces exist: what trains on which loaders, and the epoch loop with
its checkpoints, resumable states, stop signals and numerical checks."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from torch import nn

from finetune.checkpoint import describe_checkpoint, save_checkpoint
from finetune.config import TrainConfig
from finetune.data import SkippedImages, Splits, make_eval_loader, make_train_loader
from finetune.engine import SYNC_EVERY_STEPS, NonFiniteLossError, evaluate, train_one_epoch
from finetune.errors import Stopped, UserError
from finetune.evalsplit import describe_split
from finetune.features import cached_loaders, probe_module
from finetune.models import Classifier, recorded_arch_kwargs
from finetune.optim import build_optimizer, build_scheduler, param_groups
from finetune.preemption import StopSignal
from finetune.presets import ModelInput
from finetune.reporting import Reporter
from finetune.runtime import num_workers, rss_mib
from finetune.sanity import trains_batch_norm
from finetune.state import latest_state, save_training_state


@dataclass
class Session:
    """The prepared pieces of a run."""

    accelerator: Accelerator
    model: nn.Module  # what trains (Accelerate-wrapped): the classifier, or only its head on cached features
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: Any
    test_loader: Any
    epoch_sampler: Any  # the sampler behind train_loader (Accelerate's skip wrapper hides it)
    to_input: Callable[[torch.Tensor], torch.Tensor]
    cached_features: int | None  # features per image when the head trains on cached features
    class_weights: torch.Tensor | None = None  # the loss's per-class weights (--class-weights auto)
    skipped: SkippedImages | None = None  # images that failed to decode, under --bad-data skip
    splits: dict[str, Any] = field(default_factory=dict)  # the checkpoint's record of the test split (evalsplit)


def inverse_frequency_weights(targets: list[int], num_classes: int) -> torch.Tensor:
    """Per-class loss weights ``N / (classes x images of the class)``: every class weighs as much
    in the loss as in a balanced training set (scikit-learn's "balanced")."""
    counts = torch.bincount(torch.tensor(targets, dtype=torch.long), minlength=num_classes).double()
    return (len(targets) / (num_classes * counts.clamp(min=1))).float()


def prepare_session(config: TrainConfig, accelerator: Accelerator, clf: Classifier, splits: Splits) -> Session:
    """Optimizer, loaders and schedule for ``clf``, prepared by Accelerate.

    With the backbone frozen and no random augmentation, the backbone's features are computed
    once and only the head trains (``features``).
    """
    if config.channels_last:
        clf.net = clf.net.to(memory_format=torch.channels_last)
    head_mult = config.lr_head_mult if clf.weights.pretrained else 1.0  # from scratch: one learning rate
    groups = param_groups(clf.net, clf.head, config.lr, head_mult, config.weight_decay, config.decay_norm_and_bias)
    optimizer = build_optimizer(config.optimizer, groups, config.lr, config.momentum)
    workers = num_workers(config.num_workers, on_gpu=accelerator.device.type == "cuda")
    to_input = ModelInput(clf.preprocessing.mean, clf.preprocessing.std, config.channels_last)
    skipped = SkippedImages() if config.bad_data == "skip" else None
    probe = None
    if config.freeze == "backbone" and config.augment == "none" and config.cache_features:
        blank = torch.zeros(1, 3, config.image_size, config.image_size, dtype=torch.uint8)
        probe = probe_module(clf.net, clf.head, to_input(blank))
    if probe is not None:
        train_loader, test_loader = cached_loaders(
            accelerator, clf.net, clf.head, splits.train, splits.test, clf.preprocessing, to_input,
            batch_size=config.batch_size, seed=config.seed, num_workers=workers)
        trainable, to_input = probe, (lambda features: features)
    else:
        trainable = clf.net
        pin = accelerator.device.type == "cuda"
        # BatchNorm cannot train on a batch of one: an epoch that would end on one leaves that image out.
        global_batch = config.batch_size * accelerator.num_processes if trains_batch_norm(clf.net) else 0
        train_loader = make_train_loader(splits.train, clf.preprocessing, batch_size=config.batch_size,
                                         seed=config.seed, num_workers=workers,
                                         augment=config.augment == "classic", pin_memory=pin,
                                         global_batch=global_batch, skipped=skipped)
        test_loader = make_eval_loader(splits.test, clf.preprocessing, batch_size=config.batch_size,
                                       num_workers=workers, pin_memory=pin, skipped=skipped)
    epoch_sampler = train_loader.sampler
    model, optimizer, train_loader, test_loader = accelerator.prepare(trainable, optimizer, train_loader, test_loader)
    optimizer_steps = math.ceil(len(train_loader) / config.grad_accum_steps)  # len: batches per process
    scheduler = accelerator.prepare(build_scheduler(optimizer, round(config.warmup_epochs * optimizer_steps),
                                                    config.epochs * optimizer_steps))
    features = train_loader.dataset.features.shape[1] if probe is not None else None
    weights = inverse_frequency_weights(splits.train.targets, len(splits.classes)) \
        if config.class_weights == "auto" else None
    return Session(accelerator, model, optimizer, scheduler, train_loader, test_loader, epoch_sampler, to_input,
                   features, weights, skipped, {"test": describe_split(splits.test, "test")})


def weights_finite(model: nn.Module) -> bool:
    """Whether every parameter is finite (one host sync: call it where a save happens anyway)."""
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


def fit(session: Session, config: TrainConfig, clf: Classifier, classes: list[str], run_dir: Path,
        report: Reporter, progress: dict[str, Any]) -> dict[str, Any]:
    """Train from ``progress`` (epoch, step, history) to the last epoch; return the final progress.

    Saves ``model.safetensors`` (and ``best.safetensors``) after every epoch, a resumable state
    after every epoch and every ``--save-every`` steps, and stops cleanly on SIGTERM/SIGUSR1.

    Raises:
        Stopped: after saving a state, when a stop signal arrived.
        UserError: when the loss became NaN or infinite, naming the step and the last good files.
    """
    acc, s = session.accelerator, session
    steps_per_epoch = len(s.train_loader)
    weight = s.class_weights.to(acc.device) if s.class_weights is not None else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    # The rate the epoch table shows: the first group's (the backbone's, or the head's when only it trains).
    lr_column = "lr " + str(s.optimizer.param_groups[0].get("name", "")).removesuffix("_no_decay")

    def name_skipped() -> None:
        for _, why in (s.skipped.new() if s.skipped else []):  # each process names what it skipped, once
            message = f"warning: --bad-data skip: {why}"
            report.print(message) if acc.is_main_process else print(message, file=sys.stderr)
    stop = StopSignal()

    optimizer_steps_per_epoch = math.ceil(steps_per_epoch / config.grad_accum_steps)

    def save_state(epoch: int, step: int, epoch_sums: Callable[[], list[float]] | None = None) -> None:
        if not weights_finite(s.model):  # the last update may have broken weights whose loss was fine
            raise UserError(f"the weights became NaN or infinite in epoch {epoch + 1} before step {step + 1}; "
                            f"last good checkpoint: {latest_state(run_dir) or 'none yet'}; try a lower --lr")
        sums = epoch_sums() if epoch_sums else None  # a resumed epoch still reports all of its batches
        save_training_state(acc, run_dir, {**progress, "epoch": epoch, "step": step, "epoch_sums": sums})

    def stopped(epoch: int, step: int) -> Stopped:
        return Stopped(f"stopped by {stop.received or 'a signal to another process'} at epoch {epoch + 1}, "
                       f"step {step}; state saved in {run_dir / 'state'}; "
                       "continue with the same command and --resume")

    # Agreeing on a stop across processes reads a flag back from the device: a host sync, which
    # on a GPU would stall the queue of work every step, so there it happens every few steps.
    stop_check_every = 1 if acc.device.type == "cpu" or acc.num_processes == 1 else SYNC_EVERY_STEPS

    def after_step(epoch: int, step: int, check_finite: Callable[[], None],
                   epoch_sums: Callable[[], list[float]]) -> None:
        # Only between optimizer steps: Accelerate counts accumulation within each epoch.
        if (step + 1) % config.grad_accum_steps or step + 1 >= steps_per_epoch:
            return
        optimizer_step = epoch * optimizer_steps_per_epoch + (step + 1) // config.grad_accum_steps
        stopping = optimizer_step % stop_check_every == 0 and stop.agreed(acc)
        if stopping or (config.save_every and optimizer_step % config.save_every == 0):
            check_finite()  # before any save: no state of a run that has gone NaN (a host sync: only here)
            save_state(epoch, step + 1, epoch_sums)
        if stopping:
            raise stopped(epoch, step + 1)

    try:
        for epoch in range(progress["epoch"], config.epochs):
            start_step = progress["step"] if epoch == progress["epoch"] else 0
            # The resumed epoch's sums so far, added once (on the main process) to the final reduction.
            sums = progress.get("epoch_sums") if start_step and acc.is_main_process else None
            loader = acc.skip_first_batches(s.train_loader, start_step) if start_step else s.train_loader
            # Through Accelerate's loader (it would reset our sampler to its own iteration count)
            # and directly (its skip wrapper does not pass the epoch on).
            loader.set_epoch(epoch)
            s.epoch_sampler.set_epoch(epoch)
            report.start_epoch(epoch, config.epochs, steps_per_epoch, start_step)
            try:
                stats = train_one_epoch(
                    acc, s.model, loader, s.optimizer, s.scheduler, loss_fn, seed=config.seed, epoch=epoch,
                    start_step=start_step, to_input=s.to_input,
                    on_step=report.update if report.live else None,  # no reads for a bar nobody sees
                    after_step=lambda step, check, sums_now: after_step(epoch, step, check, sums_now),
                    sums=sums or (0.0, 0.0, 0.0))
            except NonFiniteLossError as err:
                last = [str(p) for p in (run_dir / "model.safetensors", latest_state(run_dir)) if p and p.exists()]
                raise UserError(f"{err}; last good checkpoint: {' and '.join(last) or 'none yet'}; "
                                "try a lower --lr") from None
            preds = evaluate(acc, s.model, s.test_loader, len(classes), to_input=s.to_input)
            name_skipped()
            row = {"epoch": epoch + 1, "train_loss": stats.loss, "train_acc": stats.accuracy,
                   "test_acc": preds.accuracy, lr_column: s.scheduler.get_last_lr()[0], "img/s": stats.images_per_s,
                   "seconds": stats.seconds, "rss_mib": rss_mib()}
            report.end_epoch(row)
            progress["history"].append(row)
            if not weights_finite(s.model):
                raise UserError(f"the weights became NaN or infinite in epoch {epoch + 1}; last good checkpoint: "
                                f"{latest_state(run_dir) or 'none yet'}; try a lower --lr")
            if acc.is_main_process:
                metrics = {"epoch": epoch + 1, "test_accuracy": preds.accuracy, "train_loss": stats.loss,
                           "num_test_samples": len(preds.targets)}
                meta = describe_checkpoint(config, clf, classes, metrics, recorded_arch_kwargs(clf.net),
                                           precision=acc.mixed_precision)
                meta["splits"] = session.splits  # eval.py without --data evaluates these files again
                state_dict = clf.net.state_dict()  # the whole model, also when only its head trained
                save_checkpoint(run_dir / "model.safetensors", state_dict, meta)
                if preds.accuracy > progress["best_accuracy"]:
                    save_checkpoint(run_dir / "best.safetensors", state_dict, meta)
            progress["best_accuracy"] = max(progress["best_accuracy"], preds.accuracy)
            save_state(epoch + 1, 0)
            if epoch + 1 < config.epochs and stop.agreed(acc):  # a signal during evaluation or saving
                raise stopped(epoch + 1, 0)  # the state of the epoch's end is saved just above
    finally:
        stop.restore()
    return progress
