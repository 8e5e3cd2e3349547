"""Training and evaluation steps: the only code that talks to the Accelerator about backward,
gradient accumulation and gathering results across processes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from accelerate import Accelerator
from torch import nn

from finetune.models.inference import forward_batches
from finetune.models.surgery import set_frozen_eval
from finetune.report.metrics import decisions, mean_average_precision, multilabel_scores

SYNC_EVERY_STEPS = 10  # read loss back from the device this often: every step would stall the pipeline
MAX_SKIPPED_STEPS = 50  # fp16 steps the loss scaler may skip in a row before the run stops


@dataclass
class EpochStats:
    loss: float  # mean over the whole epoch, also when it was resumed part-way
    accuracy: float
    images: int  # trained in this process's run of the epoch (for speed)
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


class NonFiniteLossError(RuntimeError):
    pass


def step_seed(seed: int, epoch: int, step: int, process_index: int) -> int:
    """The seed of the model's own randomness (dropout, stochastic depth) at one step.

    Re-seeding every step makes that randomness a function of the step alone, so a run resumed
    mid-epoch draws what an uninterrupted run drew, whatever the data loaders consumed meanwhile.
    Reduced below 2**63: ``torch.manual_seed`` refuses larger numbers.
    """
    return ((seed * 1_000_003 + epoch * 100_003 + step) * 1_009 + process_index) % 2**63


def single_label_hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Images of a batch whose top class is their class."""
    return (logits.argmax(dim=1) == targets).sum()


def multilabel_hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Images of a batch whose predicted label set (a logit over 0, i.e. a probability over 0.5) is exactly theirs."""
    return ((logits > 0) == (targets > 0.5)).all(dim=1).sum()


def earliest_bad_step(first_bad: torch.Tensor) -> int | None:
    """The earliest step at which any process met a non-finite loss, from each process's first
    (-1: none), or None. The earliest: after one process's NaN, DDP spreads NaN weights to all."""
    seen = first_bad[first_bad >= 0]
    return int(seen.min().item()) if seen.numel() else None


class Trainer:
    """The training step, and the running sums of the epoch it is in, kept on the device.

    Call ``start_epoch``, then ``train_step`` for every batch, then ``end_epoch``. Nothing here
    reads from the device unless asked (``check_finite``, ``epoch_sums``, ``running``,
    ``end_epoch``): each read is a host sync, which would stall a GPU's queue of work.

    Args:
        accelerator: the run's Accelerator (``model``, ``optimizer`` and ``scheduler`` prepared by it).
        loss_fn: maps ``(logits, targets)`` to the loss.
        seed: with the epoch, step and process, seeds the model's randomness (``step_seed``).
        to_input: turns a loader batch into the model's input (``data.ModelInput``).
        hits: counts a batch's correct images from ``(logits, targets)`` (the training accuracy):
            ``single_label_hits``, or ``multilabel_hits`` (exact matches).
    """

    def __init__(self, accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, loss_fn: nn.Module, *, seed: int = 0,
                 to_input: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
                 hits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = single_label_hits):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.loss_fn, self.seed, self.to_input, self.hits = loss_fn, seed, to_input, hits
        self.start_epoch(0)

    def start_epoch(self, epoch: int, start_step: int = 0, sums: Sequence[float] = (0.0, 0.0, 0.0)) -> None:
        """Put the model in training mode and start the epoch's sums.

        Args:
            start_step: index of the first batch this run of the epoch trains (a resume mid-epoch).
            sums: the epoch's loss sum, correct predictions and images before ``start_step``,
                over all processes (``epoch_sums`` saved before a resume; give them to one
                process only), so that the epoch's figures cover all of it.
        """
        self.model.train()
        set_frozen_eval(self.accelerator.unwrap_model(self.model))
        # Accelerate counts an accumulation's batches within the epoch (and a loaded state restores
        # the count it saved): a resume that splits the global batch differently continues at start_step.
        self.accelerator.step = start_step
        device = self.accelerator.device
        self.epoch, self.start_step = epoch, start_step
        self.loss_sum = torch.tensor(float(sums[0]), device=device)
        self.correct = torch.tensor(int(sums[1]), device=device, dtype=torch.long)
        # The first step whose loss was not finite, kept on the device: checking every step would
        # stall the pipeline on a host sync.
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.seen = self.seen_before = int(sums[2])
        self.skipped_in_a_row = 0
        self.started = time.perf_counter()

    def train_step(self, step: int, images: torch.Tensor, targets: torch.Tensor) -> bool:
        """Forward, backward and (at the end of an accumulation) the optimizer and scheduler step.

        Args:
            step: the batch's index within the epoch.

        Returns:
            Whether the optimizer stepped (the last batch of an accumulation, or of the epoch).

        Raises:
            NonFiniteLossError: when fp16 gradients overflowed too many steps in a row.
        """
        acc = self.accelerator
        images = self.to_input(images)
        torch.manual_seed(step_seed(self.seed, self.epoch, step, acc.process_index))
        with acc.accumulate(self.model):
            logits = self.model(images)
            loss = self.loss_fn(logits, targets)
            acc.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if acc.sync_gradients:
                self.scheduler.step()
        if acc.scaler is not None and acc.sync_gradients:  # fp16: the scaler skips overflowing steps
            self.skipped_in_a_row = self.skipped_in_a_row + 1 if self.optimizer.step_was_skipped else 0
            if self.skipped_in_a_row >= MAX_SKIPPED_STEPS:
                raise NonFiniteLossError(f"fp16 gradients overflowed {self.skipped_in_a_row} steps in a row (up to "
                                         f"step {step + 1} of epoch {self.epoch + 1}); use --mixed-precision bf16 or no")
        n = targets.shape[0]
        loss = loss.detach().float()
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step, self.first_bad)
        self.loss_sum += loss * n
        self.correct += self.hits(logits.detach(), targets)
        self.seen += n
        return acc.sync_gradients

    def check_finite(self) -> None:
        """Raise ``NonFiniteLossError`` naming the earliest step at which any process met a
        non-finite loss (a collective with several processes: all must call it at the same step)."""
        bad = self.first_bad[None]
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.gather(bad)
        step = earliest_bad_step(bad)
        if step is not None:
            raise NonFiniteLossError(f"the loss became NaN or infinite at step {step + 1} of epoch {self.epoch + 1}")

    def epoch_sums(self) -> list[float]:
        """The epoch's loss sum, correct predictions and images so far, over all processes (a collective)."""
        device = self.accelerator.device
        return self.accelerator.reduce(torch.stack([self.loss_sum.float(), self.correct.float(),
                                                    torch.tensor(float(self.seen), device=device)]),
                                       reduction="sum").tolist()

    def running(self) -> tuple[float, float, float]:
        """This process's mean loss, accuracy so far in the epoch, and images/s of this run of it."""
        return (self.loss_sum.item() / self.seen, self.correct.item() / self.seen,
                (self.seen - self.seen_before) / (time.perf_counter() - self.started))

    def end_epoch(self) -> EpochStats:
        """The epoch's figures over all processes (a collective).

        Raises:
            NonFiniteLossError: naming the step, when a loss of the epoch was NaN or infinite.
        """
        self.check_finite()
        totals = self.accelerator.reduce(
            torch.tensor([self.loss_sum.item(), self.correct.item(), self.seen, self.seen - self.seen_before],
                         device=self.accelerator.device, dtype=torch.float64), reduction="sum")
        loss_total, correct_total, seen_total, seen_now = totals.tolist()
        return EpochStats(loss_total / max(seen_total, 1), correct_total / max(seen_total, 1), int(seen_now),
                          time.perf_counter() - self.started)


