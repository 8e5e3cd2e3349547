"""'I don't know': every prediction's out-of-distribution score, and --abstain marking images
'unknown' by confidence or by the checkpoint's OOD threshold."""

from __future__ import annotations

import csv
import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from conftest import python_cmd, run_cmd, write_checkpoint, write_image_folder
from PIL import Image

from finetune.commands import predict
from finetune.models.calibration import (
    OOD_BANK,
    OOD_SIDECAR,
    auroc,
    energy_score,
    feature_bank,
    knn_distance,
    ood_threshold,
)
from finetune.models.checkpoint import save_tensors, sidecar
from finetune.models.inference import load_classifier

CLASSES = ["cat", "dog", "hot dog"]
QUIET = ["--num-workers", "0", "--mixed-precision", "no"]


def test_energy_by_hand():
    assert energy_score(torch.tensor([[0.0, 0.0], [3.0, -50.0]])).tolist() == pytest.approx(
        [-torch.log(torch.tensor(2.0)).item(), -3.0], abs=1e-6)


def test_knn_distance_by_hand():
    bank = feature_bank(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    features = torch.tensor([[5.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    assert knn_distance(features, bank).tolist() == pytest.approx([0.0, 1 - 2 ** -0.5, 1.0], abs=1e-3)
    # Leave-one-out: each training image is scored against the others (here the other is orthogonal).
    assert knn_distance(torch.tensor([[2.0, 0.0], [0.0, 3.0]]), bank, exclude_self=True).tolist() == pytest.approx(
        [1.0, 1.0], abs=1e-3)


def test_threshold_is_a_percentile_of_in_distribution_scores():
    scores = torch.arange(101, dtype=torch.float)  # 0..100
    assert ood_threshold(scores) == pytest.approx(95.0)
    with pytest.raises(ValueError, match="no in-distribution scores"):
        ood_threshold(torch.zeros(0))


def test_auroc_by_hand():
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 1.0
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 0.0
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == 0.5  # ties count half
    assert auroc(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 3.0])) == 0.75  # 3 of 4 pairs ordered


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images", {"x": 4}, size=32)


def ckpt_with(tmp_path: Path, threshold: float | None, bank_of: Path | None = None) -> Path:
    """A checkpoint with an OOD threshold, and the features of the images in ``bank_of`` as its
    training features (None: a checkpoint that predates OOD scores)."""
    path = tmp_path / f"model-{threshold}.safetensors"
    ood = {} if threshold is None else {"ood": {"score": "knn_cosine", "threshold": threshold, "fitted_on": "val"}}
    write_checkpoint(path, CLASSES, **ood)
    if bank_of is not None:
        clf = load_classifier(path, mixed_precision="no")
        with clf.feature_tap() as tap:
            clf.logits(torch.stack([clf.uint8_image(p) for p in sorted(bank_of.rglob("*.png"))]))
        save_tensors(sidecar(path, OOD_SIDECAR), {OOD_BANK: feature_bank(tap.features)})
    return path


def test_the_api_scores_every_image_and_marks_unknown(tmp_path: Path, images: Path):
    everything_ood = load_classifier(ckpt_with(tmp_path, -1.0, images), mixed_precision="no")
    preds = everything_ood.predict(images, min_confidence=0.0)
    assert len(preds) == 4 and all(p.unknown for p in preds)
    assert [p.ood_score for p in preds] == pytest.approx([0.0] * 4, abs=1e-2)  # the bank's own images
    nothing_ood = load_classifier(ckpt_with(tmp_path, 0.5, images), mixed_precision="no")
    assert not any(p.unknown for p in nothing_ood.predict(images, min_confidence=0.0))
    assert all(p.unknown for p in nothing_ood.predict(images, min_confidence=1.0))  # never that sure
    # Images unlike the bank's score higher than the bank's own.
    other = write_image_folder(tmp_path / "other", {"y": 4}, size=32, seed=5)
    for path in other.rglob("*.png"):
        Image.new("RGB", (32, 32), (255, 255, 255)).save(path)
    assert min(p.ood_score for p in nothing_ood.predict(other)) > max(p.ood_score for p in preds)


def test_an_old_checkpoint_abstains_on_confidence_alone(tmp_path: Path, images: Path):
    clf = load_classifier(ckpt_with(tmp_path, None), mixed_precision="no")
    preds = clf.predict(images, min_confidence=0.0)
    assert not any(p.unknown for p in preds) and all(p.ood_score is None for p in preds)
    with redirect_stdout(io.StringIO()) as printed:
        predict.main(["--ckpt", str(clf.path), str(images), "--abstain", *QUIET])
    assert "no out-of-distribution threshold" in printed.getvalue()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_predict_abstain_marks_unknown(tmp_path: Path, images: Path, suffix: str):
    ckpt = ckpt_with(tmp_path, -1.0, images)
    out = tmp_path / f"preds{suffix}"
    with redirect_stdout(io.StringIO()) as printed:
        result = predict.main(["--ckpt", str(ckpt), str(images), "--abstain", "--min-confidence", "0",
                               "--output", str(out), *QUIET])
    assert result["unknown"] == 4 and "4 of them unknown" in printed.getvalue()
    if suffix == ".csv":
        rows = list(csv.DictReader(out.open()))
        assert [r["unknown"] for r in rows] == ["1"] * 4 and all(0 <= float(r["ood_score"]) < 0.01 for r in rows)
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["unknown"] for r in rows] == [True] * 4 and all("ood_score" in r for r in rows)


def test_predict_without_abstain_scores_but_marks_nothing(tmp_path: Path, images: Path):
    out = tmp_path / "preds.csv"
    with redirect_stdout(io.StringIO()):
        result = predict.main(["--ckpt", str(ckpt_with(tmp_path, -1.0, images)), str(images), "--output", str(out),
                               *QUIET])
    rows = list(csv.DictReader(out.open()))
    assert result["unknown"] == 0 and "unknown" not in rows[0] and all(r["ood_score"] for r in rows)


def test_predict_table_shows_the_answer(tmp_path: Path, images: Path):
    with redirect_stdout(io.StringIO()) as printed:
        predict.main(["--ckpt", str(ckpt_with(tmp_path, -1.0, images)), str(images), "--abstain", *QUIET])
    assert "ood score" in printed.getvalue() and "unknown" in printed.getvalue()


@pytest.mark.slow
def test_bad_min_confidence_is_one_line_and_exit_2(tmp_path: Path, images: Path):
    proc = run_cmd(python_cmd("predict.py", "--ckpt", str(ckpt_with(tmp_path, 0.0)), str(images), "--abstain",
                              "--min-confidence", "1.5"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--min-confidence must be at most 1" in proc.stderr
