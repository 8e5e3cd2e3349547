"""A checkpoint written before the package moved into layers still loads, evaluates and predicts.

``data/checkpoint-v0.1.0-c076d33.json`` is the metadata and tensor list of a checkpoint that
train.py wrote at commit c076d33 (mobilenet_v3_small, 3 classes, 32 px, 1 epoch on the tests'
tiny folders): the format's contract is that metadata and those tensor names. The test writes a
file of that shape (weights of the same architecture, seeded) and runs it through today's code.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch
from conftest import write_image_folder
from safetensors.torch import save_file
from torchvision.models import get_model

from finetune.commands import eval as eval_cmd
from finetune.models.checkpoint import FORMAT, read_metadata
from finetune.models.inference import load_classifier

RECORD = Path(__file__).parent / "data" / "checkpoint-v0.1.0-c076d33.json"


def old_checkpoint(path: Path) -> dict:
    record = json.loads(RECORD.read_text())
    meta = record["finetune"]
    torch.manual_seed(0)
    net = get_model(meta["arch"], weights=None, num_classes=len(meta["classes"]), **meta["arch_kwargs"])
    state = net.state_dict()
    assert sorted(state) == sorted(record["tensors"])  # the same tensors as then
    save_file({k: v.contiguous() for k, v in state.items()}, str(path),
              metadata={"format": record["format"], "finetune": json.dumps(meta)})
    return meta


def test_a_checkpoint_of_the_previous_version_loads_evaluates_and_predicts(tmp_path: Path):
    ckpt = tmp_path / "model.safetensors"
    meta = old_checkpoint(ckpt)
    assert read_metadata(ckpt) == meta
    assert json.loads(RECORD.read_text())["format"] == FORMAT  # what train.py writes today is the same format
    clf = load_classifier(ckpt, mixed_precision="no")
    assert clf.classes == ["cat", "dog", "hot dog"] and clf.preprocessing.image_size == 32
    assert clf.precision == "no" and load_classifier(ckpt).precision == meta["precision"]  # auto: the run's
    data = write_image_folder(tmp_path / "test", {"cat": 2, "dog": 2, "hot dog": 2}, size=40)
    predictions = clf.predict(data, top_k=2)
    assert len(predictions) == 6 and all(p.classes[0] in clf.classes for p in predictions)
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = eval_cmd.main(["--ckpt", str(ckpt), "--data", str(data), "--output-dir", str(tmp_path / "eval"),
                                 "--mixed-precision", "no", "--num-workers", "0", "--no-plots", "--log-with", "none"])
    assert metrics["num_samples"] == 6
    # eval.py and the API, in the same precision, predict the same classes
    predicted = [p.classes[0] for p in sorted(predictions, key=lambda p: p.source)]
    rows = (tmp_path / "eval" / "predictions.csv").read_text().splitlines()[1:]
    assert [row.split(",")[2] for row in sorted(rows)] == predicted
