"""Every way to run a model gives the same answer: eval.py, predict.py, the Python API and the
exported ONNX and TorchScript files, on the same real photos, under the one precision rule
(models/inference.py)."""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_checkpoint
from PIL import Image
from skimage import data as skdata

from finetune.commands import eval as eval_cmd
from finetune.commands import export as export_cmd
from finetune.commands import predict as predict_cmd
from finetune.data.presets import ModelInput
from finetune.errors import UserError
from finetune.models import export as export_module
from finetune.models.inference import load_classifier

pytestmark = pytest.mark.slow  # real ImageNet weights at 224 px, five ways

CLASSES = ["cat", "coffee", "astronaut", "rocket"]
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry", "hubble_deep_field")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.safetensors", CLASSES, model="mobilenet_v2",
                            image_size=224, weights="IMAGENET1K_V1")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """24 real photos (six of scikit-image's, each whole, flipped and two crops), in class folders
    for eval.py (the labels do not matter: the predictions are compared)."""
    root = tmp_path_factory.mktemp("photos")
    for i, name in enumerate(PHOTOS):
        img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        w, h = img.size
        variants = [img, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), img.crop((0, 0, w * 3 // 4, h * 3 // 4)),
                    img.crop((w // 4, h // 4, w, h))]
        folder = root / CLASSES[i % len(CLASSES)]
        folder.mkdir(exist_ok=True)
        for j, variant in enumerate(variants):
            variant.save(folder / f"{name}-{j}.jpg", quality=92)
    return root


def top1_by_way(ckpt: Path, photos: Path, tmp: Path, precision: str) -> dict[str, dict[str, str]]:
    """Each image's top class by eval.py, predict.py and the API in ``precision``."""
    common = ["--mixed-precision", precision, "--num-workers", "0"]
    with contextlib.redirect_stdout(io.StringIO()):
        eval_cmd.main(["--ckpt", str(ckpt), "--data", str(photos), "--output-dir", str(tmp / f"eval-{precision}"),
                       "--no-plots", "--log-with", "none", *common])
        predict_cmd.main(["--ckpt", str(ckpt), str(photos), "--output", str(tmp / f"pred-{precision}.csv"), *common])
    with open(tmp / f"eval-{precision}" / "predictions.csv") as f:
        by_eval = {row["path"]: row["predicted"] for row in csv.DictReader(f)}
    with open(tmp / f"pred-{precision}.csv") as f:
        by_predict = {row["path"]: row["class_1"] for row in csv.DictReader(f)}
    api = load_classifier(ckpt, mixed_precision=precision)
    by_api = {p.source: p.classes[0] for p in api.predict(photos)}
    return {"eval": by_eval, "predict": by_predict, "api": by_api}


def test_five_ways_give_the_same_top1_in_fp32_and_bf16_agreement_is_measured(ckpt: Path, photos: Path,
                                                                             tmp_path: Path):
    fp32 = top1_by_way(ckpt, photos, tmp_path, "no")
    clf = load_classifier(ckpt, mixed_precision="no")
    paths = sorted(fp32["api"])
    images = torch.stack([clf.uint8_image(p) for p in paths])
    x = ModelInput(clf.preprocessing.mean, clf.preprocessing.std)(images)
    for fmt in ("onnx", "torchscript"):
        out = tmp_path / f"model{export_module.FORMATS[fmt]}"
        with contextlib.redirect_stdout(io.StringIO()):
            export_cmd.main(["--ckpt", str(ckpt), "--format", fmt, "--output", str(out), "--check-images", str(photos)])
        logits = export_module.runner(fmt, out)(x)
        fp32[fmt] = {p: CLASSES[i] for p, i in zip(paths, logits.argmax(1).tolist())}
    assert len(paths) == 24
    for way, top1 in fp32.items():
        assert top1 == fp32["api"], f"{way} disagrees with the API in fp32"

    bf16 = top1_by_way(ckpt, photos, tmp_path, "bf16")
    assert bf16["eval"] == bf16["predict"] == bf16["api"]  # one precision, one answer
    agreement = np.mean([bf16["api"][p] == fp32["api"][p] for p in paths])
    print(f"bf16 against fp32: the same top class on {agreement:.3f} of {len(paths)} photos")
    assert agreement >= 0.9  # measured 0.958 (23 of 24) here: bf16 moves logits by about 1e-2


def test_a_deliberately_altered_export_fails_its_check_and_writes_nothing(ckpt: Path, photos: Path,
                                                                        tmp_path: Path, monkeypatch):
    real = export_module._torchscript

    def altered(model, example, path, meta):
        broken = load_classifier(ckpt, mixed_precision="no", channels_last=False).model
        with torch.no_grad():
            broken.classifier[-1].bias += 3.0 * torch.arange(len(CLASSES))  # a wrong weight in the file
        real(broken, example, path, meta)

    monkeypatch.setattr(export_module, "_torchscript", altered)
    out = tmp_path / "model.ts"
    with pytest.raises(UserError, match="disagrees with PyTorch on 24 real images.*was not written"):
        export_cmd.main(["--ckpt", str(ckpt), "--format", "torchscript", "--output", str(out),
                         "--check-images", str(photos)])
    assert not out.exists() and not list(tmp_path.glob(".model.ts.*"))
