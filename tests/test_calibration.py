"""Calibrated probabilities: temperature fitting, ECE and NLL, and the temperature applied wherever a
probability is shown (the API, eval.py, predict.py, exported files' metadata)."""

from __future__ import annotations

import csv
import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from conftest import FAST, python_cmd, run_cmd, write_checkpoint, write_image_folder
from PIL import Image

from finetune.commands import eval as eval_cmd
from finetune.commands import predict
from finetune.data.sources import load_splits
from finetune.models.calibration import (
    OOD_BANK,
    OOD_SIDECAR,
    Calibration,
    calibration_meta,
    expected_calibration_error,
    feature_bank,
    fit_temperature,
    nll,
    reliability,
)
from finetune.models.checkpoint import load_safetensors, read_metadata, sidecar
from finetune.models.export import export_metadata
from finetune.models.inference import load_classifier
from finetune.report.plots import RELIABILITY_SIZE, reliability_png
from finetune.training.calibrate import calibrate_run
from finetune.utils.files import atomic_link, atomic_write_text

CLASSES = ["cat", "dog", "hot dog"]
QUIET = ["--num-workers", "0", "--mixed-precision", "no"]
TEMPERATURE = 2.5


def test_fitting_recovers_a_known_temperature():
    """Labels drawn from softmax(z); the network's logits are z x 2.5 (overconfident): T = 2.5."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 5, generator=gen) * 2
    targets = torch.multinomial(z.softmax(1), 1, generator=gen).squeeze(1)
    t = fit_temperature(z * TEMPERATURE, targets)
    assert t == pytest.approx(TEMPERATURE, rel=0.05)
    assert nll(z * TEMPERATURE, targets, t) < nll(z * TEMPERATURE, targets)


def test_a_validation_split_without_mistakes_never_sharpens():
    logits, targets = torch.tensor([[3.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1])
    assert fit_temperature(logits, targets) < 1  # the NLL alone would sharpen without end
    assert calibration_meta(logits, targets, None, None)["calibration"]["temperature"] == 1.0


def test_fitting_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="N x C logits and N targets"):
        fit_temperature(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))


def test_ece_by_hand():
    # Top confidences 0.9 (right), 0.92 (wrong), 0.6 (wrong), 0.7 (right), 0.8 (right). With 15 bins
    # 0.9 and 0.92 share (0.867, 0.933]: mean confidence 0.91, accuracy 0.5.
    probs = torch.tensor([[0.9, 0.1], [0.08, 0.92], [0.4, 0.6], [0.3, 0.7], [0.8, 0.2]])
    targets = torch.tensor([0, 0, 0, 1, 0])
    expected = (2 * abs(0.5 - 0.91) + abs(0 - 0.6) + abs(1 - 0.7) + abs(1 - 0.8)) / 5
    assert expected_calibration_error(probs, targets) == pytest.approx(expected)
    table = reliability(probs, targets)
    assert sum(table["count"]) == 5 and table["count"][13] == 2 and table["accuracy"][13] == 0.5


def test_nll_by_hand():
    logits, targets = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    by_hand = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(0.5))) / 2  # T = 2: logits 1, 0 and 0, 0.5
    assert nll(logits, targets, 2.0) == pytest.approx(by_hand)


def test_checkpoint_without_calibration_is_neutral():
    cal = Calibration.of({})
    assert (cal.temperature, cal.ood_threshold, cal.calibrated) == (1.0, None, False)
    assert Calibration.of({"calibration": {"temperature": -3}}).temperature == 1.0  # nonsense: ignored


def test_calibration_meta_records_what_was_fitted():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 3, generator=gen) * 4
    targets = torch.randint(0, 3, (200,), generator=gen)
    meta = calibration_meta(logits, targets, torch.rand(200, generator=gen), "val")
    assert meta["calibration"]["fitted_on"] == "val" and meta["calibration"]["temperature"] > 1  # random labels
    assert meta["calibration"]["val_nll_after"] <= meta["calibration"]["val_nll_before"]
    assert meta["ood"]["score"] == "knn_cosine" and meta["ood"]["fitted_on"] == "val"
    assert 0.9 < meta["ood"]["threshold"] < 1.0  # the 95th percentile of uniform scores
    assert calibration_meta(None, None, None, None) == {}


def test_reliability_png_decodes_at_its_size():
    table = reliability(torch.tensor([[0.9, 0.1], [0.3, 0.7]]), torch.tensor([0, 0]))
    png = reliability_png({"softmax": table, "calibrated": table}, "reliability on 2 images")
    with Image.open(io.BytesIO(png)) as img:
        img.load()
        assert img.size == (int(RELIABILITY_SIZE[0] * 100), int(RELIABILITY_SIZE[1] * 100))


@pytest.fixture
def calibrated_ckpt(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "model.safetensors", CLASSES,
                            calibration={"temperature": TEMPERATURE, "fitted_on": "val"})


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images", {"x": 5}, size=32)


def test_the_api_divides_by_the_temperature(calibrated_ckpt: Path, images: Path):
    clf = load_classifier(calibrated_ckpt, mixed_precision="no")
    raw = load_classifier(calibrated_ckpt, mixed_precision="no", calibrated=False)
    assert (clf.temperature, raw.temperature) == (TEMPERATURE, 1.0)
    batch = torch.stack([clf.uint8_image(p) for p in sorted(images.rglob("*.png"))])
    logits = clf.logits(batch)
    got = clf.predict(images, top_k=3)
    want = (logits / TEMPERATURE).softmax(1).sort(dim=1, descending=True).values
    assert torch.tensor([p.probabilities for p in got]) == pytest.approx(want, abs=1e-5)
    want_raw = logits.softmax(1).sort(dim=1, descending=True).values
    assert torch.tensor([p.probabilities for p in raw.predict(images, top_k=3)]) == pytest.approx(want_raw, abs=1e-5)


def test_predict_shows_calibrated_probabilities_unless_told(calibrated_ckpt: Path, images: Path, tmp_path: Path):
    want = load_classifier(calibrated_ckpt, mixed_precision="no").predict(images)
    for flag, clf_calibrated in (([], True), (["--no-calibration"], False)):
        out = tmp_path / f"preds{len(flag)}.csv"
        with redirect_stdout(io.StringIO()) as printed:
            predict.main(["--ckpt", str(calibrated_ckpt), str(images), "--output", str(out), *QUIET, *flag])
        rows = list(csv.DictReader(out.open()))
        expected = want if clf_calibrated else load_classifier(calibrated_ckpt, mixed_precision="no",
                                                               calibrated=False).predict(images)
        assert [float(r["probability_1"]) for r in rows] == pytest.approx([p.probabilities[0] for p in expected],
                                                                          abs=1e-4)
        assert ("calibrated, temperature 2.500" in printed.getvalue()) == clf_calibrated
        assert ("raw softmax (--no-calibration)" in printed.getvalue()) != clf_calibrated


def test_eval_reports_ece_and_nll_and_applies_the_temperature(calibrated_ckpt: Path, tmp_path: Path):
    data = write_image_folder(tmp_path / "test", {c: 4 for c in CLASSES}, size=32)
    for flag, applied in (([], True), (["--no-calibration"], False)):
        out = tmp_path / f"eval{len(flag)}"
        with redirect_stdout(io.StringIO()) as printed:
            metrics = eval_cmd.main(["--ckpt", str(calibrated_ckpt), "--data", str(data), "--output-dir", str(out),
                                     "--log-with", "none", *QUIET, *flag])
        cal = metrics["calibration"]
        assert cal["applied"] is applied and cal["temperature"] == TEMPERATURE and cal["bins"] == 15
        assert {"ece_before", "ece_after", "nll_before", "nll_after"} <= set(cal)
        assert json.loads((out / "metrics.json").read_text())["calibration"]["ece_after"] == cal["ece_after"]
        raw = load_classifier(calibrated_ckpt, mixed_precision="no", calibrated=not flag)
        want = {p.source: p.probabilities[0] for p in raw.predict(data)}
        got = {r["path"]: float(r["confidence"]) for r in csv.DictReader((out / "predictions.csv").open())}
        assert got == pytest.approx(want, abs=1e-4)
        assert "ECE" in printed.getvalue() and "NLL" in printed.getvalue()
        with Image.open(out / "reliability.png") as img:
            assert img.size == (int(RELIABILITY_SIZE[0] * 100), int(RELIABILITY_SIZE[1] * 100))


def test_eval_of_an_uncalibrated_checkpoint_says_how_to_calibrate(tmp_path: Path):
    ckpt = write_checkpoint(tmp_path / "model.safetensors", CLASSES)
    data = write_image_folder(tmp_path / "test", {c: 2 for c in CLASSES}, size=32)
    with redirect_stdout(io.StringIO()) as printed:
        metrics = eval_cmd.main(["--ckpt", str(ckpt), "--data", str(data), "--output-dir", str(tmp_path / "e"),
                                 "--log-with", "none", "--no-plots", *QUIET])
    assert metrics["calibration"]["applied"] is False
    assert "uncalibrated softmax" in printed.getvalue() and "--val-fraction 0.1" in printed.getvalue()


def test_export_metadata_records_the_temperature(calibrated_ckpt: Path):
    meta = export_metadata(load_classifier(calibrated_ckpt, mixed_precision="no"))
    assert meta["temperature"] == TEMPERATURE and "softmax(logits / temperature)" in meta["output"]
    assert export_metadata(load_classifier(write_checkpoint(calibrated_ckpt.parent / "plain.safetensors", CLASSES),
                                           mixed_precision="no"))["temperature"] == 1.0


@pytest.mark.slow
def test_a_run_with_a_validation_split_records_its_temperature(tiny_data: Path, tmp_path: Path):
    out = tmp_path / "run"
    proc = run_cmd(python_cmd("train.py", "--data", str(tiny_data), *FAST, "--val-fraction", "0.25",
                              "--output-dir", str(out), "--log-with", "none", "--no-plots"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("model.safetensors", "best.safetensors"):
        meta = read_metadata(out / name)
        assert meta["calibration"]["fitted_on"] == "val" and meta["calibration"]["temperature"] > 0
        assert meta["ood"]["threshold"] is not None
        bank = load_safetensors(sidecar(out / name, OOD_SIDECAR))[OOD_BANK]  # beside the weights, not in them
        assert bank.shape[0] == 27  # the training images' features (36 - 9 val)
        assert not any(k.startswith("train_features") for k in load_safetensors(out / name))
    assert "temperature" in proc.stdout and "uncalibrated" not in proc.stdout
    # One epoch: best.safetensors and its OOD file are second names of model.safetensors's, fitted once.
    for first, second in ((out / "model.safetensors", out / "best.safetensors"),
                          (sidecar(out / "model.safetensors", OOD_SIDECAR), sidecar(out / "best.safetensors", OOD_SIDECAR))):
        assert first.stat().st_ino == second.stat().st_ino


def test_a_second_name_of_a_file_keeps_its_bytes_when_the_first_is_written_again(tmp_path: Path):
    first, second = tmp_path / "model.safetensors", tmp_path / "best.safetensors"
    atomic_write_text(first, "epoch 1")
    second.write_text("epoch 0")
    assert atomic_link(first, second) and second.read_text() == "epoch 1"
    atomic_write_text(first, "epoch 2")  # files are replaced by renaming: the second name keeps epoch 1
    assert (first.read_text(), second.read_text()) == ("epoch 2", "epoch 1")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary name left


@pytest.mark.slow
def test_a_run_without_a_validation_split_says_its_probabilities_are_uncalibrated(tiny_data: Path, tmp_path: Path):
    out = tmp_path / "run"
    proc = run_cmd(python_cmd("train.py", "--data", str(tiny_data), *FAST, "--output-dir", str(out),
                              "--log-with", "none", "--no-plots"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "uncalibrated" in proc.stdout and "--val-fraction 0.1" in proc.stdout
    meta = read_metadata(out / "model.safetensors")
    assert "calibration" not in meta and meta["ood"]["fitted_on"] == "train"


def test_calibrating_two_epochs_checkpoints_in_one_pass_fits_each_on_its_own_features(tmp_path: Path):
    data = tmp_path / "data"
    for split, n in (("train", 5), ("val", 3), ("test", 2)):
        write_image_folder(data / split, {c: n for c in CLASSES}, size=32, seed=len(split))
    splits = load_splits(data, frozenset(), test_fraction=0.2, val_fraction=0.0, split_seed=0, columns=None,
                         task="auto")
    run = tmp_path / "run"
    run.mkdir()
    # best.safetensors from epoch 1, model.safetensors from epoch 2: other weights, so their own fits.
    write_checkpoint(run / "best.safetensors", CLASSES, seed=1, metrics={"epoch": 1})
    write_checkpoint(run / "model.safetensors", CLASSES, seed=2, metrics={"epoch": 2})
    lines = calibrate_run(run, splits, device="cpu", batch_size=4, num_workers=0)
    assert [line.split(":")[0] for line in lines] == ["model.safetensors", "best.safetensors"]
    for name in ("model.safetensors", "best.safetensors"):
        clf = load_classifier(run / name, fold_batchnorm=True)  # as calibrate_run loads it
        features = []
        with clf.feature_tap() as tap, clf.autocast():
            for path in sorted((data / "train").rglob("*.png")):
                clf.logits(clf.uint8_image(path)[None])
                features.append(tap.features)
        own = feature_bank(torch.cat(features))
        assert torch.allclose(clf.ood_bank.float(), own.float(), atol=2e-3), name
        assert read_metadata(run / name)["calibration"]["images"] == 9
    assert (run / "model.safetensors").stat().st_ino != (run / "best.safetensors").stat().st_ino
