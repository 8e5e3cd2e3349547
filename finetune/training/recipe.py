"""The data-aware defaults: what a run can see before it starts -> the settings left on ``auto``.

Like BiT's HyperRule, one small rule, chosen from ``bench/sweep_defaults.py`` over many datasets,
image sizes and budgets (docs/defaults.md is that sweep's output), picks the
settings that no single value suits everywhere. A flag given by the user always wins.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

from finetune.data.images import oriented_size

SMALL_IMAGE = 64  # px: below this short side, training images get no random crops
SMALL_CROP = 64  # px: below this --image-size, AdamW's default rate is SMALL_CROP_ADAMW_LR
SHORT_BUDGET = 3  # epochs: up to this many, AdamW; beyond, SGD


@dataclass(frozen=True)
class DatasetFacts:
    """What a run knows before training: the training set and the budget."""

    num_images: int
    num_classes: int
    short_side: int  # median shorter side of the training images, in pixels (as stored)
    image_size: int  # the training crop (--image-size)
    epochs: int
    steps_per_epoch: int  # optimizer steps
    pretrained: bool = True
    frozen_backbone: bool = False  # --freeze backbone: a linear probe


def median_short_side(paths: Sequence[str], sample: int = 256, seed: int = 0) -> int:
    """The median shorter side of up to ``sample`` images (headers only), chosen at random but reproducibly."""
    chosen = list(paths) if len(paths) <= sample else random.Random(seed).sample(list(paths), sample)
    sides = []
    for path in chosen:
        try:
            sides.append(min(oriented_size(path)))
        except Exception:  # an unreadable image is the preflight's business, not the recipe's
            continue
    return int(statistics.median(sides)) if sides else 0


@dataclass(frozen=True)
class Choice:
    name: str  # the config field
    value: Any
    why: str


def choose(facts: DatasetFacts) -> list[Choice]:
    """The recipe's value for every setting that defaults to ``auto``, each with its reason.

    Args:
        facts: the training set and budget (``DatasetFacts``).
    """
    # Small images (stored under 64 px, or at half the crop or less) hold little detail: a random
    # crop of 8% of one is a few blurred source pixels. In the sweep (3 seeds), no augmentation
    # beat flips and crops on clothes and digits at 32-64 px (digits are not mirror images: a flip
    # cost 0.15 at 3 epochs); images with detail to spare (textures, photos) gained from mild crops.
    small = facts.short_side < SMALL_IMAGE or facts.short_side * 2 <= facts.image_size
    augment = Choice("augment", "none" if small else "mild",
                     f"training images are small ({facts.short_side} px for a {facts.image_size} px crop)"
                     if small else f"training images ({facts.short_side} px) have detail to spare for "
                                   f"{facts.image_size} px crops")
    if facts.frozen_backbone:
        augment = Choice("augment", "none", "a linear probe trains fastest on cached features")
    # A tenth of an epoch (it rounds to no step on sets of under 5 batches): in the sweep neither
    # no warmup nor a one-epoch warmup did better on average, and a one-epoch warmup cost up to
    # 0.37 of test accuracy on 3-epoch runs of small sets, where it is a third of the run.
    warmup = Choice("warmup_epochs", 0.1, "a tenth of an epoch: short runs cannot spare more")
    probe = Choice("probe_epochs", 0.0, "the head trains with the backbone from the start")
    # Short budgets favour AdamW's per-parameter steps, long ones SGD (Wilson et al., 2017, on
    # adaptive methods): in the sweep AdamW at 3e-4 led on 1- and 3-epoch runs (faces 0.95-0.98
    # against 0.70-0.94), but fell below SGD at 0.001, and even the chapter's recipe, on
    # 10-epoch runs; the earlier optimizer sweep at 5 epochs chose SGD.
    short = facts.epochs <= SHORT_BUDGET
    optimizer = Choice("optimizer", "adamw" if short else "sgd",
                       f"{facts.epochs} epoch(s): {'a short' if short else 'a longer'} budget")
    if facts.frozen_backbone:  # measured on fine-tuning only; a 3-epoch probe of the demo fell to 0.80 with AdamW
        optimizer = Choice("optimizer", "sgd", "a linear probe: its head alone moves further with SGD")
    return [augment, warmup, probe, optimizer]


# Each optimizer's learning rate where --lr is not given: the best of each in the sweeps.
LEARNING_RATES = {"adamw": 3e-4, "sgd": 1e-3}
SMALL_CROP_ADAMW_LR = 1e-3


def learning_rate(optimizer: str, facts: DatasetFacts) -> Choice:
    """The backbone's learning rate for ``optimizer`` (``--lr`` left on auto), with its reason.

    Args:
        optimizer: ``adamw`` or ``sgd``.
        facts: the training set and budget.
    """
    # At crops under 64 px an ImageNet network's deepest maps are 1x1 or 2x2: its features must
    # move further from the pretrained ones. In the sweep (3 seeds) AdamW at 1e-3 led at 32 px
    # (digits 0.851 against 0.771 at 3e-4; clothes 0.815 against 0.787) and trailed from 64 px up
    # (faces at 64 px 0.944 against 0.978; photos at 224 px 0.947 against 0.994).
    if optimizer == "adamw" and facts.image_size < SMALL_CROP:
        return Choice("lr", SMALL_CROP_ADAMW_LR, f"adamw's rate for crops under {SMALL_CROP} px")
    return Choice("lr", LEARNING_RATES[optimizer], f"{optimizer}'s rate")


def facts_of(config: Any, samples: Sequence[tuple[str, int]], num_classes: int, num_processes: int) -> DatasetFacts:
    """The ``DatasetFacts`` of a run: ``config`` (a ``TrainConfig``), its training samples (path, label)."""
    batches = math.ceil(len(samples) / (config.batch_size * num_processes))
    return DatasetFacts(
        num_images=len(samples), num_classes=num_classes,
        short_side=median_short_side([path for path, _ in samples], seed=config.seed),
        image_size=config.image_size, epochs=config.epochs,
        steps_per_epoch=math.ceil(batches / config.grad_accum_steps),
        pretrained=config.weights.lower() != "none", frozen_backbone=config.freeze == "backbone")


def resolve(config: Any, facts: DatasetFacts) -> tuple[Any, list[Choice]]:
    """``config`` with its ``auto`` (None or ``"auto"``) fields filled by ``choose``; the choices made."""
    made = [c for c in choose(facts) if getattr(config, c.name) in (None, "auto")]
    config = dataclasses.replace(config, **{c.name: c.value for c in made})
    if config.lr is None:  # after the optimizer: --optimizer sgd alone gets SGD's rate
        made.append(learning_rate(config.optimizer, facts))
        config = dataclasses.replace(config, lr=made[-1].value)
    return config, made
