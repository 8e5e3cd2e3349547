"""export.py: ONNX, TorchScript and ExportedProgram files that agree with PyTorch and carry their
classes and preprocessing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import python_cmd, run_cmd, write_checkpoint
from PIL import Image
from skimage import data as skdata

from finetune.commands import export as export_cmd
from finetune.errors import UserError
from finetune.models.inference import load_classifier

CLASSES = ["cat", "coffee", "astronaut", "rocket"]
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """Real ImageNet MobileNetV2 weights (the offline copy) at 224 px, with a new 4-class head."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.safetensors", CLASSES, model="mobilenet_v2",
                            image_size=224, weights="IMAGENET1K_V1")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> torch.Tensor:
    """scikit-image's photos (JPEG files) as the model's input, prepared as eval.py prepares them."""
    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        pixels = getattr(skdata, name)()
        Image.fromarray(pixels).convert("RGB").save(folder / f"{name}.jpg", quality=90)
    return folder


def model_input(ckpt: Path, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    clf = load_classifier(ckpt)
    images = torch.stack([clf.transform(Image.open(folder / f"{name}.jpg")) for name in PHOTOS])
    with torch.no_grad():
        return images, clf.model(images)


@pytest.mark.slow
def test_onnx_runtime_agrees_with_pytorch_on_real_images(pretrained: Path, photos: Path, tmp_path: Path):
    out = tmp_path / "model.onnx"
    result = export_cmd.main(["--ckpt", str(pretrained), "--format", "onnx", "--output", str(out),
                              "--check-images", str(photos)])
    assert result["max_difference"] <= 1e-3 and result["agreement"].same_top1 == len(PHOTOS)
    images, expected = model_input(pretrained, photos)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (images[:1], images):  # batch 1 and 5: the batch size is dynamic
        (logits,) = session.run(["logits"], {"images": batch.numpy()})
        reference = expected[: len(batch)].numpy()
        assert np.abs(logits - reference).max() <= 1e-3
        assert (logits.argmax(1) == reference.argmax(1)).all()
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["classes"]) == CLASSES
    assert (meta["image_size"], meta["resize_size"], meta["interpolation"]) == ("224", "256", "bilinear")
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(meta["std"]) == pytest.approx([0.229, 0.224, 0.225])


# Runs in a Python where importing finetune fails: the files must need torch only.
RELOAD = """
import json, sys
sys.modules["finetune"] = None
import torch
fmt, path, inputs = sys.argv[1:]
extra = {"finetune.json": ""}
if fmt == "torchscript":
    model = torch.jit.load(path, _extra_files=extra)
else:
    model = torch.export.load(path, extra_files=extra).module()
images = torch.load(inputs, weights_only=True)
with torch.no_grad():
    logits = torch.cat([model(images[:1]), model(images[1:])])
print(json.dumps({"meta": json.loads(extra["finetune.json"]), "logits": logits.tolist()}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt, suffix", [("torchscript", ".ts"), ("exported-program", ".pt2")])
def test_torchscript_and_exported_program_reload_without_the_project(pretrained: Path, photos: Path,
                                                                     tmp_path: Path, fmt: str, suffix: str):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(pretrained.read_bytes())
    proc = run_cmd(python_cmd("export.py", "--ckpt", str(ckpt), "--format", fmt, "--check-images", str(photos)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warn" not in proc.stderr.lower() and ".tmp" not in proc.stderr  # torch's notes on the temporary file
    out = ckpt.with_suffix(suffix)  # the default name: beside the checkpoint
    assert f"wrote {out} ({fmt}, fp32" in proc.stdout
    assert f"checked on {len(PHOTOS)} images (--check-images): the file agrees with PyTorch in fp32" in proc.stdout
    images, expected = model_input(pretrained, photos)
    torch.save(images, tmp_path / "images.pt")
    (tmp_path / "reload.py").write_text(RELOAD)
    proc = run_cmd([sys.executable, str(tmp_path / "reload.py"), fmt, str(out), str(tmp_path / "images.pt")],
                   env={"PYTHONPATH": None}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["meta"]["classes"] == CLASSES and result["meta"]["interpolation"] == "bilinear"
    logits = torch.tensor(result["logits"])
    assert (logits - expected).abs().max() <= 1e-4
    assert torch.equal(logits.argmax(1), expected.argmax(1))


def test_the_command_knows_the_formats_export_writes():
    from finetune.models import export

    assert export_cmd.FORMATS == export.FORMATS


def test_bad_input_is_one_line(tmp_path: Path):
    with pytest.raises(UserError, match="needs --ckpt FILE"):
        export_cmd.main([])
    with pytest.raises(UserError, match="invalid choice: 'tflite'"):
        export_cmd.main(["--ckpt", "x.safetensors", "--format", "tflite"])
    with pytest.raises(UserError, match="checkpoint not found"):
        export_cmd.main(["--ckpt", str(tmp_path / "x.safetensors")])
    with pytest.raises(UserError, match=r"--output x.onnx is named like a onnx file, but --format torchscript "
                                        r"writes .ts; rename it or choose the format"):
        export_cmd.main(["--ckpt", str(tmp_path / "x.safetensors"), "--format", "torchscript", "--output", "x.onnx"])
