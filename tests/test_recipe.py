"""The data-aware defaults (finetune.training.recipe): each choice follows what the run can see, and a flag wins."""

from __future__ import annotations

from pathlib import Path

from finetune.config import TrainConfig
from finetune.training import recipe
from tests.conftest import write_image_folder


def facts(**overrides) -> recipe.DatasetFacts:
    base = dict(num_images=600, num_classes=10, short_side=28, image_size=64, epochs=3, steps_per_epoch=19)
    return recipe.DatasetFacts(**{**base, **overrides})


def chosen(f: recipe.DatasetFacts) -> dict:
    return {c.name: c.value for c in recipe.choose(f)}


def test_small_images_get_no_random_crop_and_photos_do():
    assert chosen(facts(short_side=28, image_size=64))["augment"] == "none"  # upscaled
    assert chosen(facts(short_side=28, image_size=32))["augment"] == "none"  # small, barely upscaled
    assert chosen(facts(short_side=100, image_size=224))["augment"] == "none"  # upscaled 2.2x
    assert chosen(facts(short_side=96, image_size=96))["augment"] == "mild"
    assert chosen(facts(short_side=375, image_size=224))["augment"] == "mild"


def test_a_linear_probe_trains_on_cached_features():
    assert chosen(facts(short_side=375, image_size=224, frozen_backbone=True))["augment"] == "none"


def test_warmup_is_a_tenth_of_an_epoch_whatever_the_budget():
    assert chosen(facts(epochs=3, steps_per_epoch=20))["warmup_epochs"] == 0.1
    assert chosen(facts(epochs=50, steps_per_epoch=2000))["warmup_epochs"] == 0.1


def test_resolve_fills_only_what_was_left_on_auto():
    config, made = recipe.resolve(TrainConfig(augment="classic"), facts())
    assert config.augment == "classic" and "augment" not in {c.name for c in made}
    assert config.warmup_epochs is not None and config.probe_epochs is not None
    assert all(c.why for c in made)


def test_median_short_side_reads_headers(tmp_path: Path):
    write_image_folder(tmp_path / "a", {"x": 3}, size=20)
    write_image_folder(tmp_path / "b", {"y": 2}, size=40)
    paths = sorted(str(p) for p in tmp_path.rglob("*.png"))
    assert recipe.median_short_side(paths) == 20
    assert recipe.median_short_side(paths + [str(tmp_path / "missing.png")]) == 20  # unreadable: skipped


def test_short_budgets_train_with_adamw_and_longer_ones_with_sgd():
    assert chosen(facts(epochs=1))["optimizer"] == "adamw"
    assert chosen(facts(epochs=3))["optimizer"] == "adamw"
    assert chosen(facts(epochs=5))["optimizer"] == "sgd"  # TrainConfig's default budget
    assert chosen(facts(epochs=10))["optimizer"] == "sgd"
    assert chosen(facts(epochs=3, frozen_backbone=True))["optimizer"] == "sgd"  # a linear probe


def test_the_learning_rate_follows_the_optimizer_unless_given():
    config, made = recipe.resolve(TrainConfig(), facts(epochs=3))
    assert (config.optimizer, config.lr) == ("adamw", 3e-4) and {"optimizer", "lr"} <= {c.name for c in made}
    config, made = recipe.resolve(TrainConfig(optimizer="sgd"), facts(epochs=3))  # the flag wins, its own rate
    assert (config.optimizer, config.lr) == ("sgd", 1e-3) and "optimizer" not in {c.name for c in made}
    config, made = recipe.resolve(TrainConfig(lr=0.05), facts(epochs=10))
    assert (config.optimizer, config.lr) == ("sgd", 0.05) and "lr" not in {c.name for c in made}


def test_adamw_moves_small_crops_further():
    """At 32 px AdamW at 1e-3 led the sweep; from 64 px up 3e-4 did. SGD keeps its rate."""
    assert recipe.resolve(TrainConfig(), facts(epochs=3, image_size=32))[0].lr == 1e-3
    assert recipe.resolve(TrainConfig(), facts(epochs=3, image_size=64))[0].lr == 3e-4
    config = recipe.resolve(TrainConfig(), facts(epochs=10, image_size=32))[0]
    assert (config.optimizer, config.lr) == ("sgd", 1e-3)
    assert recipe.resolve(TrainConfig(lr=2e-4), facts(epochs=3, image_size=32))[0].lr == 2e-4  # a flag wins
