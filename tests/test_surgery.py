import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import get_model

from finetune.models.surgery import backbone_blocks, find_head, freeze, match_classes, replace_head, set_frozen_eval

# One model per torchvision family, and where its output layer is.
FAMILIES = {
    "resnet18": "fc", "mobilenet_v2": "classifier.1", "mobilenet_v3_small": "classifier.3",
    "efficientnet_b0": "classifier.1", "alexnet": "classifier.6", "squeezenet1_1": "classifier.1",
    "densenet121": "classifier", "convnext_tiny": "classifier.2", "vit_b_32": "heads.head",
    "swin_t": "head", "regnet_x_400mf": "fc", "shufflenet_v2_x0_5": "fc", "mnasnet0_5": "classifier.1",
    "googlenet": "fc", "maxvit_t": "classifier.5", "vgg11": "classifier.6",
}


def make(name: str) -> nn.Module:
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    return get_model(name, weights=None, **kwargs)


@pytest.mark.parametrize("name", FAMILIES)
def test_head_is_found_and_replaced_in_every_family(name):
    model = make(name)
    assert find_head(model) == FAMILIES[name]
    replace_head(model, 3)
    head = model.get_submodule(FAMILIES[name])
    assert head.weight.shape[0] == 3
    assert head.bias is None or torch.all(head.bias == 0)
    size = 224 if name in ("vit_b_32", "maxvit_t") else 64
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 3)
    blocks = backbone_blocks(model)
    assert len(blocks) >= 3
    in_blocks = sum(p.numel() for _, ps in blocks for p in ps)
    assert in_blocks + sum(p.numel() for p in head.parameters()) == sum(p.numel() for p in model.parameters())


def test_new_head_is_xavier_uniform():
    model = replace_head(get_model("resnet18", weights=None), 50)
    w = model.fc.weight.detach()
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.9 * bound  # spread over the whole xavier range, not a tiny init
    assert w.std() == pytest.approx(bound / 3 ** 0.5, rel=0.1)


def test_reused_rows_copy_the_old_classifier():
    model = get_model("resnet18", weights=None)
    old_w, old_b = model.fc.weight.detach().clone(), model.fc.bias.detach().clone()
    replace_head(model, 3, reuse={2: 934})
    assert torch.equal(model.fc.weight[2], old_w[934]) and model.fc.bias[2] == old_b[934]
    assert not torch.equal(model.fc.weight[0], old_w[0])


def test_match_classes_ignores_case_space_underscore_hyphen():
    categories = ["tench", "hotdog", "Great Dane", "crane", "t-shirt", "crane"]
    assert match_classes(["hot dog", "great_dane", "CRANE", "T_Shirt", "pizza"], categories) == {0: 1, 1: 2, 2: 3, 3: 4}


def test_freeze_by_stage_name_fraction_and_backbone():
    model = replace_head(get_model("resnet18", weights=None), 2)
    frozen = freeze(model, "layer2")
    assert frozen == ["conv1", "bn1", "layer1", "layer2"]
    assert not model.layer2[1].conv2.weight.requires_grad and model.layer3[0].conv1.weight.requires_grad

    model = replace_head(get_model("mobilenet_v2", weights=None), 2)
    frozen = freeze(model, "0.5")
    assert frozen == [f"features.{i}" for i in range(10)]  # 19 blocks, round(9.5) = 10
    assert model.features[18][0].weight.requires_grad

    model = replace_head(get_model("vit_b_32", weights=None), 2)
    freeze(model, "backbone")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["heads.head.weight", "heads.head.bias"]


def test_freeze_rejects_unknown_spec_naming_valid_blocks():
    model = replace_head(get_model("resnet18", weights=None), 2)
    with pytest.raises(ValueError, match="layer9.*conv1, bn1, layer1"):
        freeze(model, "layer9")
    with pytest.raises(ValueError, match="between 0 and 1"):
        freeze(model, "1.5")


def test_frozen_batchnorm_stays_in_eval_mode():
    model = replace_head(get_model("resnet18", weights=None), 2)
    freeze(model, "layer1")
    model.train()
    set_frozen_eval(model)
    assert not model.bn1.training and not model.layer1[0].bn1.training
    assert model.layer2[0].bn1.training
    before = model.bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(model.bn1.running_mean, before)


@pytest.mark.parametrize("name, spec", [("efficientnet_b0", "backbone"), ("convnext_tiny", "0.5"), ("swin_t", "0.5")])
def test_frozen_blocks_have_no_dropout_or_stochastic_depth(name: str, spec: str):
    # A linear probe trained through the frozen backbone must see the clean features that the
    # cached probe sees: dropout and stochastic depth off in frozen blocks, not only BatchNorm.
    model = replace_head(make(name), 2)
    frozen = freeze(model, spec)
    model.train()
    set_frozen_eval(model)
    random_layers = (nn.Dropout, torchvision.ops.StochasticDepth)
    in_frozen = [m for block in frozen for m in model.get_submodule(block).modules() if isinstance(m, random_layers)]
    assert in_frozen and not any(m.training for m in in_frozen)
    if spec != "backbone":  # the blocks that still train keep their randomness
        assert any(m.training for m in model.modules() if isinstance(m, random_layers))
    prefix = nn.Sequential(*[model.get_submodule(b) for b in frozen])
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        assert torch.equal(prefix(x), prefix(x))  # the frozen part is deterministic in training mode


def test_dropout_before_the_head_stays_active_in_a_linear_probe():
    model = replace_head(make("mobilenet_v2"), 2)
    freeze(model, "backbone")
    model.train()
    set_frozen_eval(model)
    assert model.classifier[0].training  # the head's own regularisation, kept as in the cached probe
    assert not model.features.training