@dataclass
class Predictions:
    """Every evaluated image exactly once, in dataset order."""

    indices: torch.Tensor  # dataset index of each image
    targets: torch.Tensor
    topk: torch.Tensor  # (N, k) class indices, best first
    confidence: torch.Tensor  # probability of the top class (softmax, or the ``probabilities`` given)
    loss: torch.Tensor  # cross-entropy of the true class, -log p(target), per image
    logits: torch.Tensor | None = None  # N x classes raw outputs, where asked for (``keep_logits``)

    @property
    def accuracy(self) -> float:
        return (self.topk[:, 0] == self.targets).float().mean().item() if len(self.targets) else 0.0

    @property
    def score(self) -> float:
        """What chooses best.safetensors: the accuracy."""
        return self.accuracy

    @property
    def mean_loss(self) -> float:
        return self.loss.mean().item() if len(self.targets) else 0.0


@torch.inference_mode()
def evaluate(accelerator: Accelerator, model: nn.Module, loader: Iterable, num_classes: int, *,
             to_input: Callable[[torch.Tensor], torch.Tensor] = lambda x: x, k: int = 5,
             probabilities: Callable[[torch.Tensor], torch.Tensor] | None = None,
             keep_logits: bool = False) -> Predictions:
    """Predictions for every image of ``loader``, gathered from all processes, each image once.

    Args:
        probabilities: logits to class probabilities (a ``LoadedClassifier``'s, calibrated); the softmax if None.
        keep_logits: also return the raw logits (for calibration figures).
    """
    k = min(k, num_classes)
    parts: dict[str, list[torch.Tensor]] = {"indices": [], "targets": [], "topk": [], "confidence": [], "loss": []}
    if keep_logits:
        parts["logits"] = []
    for logits, (targets, indices) in forward_batches(model, loader, to_input):
        probs = logits.softmax(dim=1) if probabilities is None else probabilities(logits)
        confidence, topk = probs.topk(k, dim=1)
        loss = nn.functional.cross_entropy(logits, targets, reduction="none")
        gathered = accelerator.gather_for_metrics((indices, targets, topk, confidence[:, 0], loss)
                                                  + ((logits,) if keep_logits else ()))
        for key, value in zip(parts, gathered):
            parts[key].append(value)  # kept on the device: one copy back at the end, not four a batch
    if not parts["indices"]:
        empty = torch.zeros(0, dtype=torch.long)
        return Predictions(empty, empty, torch.zeros(0, k, dtype=torch.long), torch.zeros(0), torch.zeros(0),
                           torch.zeros(0, num_classes) if keep_logits else None)
    result = {key: torch.cat(values).cpu() for key, values in parts.items()}
    kept = result["indices"] >= 0  # -1: an image that failed to decode under --bad-data skip
    result = {key: value[kept] for key, value in result.items()}
    order = result["indices"].argsort()
    return Predictions(**{key: value[order] for key, value in result.items()})


