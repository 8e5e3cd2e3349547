"""What a training run holds, in one object built once by ``prepare_session``: the model and its
optimizer, schedule and loss (in the ``Trainer``), the loaders, where the run stands, and where it
reports. The epoch loop that uses it is ``loop.fit``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from torch import nn

from finetune.config import TrainConfig
from finetune.data.folders import Splits
from finetune.data.loader import SkippedImages, make_eval_loader, make_train_loader
from finetune.data.presets import ModelInput
from finetune.models.build import Classifier
from finetune.report.console import Reporter
from finetune.report.tracking import RunLog
from finetune.training.engine import (
    SYNC_EVERY_STEPS,
    PreciseBatchNorm,
    Trainer,
    multilabel_hits,
    single_label_hits,
)
from finetune.training.features import cached_loaders, probe_module
from finetune.training.optim import build_optimizer, build_scheduler, param_groups
from finetune.training.sanity import trains_batch_norm
from finetune.training.state import Progress
from finetune.utils.phases import PhaseClock
from finetune.utils.preemption import StopSignal
from finetune.utils.runtime import num_workers


@dataclass(kw_only=True)
class Session:
    """Everything a run holds while it trains."""

    config: TrainConfig
    accelerator: Accelerator
    clf: Classifier  # the classifier as built (unwrapped): what the checkpoints save
    classes: list[str]
    run_dir: Path
    trainer: Trainer  # the prepared model (the classifier, or only its head on cached features), optimizer,
    # scheduler and loss
    train_loader: Any
    test_loader: Any
    val_loader: Any  # None without a validation split: then the test split chooses best.safetensors
    batchnorm: PreciseBatchNorm | None  # the trainable BatchNorm layers' exact averages (--recalibrate-bn-batches)
    epoch_sampler: Any  # the sampler behind train_loader (Accelerate's skip wrapper hides it)
    to_input: Callable[[torch.Tensor], torch.Tensor]
    cached_features: int | None  # features per image when the head trains on cached features
    skipped: SkippedImages | None  # images that failed to decode, under --bad-data skip
    splits: dict[str, Any]  # the checkpoint's records of the held-out splits (folders.describe_split)
    selected_on: str  # the split that chooses best.safetensors, as the checkpoint names it
    progress: Progress  # where the run stands: saved with every state
    report: Reporter
    log: RunLog  # the tracker's points and figures, the pictures
    stop: StopSignal
    multilabel: bool = False  # sigmoid outputs and binary cross-entropy; evaluated by engine.evaluate_multilabel
    clock: PhaseClock = field(default_factory=PhaseClock)  # where the wall clock goes (timings.json)

    @property
    def model(self) -> nn.Module:
        return self.trainer.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.trainer.optimizer

    @property
    def scheduler(self) -> Any:
        return self.trainer.scheduler

    @property
    def steps_per_epoch(self) -> int:
        """Training batches per process and epoch."""
        return len(self.train_loader)

    @property
    def batchnorm_from(self) -> int:
        """The epoch's first batch whose statistics BatchNorm averages (``batchnorm_window``)."""
        return self.steps_per_epoch - batchnorm_window(self.steps_per_epoch, self.config.recalibrate_bn_batches)

    @property
    def optimizer_steps_per_epoch(self) -> int:
        return math.ceil(self.steps_per_epoch / self.config.grad_accum_steps)

    @property
    def stop_check_every(self) -> int:
        """Optimizer steps between agreeing on a stop across processes.

        Agreeing reads a flag back from the device: a host sync, which on a GPU would stall the
        queue of work every step, so there it happens every few steps."""
        one = self.accelerator.device.type == "cpu" or self.accelerator.num_processes == 1
        return 1 if one else SYNC_EVERY_STEPS

    @property
    def lr_column(self) -> str:
        """The epoch table's learning rate: the first group's (the backbone's, or the head's alone)."""
        return "lr_" + str(self.optimizer.param_groups[0].get("name", "")).removesuffix("_no_decay")


def inverse_frequency_weights(targets: list[int], num_classes: int) -> torch.Tensor:
    """Per-class loss weights ``N / (classes x images of the class)``: every class weighs as much
    in the loss as in a balanced training set (scikit-learn's "balanced")."""
    counts = torch.bincount(torch.tensor(targets, dtype=torch.long), minlength=num_classes).double()
    return (len(targets) / (num_classes * counts.clamp(min=1))).float()


def positive_weights(targets: list[tuple[int, ...]], num_classes: int) -> torch.Tensor:
    """Per-class weights of a multi-label set's positives, ``negatives / positives`` (BCE's ``pos_weight``):
    a rare class's few positives weigh as much in the loss as its many negatives (1 for a class
    without positives)."""
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for target in targets:
        counts[list(target)] += 1
    return torch.where(counts > 0, (len(targets) - counts) / counts.clamp(min=1), torch.ones_like(counts)).float()


class SmoothedBCEWithLogits(nn.Module):
    """Binary cross-entropy on logits, with label smoothing as for two classes each: targets of 1
    become ``1 - s/2`` and of 0 ``s/2``.

    Args:
        smoothing: ``--label-smoothing``.
        pos_weight: see ``positive_weights`` (None: every positive weighs 1).
    """

    def __init__(self, smoothing: float = 0.0, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.smoothing = smoothing
        self.bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.float()
        if self.smoothing:
            targets = targets * (1 - self.smoothing) + self.smoothing / 2
        return self.bce(logits, targets)


def build_loss(config: TrainConfig, splits: Splits, device: torch.device) -> nn.Module:
    """The training loss: cross-entropy over the classes, or, for a multi-label run, binary
    cross-entropy per class; ``--class-weights auto`` and ``--label-smoothing`` for either."""
    if splits.task == "multilabel":
        weights = positive_weights(splits.train.targets, len(splits.classes)) if config.class_weights == "auto" else None
        return SmoothedBCEWithLogits(config.label_smoothing, None if weights is None else weights.to(device))
    weights = inverse_frequency_weights(splits.train.targets, len(splits.classes)).to(device) \
        if config.class_weights == "auto" else None
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)


