"""Every torchvision classification model fine-tunes: built without weights, head replaced, forward
and backward on a tiny batch, --freeze choices, the head's param group; and each pretrained weights'
own eval preprocessing (interpolation included) is what eval and predict use.

The models are built on the meta device (shapes without memory or initialisation), so the 80
models take seconds: the checks here are of structure, not numbers.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from accelerate import init_empty_weights
from conftest import within_rounding
from PIL import Image
from torchvision.models import get_model, get_model_weights

from finetune.data.presets import ModelInput, Preprocessing
from finetune.models.build import arch_kwargs, classification_models, size_kwargs
from finetune.models.surgery import backbone_blocks, find_head, freeze, replace_head
from finetune.models.weights import torchvision_info
from finetune.training.optim import param_groups

MODELS = classification_models()


def build(name: str) -> tuple[torch.nn.Module, int]:
    size = max([32, *(w.meta.get("min_size", (1, 1))[0] for w in get_model_weights(name))])
    with init_empty_weights(), warnings.catch_warnings():  # parameters on meta: no memory, no initialisation
        warnings.simplefilter("ignore")  # GoogLeNet's and Inception's notes on their initialisation
        net = get_model(name, weights=None, **arch_kwargs(name), **size_kwargs(name, size))
    return net.to("meta"), size


def test_the_list_is_every_classifier():
    assert len(MODELS) >= 80 and {"resnet18", "vit_h_14", "regnet_y_128gf", "maxvit_t", "swin_v2_b"} <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_every_torchvision_classifier_fine_tunes(name: str):
    net, size = build(name)
    replace_head(net, 3)
    head = find_head(net)
    assert net.get_submodule(head).weight.shape[0] == 3
    blocks = [n for n, _ in backbone_blocks(net)]
    assert len(blocks) >= 2, blocks
    head_params = {id(p) for p in net.get_submodule(head).parameters()}
    assert not head_params & {id(p) for _, params in backbone_blocks(net) for p in params}

    frozen = freeze(net, "0.5")
    assert frozen == blocks[:round(len(blocks) / 2)]
    groups = param_groups(net, head, 0.1, 10, 1e-4)
    in_head = [p for g in groups if g["name"].startswith("head") for p in g["params"]]
    assert {id(p) for p in in_head} == head_params and all(g["lr"] == pytest.approx(1.0) for g in groups
                                                           if g["name"].startswith("head"))

    net.train()
    out = net(torch.empty(2, 3, size, size, device="meta"))
    out = out.logits if hasattr(out, "logits") else out
    assert out.shape == (2, 3)
    out.sum().backward()
    first, last = backbone_blocks(net)[0][1], backbone_blocks(net)[-1][1]
    assert all(p.grad is not None for p in net.get_submodule(head).parameters())
    assert all(p.grad is None and not p.requires_grad for p in first)  # frozen
    assert any(p.grad is not None for p in last)  # trains

    for spec, count in (("backbone", len(blocks)), ("none", 0), (blocks[0], 1)):
        net.requires_grad_(True)
        assert len(freeze(net, spec)) == count


WEIGHTS = sorted({w for name in MODELS for w in get_model_weights(name)}, key=str)
PREPROCESSINGS = {}
for _w in WEIGHTS:  # one weights per distinct eval preprocessing
    _t = _w.transforms()
    PREPROCESSINGS.setdefault((tuple(_t.resize_size), tuple(_t.crop_size), _t.interpolation.value,
                               tuple(_t.mean), tuple(_t.std)), _w)


@pytest.mark.parametrize("weights", list(PREPROCESSINGS.values()), ids=str)
def test_eval_preprocessing_is_each_weights_own(weights):
    """A checkpoint started from ``weights`` and trained at their crop size prepares images as
    torchvision's ``weights.transforms()`` does (to one level in a few pixels): resize, its interpolation, crop, mean and std."""
    info = torchvision_info(weights)
    crop = weights.transforms().crop_size[0]
    pre = Preprocessing(crop, round(crop * info.resize_ratio), info.mean, info.std, info.interpolation)
    image = Image.fromarray(torch.randint(0, 256, (300, 420, 3), dtype=torch.uint8, generator=torch.Generator()
                                          .manual_seed(0)).numpy())
    ours = ModelInput(pre.mean, pre.std)(pre.eval_preset().from_image(image)[None])[0]
    assert within_rounding(ours, weights.transforms()(image), pre.std)
