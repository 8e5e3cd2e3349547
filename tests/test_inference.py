"""load_classifier: the one loading path of eval.py, predict.py, export.py and the Python API."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import within_rounding, write_checkpoint, write_image_folder
from PIL import Image
from torchvision.models import EfficientNet_B0_Weights, ResNet18_Weights

import finetune
from finetune import load_classifier
from finetune.commands import eval as eval_cmd
from finetune.data.presets import ModelInput
from finetune.errors import UserError
from finetune.models import inference
from finetune.models.weights import torchvision_info

CLASSES = ["cat", "dog", "hot dog"]


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "model.safetensors", CLASSES)


def test_loaded_classifier_is_in_eval_mode_with_classes_preprocessing_and_version(ckpt: Path):
    clf = load_classifier(ckpt)
    assert not clf.model.training
    assert clf.classes == CLASSES
    assert (clf.preprocessing.image_size, clf.preprocessing.resize_size) == (32, 37)
    assert clf.preprocessing.interpolation == "bilinear"
    assert clf.meta["versions"]["finetune"] == finetune.__version__


def test_transform_is_the_eval_preprocessing(ckpt: Path, tmp_path: Path):
    write_image_folder(tmp_path / "imgs", {"a": 2}, size=50)
    path = tmp_path / "imgs" / "a" / "000.png"
    clf = load_classifier(ckpt)
    as_eval = ModelInput(clf.preprocessing.mean, clf.preprocessing.std)(clf.preprocessing.eval_preset()(str(path))[None])[0]
    with Image.open(path) as img:
        assert torch.equal(clf.transform(img), as_eval)
    assert clf.transform(Image.open(path)).shape == (3, 32, 32)


@pytest.mark.parametrize("weights", [EfficientNet_B0_Weights.IMAGENET1K_V1, ResNet18_Weights.IMAGENET1K_V1])
def test_transform_follows_the_weights_own_interpolation(weights, tmp_path: Path):
    """EfficientNet-B0's weights were evaluated with bicubic resizing, ResNet-18's with bilinear: the
    checkpoint records it and the transform equals torchvision's own preset for those weights."""
    info = torchvision_info(weights)
    assert info.interpolation == ("bicubic" if weights is EfficientNet_B0_Weights.IMAGENET1K_V1 else "bilinear")
    ckpt = write_checkpoint(tmp_path / "m.safetensors", CLASSES, image_size=224, resize_size=256,
                           interpolation=info.interpolation, mean=list(info.mean), std=list(info.std))
    clf = load_classifier(ckpt)
    img = Image.fromarray(torch.randint(0, 256, (300, 400, 3), dtype=torch.uint8).numpy())
    assert within_rounding(clf.transform(img), weights.transforms()(img), info.std)


def test_predict_takes_paths_folders_and_pil_images(ckpt: Path, tmp_path: Path):
    write_image_folder(tmp_path / "photos" / "nested", {"x": 3, "y": 2}, size=40)
    single = tmp_path / "photos" / "nested" / "x" / "000.png"
    clf = load_classifier(ckpt)
    pil = Image.open(single)
    preds = clf.predict([single, tmp_path / "photos", pil], top_k=2, batch_size=4)
    assert [p.source for p in preds] == [str(single), *sorted(str(p) for p in (tmp_path / "photos").rglob("*.png")),
                                         "<image 2>"]
    for p in preds:
        assert len(p.classes) == 2 and set(p.classes) <= set(CLASSES)
        assert p.probabilities[0] >= p.probabilities[1] and sum(p.probabilities) <= 1 + 1e-6
    # The same answer as the model on the transformed image, and for a path and its decoded image.
    with torch.no_grad():
        probs = clf.model(clf.transform(pil)[None]).softmax(dim=1)[0]
    assert preds[0].classes[0] == CLASSES[int(probs.argmax())]
    assert preds[0].probabilities[0] == pytest.approx(float(probs.max()), abs=1e-5)
    assert preds[-1].classes == preds[0].classes
    assert clf.predict(single, top_k=5)[0].classes.__len__() == 3  # at most the number of classes


def test_predict_names_a_missing_input(ckpt: Path, tmp_path: Path):
    with pytest.raises(UserError, match="input not found: .*nothing.jpg"):
        load_classifier(ckpt).predict(tmp_path / "nothing.jpg")


def test_load_refuses_files_that_are_not_checkpoints(tmp_path: Path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_classifier(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_classifier(tmp_path / "bad.safetensors")


def test_eval_loads_through_load_classifier_and_agrees_with_predict(ckpt: Path, tmp_path: Path, monkeypatch):
    data = write_image_folder(tmp_path / "test", {"cat": 3, "dog": 3, "hot dog": 3}, size=40)
    loaded = []
    monkeypatch.setattr(inference, "load_classifier",
                        lambda path, **kwargs: loaded.append(path) or load_classifier(path, **kwargs))
    eval_cmd.main(["--ckpt", str(ckpt), "--data", str(data), "--output-dir", str(tmp_path / "out"),
                   "--mixed-precision", "no", "--num-workers", "0", "--no-plots", "--log-with", "none"])
    assert loaded == [str(ckpt)]
    with open(tmp_path / "out" / "predictions.csv") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    preds = load_classifier(ckpt, mixed_precision="no").predict(data)
    assert len(preds) == len(rows) == 9
    for p in preds:
        # eval.py runs in fp32 here (--mixed-precision no), as predict does: the same numbers up to rounding.
        assert float(rows[p.source]["confidence"]) == pytest.approx(p.probabilities[0], abs=1e-4)
        assert rows[p.source]["predicted"] == p.classes[0]


@pytest.mark.slow
def test_train_api_takes_the_flags_as_keywords(tiny_data: Path, tmp_path: Path):
    run = finetune.train(data=tiny_data, output_dir=tmp_path / "run", model="mobilenet_v3_small", weights="none",
                         image_size=32, batch_size=8, epochs=2, num_workers=0, channels_last=False)
    assert run.run_dir == tmp_path / "run" and len(run.history) == 2
    assert load_classifier(run.run_dir / "model.safetensors").classes == CLASSES
    with pytest.raises(UserError, match="unknown setting 'epoch' \\(did you mean 'epochs'\\?\\)"):
        finetune.train(epoch=3)
    with pytest.raises(UserError, match="--batch-size must be at least 1"):
        finetune.train(data=tiny_data, batch_size=0)
