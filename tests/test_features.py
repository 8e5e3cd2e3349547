"""Linear probe on cached features."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from conftest import FAST
from safetensors.torch import load_file
from torch import nn
from torchvision.models import get_model

from finetune.commands import train
from finetune.models.surgery import find_head, replace_head
from finetune.training.features import probe_module


def test_probe_module_per_family():
    x = torch.randn(1, 3, 64, 64)
    resnet = replace_head(get_model("resnet18", weights=None), 3)
    assert probe_module(resnet, "fc", x) is resnet.fc
    mobilenet = replace_head(get_model("mobilenet_v2", weights=None), 3)
    probe = probe_module(mobilenet, find_head(mobilenet), x)
    assert isinstance(probe, nn.Sequential) and isinstance(probe[0], nn.Dropout) and probe[1] is mobilenet.classifier[1]
    squeezenet = replace_head(get_model("squeezenet1_1", weights=None), 3)
    assert probe_module(squeezenet, find_head(squeezenet), x) is None  # ReLU and pooling follow its head


def test_cached_probe_trains_like_the_uncached_one_and_eval_reads_it(tiny_data: Path, tmp_path: Path):
    args = ["--data", str(tiny_data), *FAST, "--model", "resnet18", "--freeze", "backbone", "--augment", "none",
            "--epochs", "3", "--mixed-precision", "no", "--lr", "0.05"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cached = train.main([*args, "--output-dir", str(tmp_path / "cached")])
        plain = train.main([*args, "--output-dir", str(tmp_path / "plain"), "--no-cache-features"])
    assert "linear probe on cached features (512 per image)" in out.getvalue()
    a, b = (load_file(str(r.run_dir / "model.safetensors")) for r in (cached, plain))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    assert [r["test_acc"] for r in cached.history] == [r["test_acc"] for r in plain.history]
    assert not torch.equal(a["fc.weight"], torch.zeros_like(a["fc.weight"]))
    assert all("lr_head" in row for row in cached.history)  # the epoch table names whose rate it shows
