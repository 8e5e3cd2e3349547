"""Training and evaluation steps: the only code that talks to the Accelerator about backward,
gradient accumulation and gathering results across processes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from accelerate import Accelerator
from torch import nn

from finetune.surgery import set_frozen_norm_eval

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
    """
    return (seed * 1_000_003 + epoch * 100_003 + step) * 1_009 + process_index


def earliest_bad_step(first_bad: torch.Tensor) -> int | None:
    """The earliest step at which any process met a non-finite loss, from each process's first
    (-1: none), or None. The earliest: after one process's NaN, DDP spreads NaN weights to all."""
    seen = first_bad[first_bad >= 0]
    return int(seen.min().item()) if seen.numel() else None


def train_one_epoch(accelerator: Accelerator, model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loss_fn: nn.Module, *, seed: int = 0,
                    epoch: int = 0, start_step: int = 0,
                    to_input: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
                    on_step: Callable[[int, float, float, float], None] | None = None,
                    after_step: Callable[[int, Callable[[], None], Callable[[], list[float]]], None] | None = None,
                    sums: Sequence[float] = (0.0, 0.0, 0.0)) -> EpochStats:
    """One pass over ``loader`` (already skipped to ``start_step`` when resuming).

    Args:
        seed, epoch: with the step index and process, they seed the model's randomness (``step_seed``).
        start_step: index of the first batch ``loader`` yields within the epoch.
        to_input: turns a loader batch into the model's input (``data.ModelInput``).
        on_step: progress callback ``(steps_done, loss, accuracy, images_per_s)`` on sync steps.
        after_step: called after every batch with the step index, ``check_finite``, which raises
            if a loss so far was not finite (call it before saving anything), and ``epoch_sums``,
            the epoch's loss sum, correct predictions and images so far, over all processes (both
            are collectives: every process must call them at the same step).
        sums: ``epoch_sums`` saved before a resume mid-epoch (give them to one process only), so
            the epoch's figures cover all of it.

    Raises:
        NonFiniteLossError: naming the step, when the loss is NaN or infinite.
    """
    model.train()
    set_frozen_norm_eval(accelerator.unwrap_model(model))
    device = accelerator.device
    loss_sum = torch.tensor(float(sums[0]), device=device)
    correct = torch.tensor(int(sums[1]), device=device, dtype=torch.long)
    # The first step whose loss was not finite, kept on the device: checking every step would
    # stall the pipeline on a host sync.
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    seen, skipped_in_a_row = int(sums[2]), 0
    seen_before = seen
    start = time.perf_counter()

    def epoch_sums() -> list[float]:
        return accelerator.reduce(torch.stack([loss_sum.float(), correct.float(),
                                               torch.tensor(float(seen), device=device)]), reduction="sum").tolist()

    def check_finite() -> None:
        """Raise if any process met a non-finite loss (a collective with several processes)."""
        bad = first_bad[None]
        if accelerator.num_processes > 1:
            bad = accelerator.gather(bad)
        step = earliest_bad_step(bad)
        if step is not None:
            raise NonFiniteLossError(f"the loss became NaN or infinite at step {step + 1} of epoch {epoch + 1}")

    for step, (images, targets) in enumerate(loader, start=start_step):
        images = to_input(images)
        torch.manual_seed(step_seed(seed, epoch, step, accelerator.process_index))
        with accelerator.accumulate(model):
            logits = model(images)
            loss = loss_fn(logits, targets)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                scheduler.step()
        if accelerator.scaler is not None and accelerator.sync_gradients:  # fp16: the scaler skips overflowing steps
            skipped_in_a_row = skipped_in_a_row + 1 if optimizer.step_was_skipped else 0
            if skipped_in_a_row >= MAX_SKIPPED_STEPS:
                raise NonFiniteLossError(f"fp16 gradients overflowed {skipped_in_a_row} steps in a row (up to step "
                                         f"{step + 1} of epoch {epoch + 1}); use --mixed-precision bf16 or no")
        n = targets.shape[0]
        loss = loss.detach().float()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        loss_sum += loss * n
        correct += (logits.detach().argmax(dim=1) == targets).sum()
        seen += n
        if (step + 1) % SYNC_EVERY_STEPS == 0 or step == start_step:
            check_finite()
            if on_step is not None:
                on_step(step + 1, loss_sum.item() / seen, correct.item() / seen,
                        (seen - seen_before) / (time.perf_counter() - start))
        if after_step is not None:
            after_step(step, check_finite, epoch_sums)
    check_finite()
    totals = accelerator.reduce(torch.tensor([loss_sum.item(), correct.item(), seen, seen - seen_before],
                                             device=device, dtype=torch.float64), reduction="sum")
    loss_total, correct_total, seen_total, seen_now = totals.tolist()
    return EpochStats(loss_total / max(seen_total, 1), correct_total / max(seen_total, 1), int(seen_now),
                      time.perf_counter() - start)


@dataclass
class Predictions:
    """Every evaluated image exactly once, in dataset order."""

    indices: torch.Tensor  # dataset index of each image
    targets: torch.Tensor
    topk: torch.Tensor  # (N, k) class indices, best first
    confidence: torch.Tensor  # softmax probability of the top class
    loss: torch.Tensor  # cross-entropy of the true class, -log p(target), per image

    @property
    def accuracy(self) -> float:
        return (self.topk[:, 0] == self.targets).float().mean().item() if len(self.targets) else 0.0

    @property
    def mean_loss(self) -> float:
        return self.loss.mean().item() if len(self.targets) else 0.0


@torch.inference_mode()
def evaluate(accelerator: Accelerator, model: nn.Module, loader: Iterable, num_classes: int, *,
             to_input: Callable[[torch.Tensor], torch.Tensor] = lambda x: x, k: int = 5) -> Predictions:
    """Predictions for every image of ``loader``, gathered from all processes, each image once."""
    model.eval()
    k = min(k, num_classes)
    parts: dict[str, list[torch.Tensor]] = {"indices": [], "targets": [], "topk": [], "confidence": [], "loss": []}
    for images, targets, indices in loader:
        logits = model(to_input(images)).float()
        confidence, topk = logits.softmax(dim=1).topk(k, dim=1)
        loss = nn.functional.cross_entropy(logits, targets, reduction="none")
        gathered = accelerator.gather_for_metrics((indices, targets, topk, confidence[:, 0], loss))
        for key, value in zip(parts, gathered):
            parts[key].append(value)  # kept on the device: one copy back at the end, not four a batch
    if not parts["indices"]:
        empty = torch.zeros(0, dtype=torch.long)
        return Predictions(empty, empty, torch.zeros(0, k, dtype=torch.long), torch.zeros(0), torch.zeros(0))
    result = {key: torch.cat(values).cpu() for key, values in parts.items()}
    kept = result["indices"] >= 0  # -1: an image that failed to decode under --bad-data skip
    result = {key: value[kept] for key, value in result.items()}
    order = result["indices"].argsort()
    return Predictions(**{key: value[order] for key, value in result.items()})
