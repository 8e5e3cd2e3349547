import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.models import get_model

from finetune.data.presets import EvalPreset, ModelInput, Preprocessing
from finetune.errors import UserError
from finetune.models.build import build_classifier, build_pretrained
from finetune.models.checkpoint import save_checkpoint
from finetune.models.weights import ensure_cached


@pytest.fixture
def hub_dir(tmp_path: Path, monkeypatch):
    """An empty torch.hub cache, so nothing is found by accident."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_real_imagenet_weights_come_from_the_pip_mirror_and_see_a_cat(hub_dir: Path):
    from skimage.data import chelsea

    net, info = build_pretrained("mobilenet_v2", "IMAGENET1K_V1")
    assert (hub_dir / "checkpoints" / "mobilenet_v2-b0353104.pth").is_file()
    assert info.name == "MobileNet_V2_Weights.IMAGENET1K_V1" and len(info.categories) == 1000
    Image.fromarray(chelsea()).save(hub_dir.parent / "chelsea.png")
    image = EvalPreset(crop_size=224, resize_size=256)(str(hub_dir.parent / "chelsea.png"))
    net.eval()
    with torch.no_grad():
        top = net(ModelInput(info.mean, info.std)(image[None])).argmax().item()
    assert info.categories[top] in ("tabby", "tiger cat", "Egyptian cat")


def test_unreachable_download_is_one_line_saying_how_to_get_the_weights(hub_dir: Path):
    class Unreachable:
        url = "http://127.0.0.1:9/resnet18-f37072fd.pth"  # port 9 refuses at once

    with pytest.raises(UserError, match="cannot download pretrained weights.*python -m finetune.commands.fetch") as err:
        ensure_cached(Unreachable())
    assert "\n" not in str(err.value) and str(hub_dir) in str(err.value)


@pytest.mark.parametrize("model, weights, message", [
    ("resnet99", "none", "unknown model 'resnet99'"),
    ("resnet18", "IMAGENET9K", "has no weights 'IMAGENET9K'.*IMAGENET1K_V1"),
    ("resnet18", "/nonexistent/w.pth", "weights file not found"),
])
def test_bad_model_or_weights_names(model, weights, message):
    with pytest.raises(UserError, match=message):
        build_pretrained(model, weights)


class Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pth_holding_code_is_refused_and_never_run(tmp_path: Path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": Payload(str(marker))}, path)
    with pytest.raises(UserError, match="nothing is unpickled"):
        build_pretrained("resnet18", str(path))
    assert not marker.exists()


def test_local_pth_state_dict_loads(tmp_path: Path):
    source = get_model("resnet18", weights=None, num_classes=7)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pth")
    net, info = build_pretrained("resnet18", str(tmp_path / "w.pth"))
    assert torch.equal(net.fc.weight, source.fc.weight) and info.pretrained and info.categories == []


def test_own_checkpoint_as_weights_reuses_rows_of_shared_classes(tmp_path: Path):
    source = get_model("resnet18", weights=None, num_classes=2)
    meta = {"arch": "resnet18", "classes": ["cat", "dog"], "image_size": 32, "resize_size": 37,
            "mean": [0.5] * 3, "std": [0.25] * 3}
    save_checkpoint(tmp_path / "m.safetensors", source.state_dict(), meta)
    clf = build_classifier("resnet18", str(tmp_path / "m.safetensors"), ["bird", "Dog"], image_size=32)
    assert clf.reused == {"Dog": "dog"}
    assert torch.equal(clf.net.fc.weight[1], source.fc.weight[1])
    assert clf.preprocessing == Preprocessing(32, 37, (0.5,) * 3, (0.25,) * 3)


def test_scratch_model_has_no_categories_and_imagenet_stats():
    clf = build_classifier("resnet18", "none", ["a", "b"], image_size=64, freeze_spec="layer1")
    assert not clf.weights.pretrained and clf.reused == {} and clf.frozen == ["conv1", "bn1", "layer1"]
    assert clf.preprocessing.resize_size == 73 and clf.preprocessing.mean == (0.485, 0.456, 0.406)


def test_bad_freeze_spec_is_a_user_error():
    with pytest.raises(UserError, match="--freeze 'stage9'"):
        build_classifier("resnet18", "none", ["a", "b"], image_size=64, freeze_spec="stage9")


@pytest.mark.slow
def test_fetch_command_puts_weights_in_the_hub_cache(tmp_path: Path):
    from conftest import run_cmd

    proc = run_cmd([sys.executable, "-m", "finetune.commands.fetch", "--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1"],
                   env={"TORCH_HOME": str(tmp_path / "torch")})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth").is_file()
    proc = run_cmd([sys.executable, "-m", "finetune.commands.fetch", "--model", "resnet18", "--weights", "IMAGENET9K"],
                   env={"TORCH_HOME": str(tmp_path / "torch")})
    assert proc.returncode == 2 and "has no weights 'IMAGENET9K'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0", "densenet121", "regnet_x_400mf",
                                  "googlenet", "convnext_tiny"])
def test_fusing_for_inference_keeps_the_outputs(name):
    from finetune.models.build import build_for_checkpoint, fuse_for_inference

    torch.manual_seed(0)
    net = build_for_checkpoint(name, 5).eval()
    for m in net.modules():  # non-trivial BatchNorm statistics, so folding them matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = net(x)
        fused = fuse_for_inference(net)
        assert torch.allclose(fused(x), expected, atol=1e-4, rtol=1e-3)


def test_offline_copy_is_checked_against_the_full_sha256(hub_dir: Path, tmp_path: Path, monkeypatch):
    """A mirror file is used only when its whole sha256 matches, not just the 8 digits in its name."""
    import hashlib
    import importlib.util

    from finetune.models import weights as models

    package, inner, sha256 = models.OFFLINE_MIRRORS["mobilenet_v2-b0353104.pth"]
    spec = importlib.util.find_spec(package)
    source = Path(list(spec.submodule_search_locations)[0]) / inner
    assert hashlib.sha256(source.read_bytes()).hexdigest() == sha256 and len(sha256) == 64
    target = hub_dir / "checkpoints" / "mobilenet_v2-b0353104.pth"
    # The same file under a recorded digest that shares its first 8 digits and differs after them:
    # as a corrupt or substituted copy with the right name would, it is refused.
    wrong = sha256[:8] + ("0" if sha256[8] != "0" else "1") + sha256[9:]
    monkeypatch.setitem(models.OFFLINE_MIRRORS, target.name, (package, inner, wrong))
    assert not models._from_mirror(target) and not target.exists()
    monkeypatch.setitem(models.OFFLINE_MIRRORS, target.name, (package, inner, sha256))
    assert models._from_mirror(target) and hashlib.sha256(target.read_bytes()).hexdigest() == sha256


@pytest.mark.parametrize("arch", ["resnet18", "googlenet", "regnet_x_400mf", "mnasnet0_5", "timm/convnext_atto",
                                  "timm/vit_tiny_patch16_224"])
def test_a_checkpoint_loads_into_a_model_built_without_initialising_it(arch, monkeypatch):
    """``model_from_checkpoint`` skips the random initialisation (meta device) and gives the same
    model as building one and loading into it: the same tensors, the same outputs. RegNet's
    constructor reads a tensor's value, which the meta device cannot give: it is built for real.
    MNASNet checks the per-module versions that a safetensors file does not carry."""
    from finetune.models import build
    from finetune.models.build import build_for_checkpoint, model_from_checkpoint, recorded_arch_kwargs

    torch.manual_seed(0)
    trained = build_for_checkpoint(arch, 3, {"arch_kwargs": {"img_size": 64}} if "vit" in arch else None).eval()
    meta = {"arch": arch, "classes": ["a", "b", "c"], "arch_kwargs": recorded_arch_kwargs(trained)}
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    builds: list[str] = []
    monkeypatch.setattr(build, "build_for_checkpoint",
                        lambda *args: builds.append(str(torch.empty(0).device)) or build_for_checkpoint(*args))
    net = model_from_checkpoint(state, meta, "does not fit").eval()
    assert builds == (["meta", "cpu"] if arch == "regnet_x_400mf" else ["meta"])
    assert not any(t.is_meta for t in [*net.parameters(), *net.buffers()])
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    assert all(p.requires_grad for p in net.parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x), trained(x))
    with pytest.raises(UserError, match="does not fit: .*missing"):
        model_from_checkpoint(dict(list(state.items())[:-1]), meta, "does not fit")


def test_a_model_computing_its_own_tensors_is_built_for_real(monkeypatch):
    """What the checkpoint does not hold (a non-persistent buffer, a plain tensor attribute) or holds
    once for two names would stay empty on the meta device: such a model is built the slow way."""
    from finetune.models import build
    from finetune.models.build import _filled_by

    def filled(make):
        with torch.device("meta"):
            net = make()
        real = make()
        return _filled_by(net, {k: v.clone() for k, v in real.state_dict().items()})

    class Buffered(torch.nn.Linear):
        def __init__(self):
            super().__init__(2, 2)
            self.register_buffer("index", torch.arange(4), persistent=False)

    class Attribute(torch.nn.Linear):
        def __init__(self):
            super().__init__(2, 2)
            self.scale = torch.ones(2)

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(2, 2)
            self.b = torch.nn.Linear(2, 2)
            self.b.weight = self.a.weight

    assert filled(lambda: torch.nn.Linear(2, 2))
    assert not filled(Buffered)
    assert not filled(Attribute)
    assert not filled(Tied)

    monkeypatch.setattr(build, "build_for_checkpoint", lambda arch, num_classes, meta: Buffered())
    state = {k: torch.randn_like(v) for k, v in Buffered().state_dict().items()}
    net = build.model_from_checkpoint(state, {"arch": "buffered", "classes": ["a", "b"]}, "does not fit")
    assert torch.equal(net.index, torch.arange(4)) and torch.equal(net.weight, state["weight"])


@pytest.mark.parametrize("arch", ["resnet18", "timm/mobilenetv3_small_050"])
def test_folding_keeps_the_head_whose_input_the_ood_score_reads(arch, tmp_path: Path):
    """timm's mobilenetv3 head is timm's own Linear, which fx traces through: folded, the head module
    would never be called and the feature tap would see nothing. Such a model stays unfolded."""
    from finetune.models.build import build_for_checkpoint, fuse_for_inference
    from finetune.models.inference import load_classifier

    torch.manual_seed(0)
    net = build_for_checkpoint(arch, 3).eval()
    head = "fc" if arch == "resnet18" else "classifier"
    folded = fuse_for_inference(net, head)
    assert (folded is not net) == (arch == "resnet18")  # resnet18's fc stays a module call: folded
    meta = {"arch": arch, "classes": ["a", "b", "c"], "head": head, "image_size": 64, "resize_size": 64,
            "mean": [0.5] * 3, "std": [0.5] * 3}
    save_checkpoint(tmp_path / "model.safetensors", net.state_dict(), meta)
    clf = load_classifier(tmp_path / "model.safetensors", fold_batchnorm=True, mixed_precision="no")
    with torch.no_grad(), clf.feature_tap() as tap:
        clf.model(torch.randn(2, 3, 64, 64))
    assert tap.features is not None and tap.features.shape[0] == 2
