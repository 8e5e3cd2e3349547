import pytest
import torch
from torchvision.models import get_model

from finetune.models.surgery import find_head, freeze, replace_head
from finetune.training.optim import build_optimizer, build_scheduler, param_groups, warmup_cosine


def groups_by_name(model, **kwargs):
    groups = param_groups(model, find_head(model), **{"lr": 0.01, "lr_head_mult": 10, "weight_decay": 1e-4, **kwargs})
    return {g["name"]: g for g in groups}


def test_head_gets_lr_times_multiplier_and_no_decay_on_norm_and_bias():
    model = replace_head(get_model("resnet18", weights=None), 2)
    groups = groups_by_name(model)
    assert groups["head"]["lr"] == pytest.approx(0.1) and groups["head"]["params"] == [model.fc.weight]
    assert groups["head_no_decay"]["params"] == [model.fc.bias] and groups["head_no_decay"]["weight_decay"] == 0
    assert groups["backbone"]["lr"] == 0.01 and groups["backbone"]["weight_decay"] == 1e-4
    no_decay = {id(p) for p in groups["backbone_no_decay"]["params"]}
    assert id(model.bn1.weight) in no_decay and id(model.conv1.weight) not in no_decay
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_decay_norm_and_bias_when_asked():
    model = replace_head(get_model("resnet18", weights=None), 2)
    groups = groups_by_name(model, decay_norm_and_bias=True)
    assert set(groups) == {"backbone", "head"}


def test_frozen_parameters_are_left_out():
    model = replace_head(get_model("resnet18", weights=None), 2)
    freeze(model, "backbone")
    groups = groups_by_name(model)
    assert set(groups) == {"head", "head_no_decay"}


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_optimizer_keeps_group_learning_rates(name, cls):
    model = replace_head(get_model("resnet18", weights=None), 2)
    opt = build_optimizer(name, param_groups(model, "fc", 0.01, 10, 1e-4), 0.01)
    assert isinstance(opt, cls)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([0.01, 0.1])


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_optimizer_is_fused_on_cpu_and_steps_as_the_default_does(name, cls):
    torch.manual_seed(0)
    model, twin = torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)
    twin.load_state_dict(model.state_dict())
    opt = build_optimizer(name, [{"params": list(model.parameters()), "weight_decay": 1e-2}], 0.01)
    assert opt.defaults["fused"]
    default = cls([{"params": list(twin.parameters()), "weight_decay": 1e-2}], lr=0.01,
                  **({"momentum": 0.9, "nesterov": True} if name == "sgd" else {}))
    assert not default.defaults["fused"]
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for _ in range(5):
        for net, o in ((model, opt), (twin, default)):
            torch.nn.functional.cross_entropy(net(x), y).backward()
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_optimizer_is_not_fused_under_fp16s_loss_scaler():
    """A fused step skips an overflowing fp16 step in its kernel, unseen by Accelerate's scaler check."""
    model = torch.nn.Linear(8, 3)
    opt = build_optimizer("adamw", [{"params": list(model.parameters())}], 0.01, mixed_precision="fp16")
    assert not opt.defaults["fused"]
    opt = build_optimizer("adamw", [{"params": list(model.parameters())}], 0.01, mixed_precision="bf16")
    assert opt.defaults["fused"]


def test_optimizer_is_not_fused_where_the_device_has_no_fused_kernel():
    model = torch.nn.Linear(8, 3)
    opt = build_optimizer("adamw", [{"params": list(model.parameters())}], 0.01, device="meta")
    assert not opt.defaults["fused"]


def test_warmup_then_cosine_to_zero():
    factors = [warmup_cosine(s, 4, 20) for s in range(21)]
    assert factors[0] == pytest.approx(0.2) and factors[3] == pytest.approx(0.8)
    assert factors[4] == 1.0 and factors[12] == pytest.approx(0.5) and factors[20] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))


def test_scheduler_scales_every_group():
    model = replace_head(get_model("resnet18", weights=None), 2)
    opt = build_optimizer("sgd", param_groups(model, "fc", 0.01, 10, 0), 0.01)
    sched = build_scheduler(opt, 0, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs[0] == pytest.approx(0.005) and lrs[-1] == pytest.approx(0.05)


def test_lp_ft_holds_the_backbone_still_while_the_head_trains():
    from finetune.training.optim import lr_factor

    backbone = [lr_factor(s, part="backbone", warmup_steps=2, total_steps=10, probe_steps=4) for s in range(10)]
    head = [lr_factor(s, part="head", warmup_steps=2, total_steps=10, probe_steps=4) for s in range(10)]
    assert backbone[:4] == [0.0] * 4 and head[:4] == [1.0] * 4
    # then both warm up again and decay together over the remaining 6 steps
    assert backbone[4:] == head[4:] and backbone[4] == pytest.approx(1 / 3) and backbone[6] == 1.0
    assert backbone[-1] < backbone[6]


def test_constant_schedule_stays_flat_after_warmup():
    from finetune.training.optim import lr_factor

    factors = [lr_factor(s, part="head", warmup_steps=2, total_steps=10, schedule="constant") for s in range(10)]
    assert factors[:2] == pytest.approx([1 / 3, 2 / 3]) and factors[2:] == [1.0] * 8


def test_scheduler_gives_each_group_its_phase():
    model = replace_head(get_model("resnet18", weights=None), 2)
    opt = build_optimizer("sgd", param_groups(model, "fc", 0.01, 10, 0), 0.01)
    sched = build_scheduler(opt, 0, 10, probe_steps=3)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["backbone_no_decay"] == 0.0 and lrs["head_no_decay"] == pytest.approx(0.1)
    for _ in range(3):
        opt.step()
        sched.step()
    assert {g["name"]: g["lr"] for g in opt.param_groups}["backbone_no_decay"] == pytest.approx(0.01)
