"""Runs that cannot do what was asked stop in one line before any work; likely mistakes are warned about."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAST, write_image_folder

import train
from finetune.config import parse_config
from finetune.errors import UserError
from finetune.models.build import build_classifier, build_for_checkpoint, recorded_arch_kwargs
from finetune.training.sanity import check_model_input, probable_mistakes, trains_batch_norm


def test_vit_takes_other_image_sizes_by_resampling_its_position_embeddings():
    check_model_input("vit_b_16", 64, 2)  # was: AssertionError: Wrong image height! Expected 224 but got 64!
    clf = build_classifier("vit_b_16", "none", ["a", "b"], image_size=64)
    assert clf.net(torch.zeros(2, 3, 64, 64)).shape == (2, 2)
    rebuilt = build_for_checkpoint("vit_b_16", 2, {"arch_kwargs": recorded_arch_kwargs(clf.net)})
    rebuilt.load_state_dict(clf.net.state_dict())  # eval.py rebuilds the same 64-pixel model
    assert rebuilt(torch.zeros(1, 3, 64, 64)).shape == (1, 2)


@pytest.mark.parametrize("model, size, batch, freeze, message", [
    ("vit_b_16", 60, 8, "none", "cannot take --image-size 60: .*multiples of its 16-pixel patches"),
    ("inception_v3", 64, 8, "none", r"inception_v3 cannot take 64x64 images: .*at least 75 px"),
    ("mobilenet_v2", 32, 1, "none", "--batch-size 1 cannot train mobilenet_v2 at --image-size 32"),
    ("resnet18", 32, 1, "0.5", "--batch-size 1 cannot train resnet18"),  # the top BatchNorm layers still train
    ("mobilenet_v2", 224, 8, "layer2", "--freeze 'layer2' is not none, backbone"),
])
def test_what_a_model_cannot_do_is_one_line_before_any_work(model, size, batch, freeze, message):
    with pytest.raises(UserError, match=message):
        check_model_input(model, size, batch, freeze)


@pytest.mark.parametrize("model, size, batch, freeze", [
    ("mobilenet_v2", 32, 2, "none"),
    ("mobilenet_v2", 32, 1, "backbone"),  # frozen BatchNorm runs on its running statistics
    ("mobilenet_v2", 64, 1, "none"),  # 2x2 feature maps: more than one value per channel
    ("inception_v3", 75, 2, "none"),
    ("regnet_y_400mf", 32, 2, "none"),  # computes its widths with tensors while it is built
])
def test_what_a_model_can_do_passes(model, size, batch, freeze):
    check_model_input(model, size, batch, freeze)


def test_train_refuses_before_writing_anything(tiny_data: Path, tmp_path: Path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="inception_v3 cannot take 32x32 images"):
        train.main(["--data", str(tiny_data), "--output-dir", str(out), *FAST, "--model", "inception_v3"])
    assert not out.exists()


def test_a_single_class_is_refused(tmp_path: Path):
    data = tmp_path / "one"
    write_image_folder(data / "train", {"only": 4})
    write_image_folder(data / "test", {"only": 2})
    with pytest.raises(UserError, match="has one class \\('only'\\): a classifier needs at least two"):
        train.main(["--data", str(data), "--output-dir", str(tmp_path / "run"), *FAST])


def test_probable_mistakes_are_warned_about():
    notes = probable_mistakes(parse_config(["--warmup-epochs", "5", "--epochs", "1", "--freeze", "backbone",
                                            "--weights", "none"]))
    assert any("--warmup-epochs 5 is longer than the run (--epochs 1)" in n for n in notes)
    assert any("linear probe on random features" in n for n in notes)
    assert probable_mistakes(parse_config([])) == []


def test_trains_batch_norm_follows_freezing():
    from torchvision.models import resnet18

    from finetune.models.surgery import freeze

    net = resnet18()
    assert trains_batch_norm(net)
    freeze(net, "backbone")
    net.fc.requires_grad_(True)
    assert not trains_batch_norm(net)