@dataclass
class MultiLabelPredictions:
    """Every evaluated image of a multi-label split exactly once, in dataset order.

    ``accuracy`` is the exact-match ratio and ``score`` (what chooses best.safetensors) the mAP;
    decisions use ``thresholds`` (None: 0.5 for every class).
    """

    indices: torch.Tensor  # dataset index of each image
    targets: torch.Tensor  # (N, C) multi-hot
    probabilities: torch.Tensor  # (N, C) sigmoid outputs
    loss: torch.Tensor  # binary cross-entropy per image, averaged over the classes
    thresholds: list[float] | None = None

    @property
    def map(self) -> float:
        return mean_average_precision(self.targets, self.probabilities) if len(self.targets) else 0.0

    @property
    def score(self) -> float:
        return self.map

    @property
    def scores(self) -> dict[str, float]:
        """mAP, micro and macro F1 and the exact-match ratio (``metrics.multilabel_scores``)."""
        return multilabel_scores(self.targets, self.probabilities, self.thresholds)

    @property
    def predicted(self) -> torch.Tensor:
        """(N, C) booleans: the classes each image is predicted to have."""
        return decisions(self.probabilities, self.thresholds)

    @property
    def accuracy(self) -> float:
        return float((self.predicted == (self.targets > 0.5)).all(dim=1).double().mean()) if len(self.targets) else 0.0

    @property
    def mean_loss(self) -> float:
        return self.loss.mean().item() if len(self.targets) else 0.0


@torch.inference_mode()
def evaluate_multilabel(accelerator: Accelerator, model: nn.Module, loader: Iterable, num_classes: int, *,
                        to_input: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> MultiLabelPredictions:
    """``evaluate`` for a multi-label model (sigmoid outputs, multi-hot targets): every image of
    ``loader`` once, gathered from all processes."""
    parts: dict[str, list[torch.Tensor]] = {"indices": [], "targets": [], "probabilities": [], "loss": []}
    for logits, (targets, indices) in forward_batches(model, loader, to_input):
        targets = targets.float()
        loss = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)
        gathered = accelerator.gather_for_metrics((indices, targets, logits.sigmoid(), loss))
        for key, value in zip(parts, gathered):
            parts[key].append(value)
    if not parts["indices"]:
        return MultiLabelPredictions(torch.zeros(0, dtype=torch.long), torch.zeros(0, num_classes),
                                     torch.zeros(0, num_classes), torch.zeros(0))
    result = {key: torch.cat(values).cpu() for key, values in parts.items()}
    kept = result["indices"] >= 0  # -1: an image that failed to decode under --bad-data skip
    result = {key: value[kept] for key, value in result.items()}
    order = result["indices"].argsort()
    return MultiLabelPredictions(**{key: value[order] for key, value in result.items()})


class PreciseBatchNorm:
    """Exact BatchNorm statistics, gathered by the training's own forward passes over the epoch's
    last batches: no second pass over the training set.

    A short fine-tune moves the features far in few steps, while BatchNorm's running averages
    (momentum 0.1) still hold much of ImageNet's statistics: evaluation then normalises with the
    wrong ones, and a small run can fall to chance accuracy although it trained well ("precise
    BN", Wu & Johnson 2021). Between ``open`` and ``close`` the trainable layers keep a cumulative
    (exact) average of the batches they see instead: the training images augmented as trained on,
    the population the network learnt to normalise. A separate pass over the same images after the
    epoch cost a fifth of a short run (issue 23); the epoch's last batches differ from it only by
    the few steps the weights move meanwhile (docs/defaults.md has the sweep). Frozen layers keep
    their pretrained statistics.

    Args:
        net: the unwrapped network (no DDP: each process's statistics are its own until averaged).
    """

    def __init__(self, net: nn.Module):
        self.layers = [m for m in net.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                       and any(p.requires_grad for p in m.parameters())]
        self.momenta = [m.momentum for m in self.layers]

    def open(self, *, fresh: bool) -> None:
        """From the next training batch on, average exactly; ``fresh``: forget what came before (a
        resumed run inside the window goes on with the averages its state saved)."""
        for m in self.layers:
            if fresh:
                m.reset_running_stats()
            m.momentum = None

    @torch.no_grad()
    def close(self, accelerator: Accelerator) -> None:
        """Back to the running averages; several processes average theirs."""
        for m, momentum in zip(self.layers, self.momenta):
            m.momentum = momentum
            if accelerator.num_processes > 1:
                m.running_mean.copy_(accelerator.reduce(m.running_mean, reduction="mean"))
                m.running_var.copy_(accelerator.reduce(m.running_var, reduction="mean"))
