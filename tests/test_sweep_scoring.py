"""The default sweep's multi-label scoring (bench/sweep_defaults.py): test mAP from a trained model on
every row of a label file, with targets in the model's class order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench import sweep_defaults as sweep
from finetune.data.labelfiles import eval_split
from finetune.data.loader import make_eval_loader
from finetune.data.shapes import SHAPE_KINDS, shapes


class Constant(torch.nn.Module):
    """A model that gives every image the same score for every class (no ranking information)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(x), self.num_classes)


class Oracle(torch.nn.Module):
    """A model that scores each image by its true labels, looked up by the image's mean pixel (each
    generated image is a distinct noisy picture)."""

    def __init__(self, keys: torch.Tensor, targets: torch.Tensor):
        super().__init__()
        self.keys, self.targets = keys, targets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        means = x.float().mean(dim=(1, 2, 3))
        nearest = (means[:, None] - self.keys[None, :]).abs().argmin(dim=1)
        return self.targets[nearest] * 20 - 10  # logits: sigmoid near 1 for a label, near 0 without


def test_test_map_scores_the_label_file_rows(tmp_path: Path):
    file = shapes(tmp_path, n=12, size=32, seed=3)
    classes = sorted(SHAPE_KINDS)
    rows = [line.split(",")[1].split(";") for line in file.read_text().splitlines()[1:]]
    # All scores tied: each class's AP is its share of the images (precision at the one threshold).
    prevalence = [sum(c in labels for labels in rows) / len(rows) for c in classes]
    expected = sum(p for p in prevalence if p > 0) / sum(p > 0 for p in prevalence)
    assert sweep.test_map(Constant(len(classes)), file, classes, 32) == pytest.approx(expected)
    assert expected < 0.9  # so that the check below tells a right ranking from a constant one


def test_test_map_is_one_for_a_perfect_ranking(tmp_path: Path):
    file = shapes(tmp_path, n=12, size=32, seed=3)
    classes = sorted(SHAPE_KINDS)
    pre, to_input = sweep._eval_inputs(32)
    ds, _ = eval_split(file, classes, None, task="multilabel")
    images, targets, _ = next(iter(make_eval_loader(ds, pre, batch_size=64, num_workers=0)))
    keys = to_input(images).float().mean(dim=(1, 2, 3))
    assert len(set(keys.tolist())) == len(keys)  # the lookup tells every image apart
    assert sweep.test_map(Oracle(keys, targets), file, classes, 32) == pytest.approx(1.0)


def test_a_multilabel_case_is_marked_in_the_table():
    assert sweep.Case("shapes300", 64, 3, "mAP").name == "shapes300 64px 3ep (mAP)"
    assert sweep.Case("lfw100", 64, 3).name == "lfw100 64px 3ep"