def batchnorm_window(steps: int, most: int) -> int:
    """How many of an epoch's ``steps`` batches BatchNorm's statistics are averaged over: its last
    ``most`` (``--recalibrate-bn-batches``), or all of a shorter epoch.

    The weights move while the statistics are gathered. Only the last quarter of a short epoch (at
    least 128 images) helped a single epoch at a high learning rate but cost the defaults 0.007 of
    mean test accuracy over the sweep, so the default takes all of it (docs/defaults.md)."""
    return min(steps, most)


def prepare_session(*, config: TrainConfig, accelerator: Accelerator, clf: Classifier, splits: Splits,
                    run_dir: Path, progress: Progress, report: Reporter, stop: StopSignal,
                    clock: PhaseClock | None = None) -> Session:
    """Optimizer, loaders, schedule and loss for ``clf``, prepared by Accelerate, and the run's log.

    With the backbone frozen and no random augmentation, the backbone's features are computed
    once and only the head trains (``features``).

    Args:
        progress: where the run starts (a resume's, or a fresh one).
    """
    if config.channels_last:
        clf.net = clf.net.to(memory_format=torch.channels_last)
    head_mult = config.lr_head_mult if clf.weights.pretrained else 1.0  # from scratch: one learning rate
    groups = param_groups(clf.net, clf.head, config.lr, head_mult, config.weight_decay, config.decay_norm_and_bias)
    optimizer = build_optimizer(config.optimizer, groups, config.lr, config.momentum, device=accelerator.device,
                                mixed_precision=accelerator.mixed_precision)
    workers = num_workers(config.num_workers, on_gpu=accelerator.device.type == "cuda")
    to_input = ModelInput(clf.preprocessing.mean, clf.preprocessing.std, config.channels_last)
    skipped = SkippedImages() if config.bad_data == "skip" else None
    probe = None
    if config.freeze == "backbone" and config.augment == "none" and config.cache_features:
        blank = torch.zeros(1, 3, config.image_size, config.image_size, dtype=torch.uint8)
        probe = probe_module(clf.net, clf.head, to_input(blank))
    held_out = [splits.test] + ([splits.val] if splits.val is not None else [])
    if probe is not None:
        train_loader, eval_loaders = cached_loaders(
            accelerator, clf.net, clf.head, splits.train, held_out, clf.preprocessing, to_input,
            batch_size=config.batch_size, seed=config.seed, num_workers=workers)
        trainable, to_input = probe, (lambda features: features)
    else:
        trainable = clf.net
        pin = accelerator.device.type == "cuda"
        # BatchNorm cannot train on a batch of one: an epoch that would end on one leaves that image out.
        global_batch = config.batch_size * accelerator.num_processes if trains_batch_norm(clf.net) else 0
        train_loader = make_train_loader(splits.train, clf.preprocessing, batch_size=config.batch_size,
                                         seed=config.seed, num_workers=workers,
                                         augment=config.augment, hflip=config.hflip, pin_memory=pin,
                                         global_batch=global_batch, skipped=skipped)
        eval_loaders = [make_eval_loader(part, clf.preprocessing, batch_size=config.batch_size,
                                         num_workers=workers, pin_memory=pin, skipped=skipped) for part in held_out]
    epoch_sampler = train_loader.sampler
    model, optimizer, train_loader, *eval_loaders = accelerator.prepare(trainable, optimizer, train_loader,
                                                                       *eval_loaders)
    test_loader, val_loader = eval_loaders[0], (eval_loaders[1] if len(eval_loaders) > 1 else None)
    # Exact BatchNorm statistics over each epoch's last batches (none to keep on cached features).
    batchnorm = PreciseBatchNorm(accelerator.unwrap_model(model)) \
        if probe is None and config.recalibrate_bn_batches > 0 else None
    optimizer_steps = math.ceil(len(train_loader) / config.grad_accum_steps)  # len: batches per process
    scheduler = accelerator.prepare(build_scheduler(
        optimizer, round(config.warmup_epochs * optimizer_steps), config.epochs * optimizer_steps,
        probe_steps=round(config.probe_epochs * optimizer_steps), schedule=config.schedule))
    features = train_loader.dataset.features.shape[1] if probe is not None else None
    multilabel = splits.task == "multilabel"
    trainer = Trainer(accelerator, model, optimizer, scheduler, build_loss(config, splits, accelerator.device),
                      seed=config.seed, to_input=to_input, hits=multilabel_hits if multilabel else single_label_hits)
    log = RunLog(accelerator, config, run_dir, len(train_loader),
                 (progress.epoch, progress.step) if progress.epoch or progress.step else None)
    return Session(config=config, accelerator=accelerator, clf=clf, classes=splits.classes, run_dir=run_dir,
                   trainer=trainer, train_loader=train_loader, test_loader=test_loader, val_loader=val_loader,
                   batchnorm=batchnorm, epoch_sampler=epoch_sampler, to_input=to_input,
                   cached_features=features, skipped=skipped, splits=splits.records,
                   selected_on=splits.selected_on, progress=progress,
                   report=report, log=log, stop=stop, multilabel=multilabel, clock=clock or PhaseClock())
