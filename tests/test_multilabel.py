"""Multi-label classification: label files with several labels per image (or one-hot columns) train a
sigmoid head with binary cross-entropy; mAP, F1 and per-class thresholds measure and decide."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT, free_port, run_cmd, train_until_stopped, write_image_folder
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score, average_precision_score, f1_score
from torch import nn

from finetune.commands import eval as eval_cmd
from finetune.commands import export as export_cmd
from finetune.commands import predict as predict_cmd
from finetune.commands import study as study_cmd
from finetune.commands import train
from finetune.data.labelfiles import choose_task, read_table, usable_rows
from finetune.data.loader import make_eval_loader, make_train_loader, target_tensor
from finetune.data.presets import ModelInput, Preprocessing
from finetune.data.shapes import SHAPE_KINDS, shapes
from finetune.data.sources import load_splits
from finetune.errors import UserError
from finetune.models.checkpoint import read_metadata
from finetune.models.inference import load_classifier
from finetune.report.metrics import (
    average_precision,
    best_f1_threshold,
    choose_thresholds,
    mean_average_precision,
    multilabel_scores,
    summarise_multilabel,
)
from finetune.training.engine import evaluate_multilabel, multilabel_hits
from finetune.training.session import SmoothedBCEWithLogits, positive_weights

SMALL = ["--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--batch-size", "16",
         "--num-workers", "0", "--log-with", "none", "--no-plots"]
EVAL = ["--num-workers", "0", "--log-with", "none"]
TIMINGS = ("images_per_s", "seconds", "rss_mib")
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port"]
CPU_ENV = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def random_scores(n: int = 60, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (some classes rare) and probabilities that follow them loosely, with ties."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, classes)) < np.linspace(0.15, 0.6, classes)).astype(np.float32)
    probs = np.clip(targets * 0.3 + rng.random((n, classes)) * 0.7, 0, 1)
    probs = np.round(probs, 1)  # ties: several images share a score
    return torch.tensor(targets), torch.tensor(probs, dtype=torch.float32)


# Metrics and thresholds against scikit-learn


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_and_map_agree_with_scikit_learn(seed: int):
    targets, probs = random_scores(seed=seed)
    for c in range(targets.shape[1]):
        assert average_precision(probs[:, c], targets[:, c] > 0) == pytest.approx(
            average_precision_score(targets[:, c].numpy(), probs[:, c].numpy()), abs=1e-9)
    assert mean_average_precision(targets, probs) == pytest.approx(
        average_precision_score(targets.numpy(), probs.numpy(), average="macro"), abs=1e-9)


def test_a_class_without_positives_has_no_ap_and_is_left_out_of_map():
    targets, probs = random_scores()
    targets[:, 0] = 0
    assert average_precision(probs[:, 0], targets[:, 0] > 0) is None
    expected = np.mean([average_precision_score(targets[:, c].numpy(), probs[:, c].numpy()) for c in (1, 2, 3)])
    assert mean_average_precision(targets, probs) == pytest.approx(expected, abs=1e-9)
    summary = summarise_multilabel(["a", "b", "c", "d"], targets, probs)
    assert summary["per_class"]["a"]["ap"] is None and summary["per_class"]["a"]["support"] == 0


@pytest.mark.parametrize("seed", [0, 3])
def test_f1_and_exact_match_agree_with_scikit_learn(seed: int):
    targets, probs = random_scores(seed=seed)
    thresholds = [0.5, 0.35, 0.65, 0.45]
    predicted = (probs >= torch.tensor(thresholds)).numpy()
    scores = multilabel_scores(targets, probs, thresholds)
    assert scores["micro_f1"] == pytest.approx(f1_score(targets.numpy(), predicted, average="micro", zero_division=0))
    assert scores["macro_f1"] == pytest.approx(f1_score(targets.numpy(), predicted, average="macro", zero_division=0))
    assert scores["exact_match"] == pytest.approx(accuracy_score(targets.numpy(), predicted))
    per_class = summarise_multilabel(list("abcd"), targets, probs, thresholds)["per_class"]
    for c, name in enumerate("abcd"):
        assert per_class[name]["f1"] == pytest.approx(f1_score(targets[:, c].numpy(), predicted[:, c], zero_division=0))
        assert per_class[name]["threshold"] == thresholds[c]


@pytest.mark.parametrize("seed", [0, 1, 4])
def test_each_threshold_maximises_its_class_f1_on_the_split_it_was_chosen_on(seed: int):
    targets, probs = random_scores(seed=seed)
    thresholds = choose_thresholds(targets, probs)
    for c, t in enumerate(thresholds):
        y, s = targets[:, c].numpy(), probs[:, c].numpy()
        best = max(f1_score(y, s >= cut, zero_division=0) for cut in np.unique(s))
        assert f1_score(y, s >= t, zero_division=0) == pytest.approx(best)
        assert s[s < t].size == 0 or t > s[s < t].max()  # halfway between two scores: a margin each way


def test_a_class_without_positives_keeps_the_default_threshold():
    assert best_f1_threshold(torch.tensor([0.9, 0.1]), torch.tensor([False, False])) == 0.5


# Data: task choice, multi-hot targets, splits


def write_shapes(root: Path, n: int = 40, **kwargs) -> Path:
    return shapes(root, n=n, size=32, **kwargs)


def test_auto_task_says_which_and_why(tmp_path: Path):
    several = write_shapes(tmp_path / "a")
    table = read_table(several)
    task, why = choose_task(table, usable_rows(table))
    assert task == "multilabel" and "line 2 has several labels" in why
    onehot = read_table(write_shapes(tmp_path / "b", onehot=True))
    assert choose_task(onehot, onehot.rows) == ("multilabel", "labels.csv has one 0/1 column per class")
    write_image_folder(tmp_path / "c" / "images", {"cat": 3, "dog": 3})
    single = tmp_path / "c" / "l.csv"
    single.write_text("image,label\n" + "".join(f"images/{c}/{i:03d}.png,{c}\n" for c in ("cat", "dog")
                                                 for i in range(3)))
    table = read_table(single)
    assert choose_task(table, table.rows) == ("single", "every row of l.csv has one label")
    assert load_splits(single).task == "single"
    assert load_splits(single, task="multilabel").task == "multilabel"  # asked for: sigmoid outputs anyway


def test_multilabel_targets_are_tuples_carried_as_multi_hot_vectors(tmp_path: Path):
    file = write_shapes(tmp_path, n=30)
    lines = file.read_text().splitlines()
    lines[1] = lines[1].split(",")[0] + ","  # the first image has no label: a negative of every class
    file.write_text("\n".join(lines) + "\n")
    splits = load_splits(file, test_fraction=0.2)
    assert splits.task == "multilabel" and splits.classes == sorted(SHAPE_KINDS)
    assert len(splits.test) == 6 and len(splits.train) == 24  # a fifth of all images, not of each label set
    everything = {p: t for part in (splits.train, splits.test) for p, t in part.samples}
    assert everything[str(tmp_path / "images" / "0000.png")] == ()
    assert all(isinstance(t, tuple) for t in everything.values())
    assert target_tensor((0, 3), 5).tolist() == [1.0, 0.0, 0.0, 1.0, 0.0] and target_tensor(2, 5) == 2
    pre = Preprocessing(32, 32, (0.5,) * 3, (0.5,) * 3)
    images, targets, _ = next(iter(make_eval_loader(splits.test, pre, batch_size=4, num_workers=0)))
    assert targets.dtype == torch.float32 and targets.shape == (4, 5)
    assert [tuple(int(i) for i in row.nonzero()) for row in targets] == [t for _, t in splits.test.samples[:4]]
    loader = make_train_loader(splits.train, pre, batch_size=8, seed=0, num_workers=0, augment="none")
    assert next(iter(loader))[1].shape == (8, 5)


def test_single_label_data_cannot_be_forced_wrong(tmp_path: Path):
    write_image_folder(tmp_path / "data", {"cat": 3, "dog": 3})
    with pytest.raises(UserError, match="--task multilabel needs a label file"):
        load_splits(tmp_path / "data", task="multilabel")
    with pytest.raises(UserError, match="has several labels .* which --task single refuses"):
        load_splits(write_shapes(tmp_path / "s"), task="single")


def test_a_one_hot_file_keeps_every_column_as_a_class(tmp_path: Path):
    file = write_shapes(tmp_path, onehot=True, n=20)
    lines = file.read_text().splitlines()
    lines[0] += ",star"
    lines[1:] = [line + ",0" for line in lines[1:]]
    file.write_text("\n".join(lines) + "\n")
    splits = load_splits(file)
    assert splits.classes == sorted([*SHAPE_KINDS, "star"])
    assert any("class 'star' has no image in the train rows" in w for w in splits.warnings)


# Loss, training accuracy and evaluation


def test_loss_is_binary_cross_entropy_with_smoothing_and_positive_weights():
    logits, targets = torch.randn(6, 3), torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0]] * 2, dtype=torch.float32)
    assert SmoothedBCEWithLogits()(logits, targets) == pytest.approx(
        nn.functional.binary_cross_entropy_with_logits(logits, targets).item())
    smoothed = targets * 0.8 + 0.1
    assert SmoothedBCEWithLogits(0.2)(logits, targets) == pytest.approx(
        nn.functional.binary_cross_entropy_with_logits(logits, smoothed).item())
    weights = positive_weights([(0,), (0, 1), ()], 3)
    assert weights.tolist() == pytest.approx([0.5, 2.0, 1.0])  # negatives / positives; 1 without positives
    assert int(multilabel_hits(torch.tensor([[2.0, -1.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))) == 1


def test_evaluate_multilabel_gives_every_image_once_with_probabilities(tmp_path: Path):
    splits = load_splits(write_shapes(tmp_path, n=20), test_fraction=0.5)
    pre = Preprocessing(32, 32, (0.5,) * 3, (0.5,) * 3)
    loader = make_eval_loader(splits.test, pre, batch_size=3, num_workers=0)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5))
    preds = evaluate_multilabel(Accelerator(cpu=True), model, loader, 5, to_input=ModelInput(pre.mean, pre.std))
    assert preds.indices.tolist() == list(range(len(splits.test)))
    assert preds.targets.shape == preds.probabilities.shape == (len(splits.test), 5)
    assert ((preds.probabilities > 0) & (preds.probabilities < 1)).all()
    assert preds.score == preds.map == mean_average_precision(preds.targets, preds.probabilities)
    assert 0 <= preds.accuracy <= 1 and preds.mean_loss > 0


# End to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, train.TrainResult]:
    """A multi-label run of two epochs on shapes with a split column (train, val, test): its label file, run folder and result."""
    root = tmp_path_factory.mktemp("multilabel")
    file = write_shapes(root / "data", n=48, split=True)
    result = train.main(["--data", str(file), "--output-dir", str(root / "run"), *SMALL, "--epochs", "2"])
    return file, root / "run", result


@pytest.mark.slow
def test_a_multilabel_label_file_trains_and_records_task_and_thresholds(trained):
    _, run, result = trained
    row = result.final
    assert {"train_loss", "train_acc", "val_map", "test_map", "test_f1", "test_acc", "test_loss"} <= set(row)
    assert 0 < row["test_map"] <= 1 and 0 <= row["test_f1"] <= 1
    for name in ("model", "best"):
        meta = read_metadata(run / f"{name}.safetensors")
        assert meta["task"] == "multilabel" and meta["classes"] == sorted(SHAPE_KINDS)
        assert len(meta["thresholds"]) == 5 and all(0 <= t <= 1 for t in meta["thresholds"])
    assert read_metadata(run / "model.safetensors")["metrics"]["test_map"] == pytest.approx(row["test_map"])
    best = max(result.history, key=lambda r: r["val_map"])  # the first of equals: only a better one replaces it
    assert read_metadata(run / "best.safetensors")["metrics"]["epoch"] == best["epoch"]


@pytest.mark.slow
def test_eval_reports_map_f1_and_pictures_at_the_checkpoint_thresholds(trained, tmp_path: Path):
    file, run, result = trained
    metrics = eval_cmd.main(["--ckpt", str(run / "model.safetensors"), "--output-dir", str(tmp_path), *EVAL])
    assert metrics["num_samples"] == 9 and metrics["task"] == "multilabel"  # the test rows, recorded
    assert metrics["map"] == pytest.approx(result.final["test_map"], abs=1e-6)
    assert metrics["micro_f1"] == pytest.approx(result.final["test_f1"], abs=1e-6)
    assert metrics["thresholds"] == read_metadata(run / "model.safetensors")["thresholds"]
    assert set(metrics["per_class"]) == set(SHAPE_KINDS)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["map"] == metrics["map"]
    for name in ("average_precision", "false_positives", "false_negatives"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert len(rows) == 9 and {"path", "true", "predicted", "correct", "p(circle)"} <= set(rows[0])
    exact = sum(int(r["correct"]) for r in rows) / len(rows)
    assert exact == pytest.approx(metrics["exact_match"])
    given = eval_cmd.main(["--ckpt", str(run / "model.safetensors"), "--data", str(file),
                           "--output-dir", str(tmp_path / "given"), *EVAL])
    assert given["map"] == metrics["map"]


@pytest.mark.slow
def test_predict_and_the_api_give_the_labels_over_their_thresholds(trained, tmp_path: Path):
    file, run, _ = trained
    clf = load_classifier(run / "model.safetensors")
    assert clf.multilabel and len(clf.thresholds) == 5
    paths = sorted((file.parent / "images").glob("*.png"))[:6]
    expected = []
    for path in paths:
        probs = clf.probabilities(clf.logits(clf.uint8_image(path)[None]))[0].tolist()
        over = [c for c, p, t in zip(clf.classes, probs, clf.thresholds) if p >= t]
        expected.append(sorted(over, key=lambda c: -probs[clf.classes.index(c)]))
    found = clf.predict(paths, top_k=1)  # top_k does not cut a multi-label answer
    assert [p.classes for p in found] == expected
    assert all(p.probabilities == sorted(p.probabilities, reverse=True) for p in found)
    predict_cmd.main(["--ckpt", str(run / "model.safetensors"), *map(str, paths), "--output", str(tmp_path / "p.csv")])
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [r["labels"].split(";") if r["labels"] else [] for r in rows] == expected
    predict_cmd.main(["--ckpt", str(run / "model.safetensors"), *map(str, paths), "--output", str(tmp_path / "p.jsonl")])
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [line["classes"] for line in lines] == expected
    assert [line["probabilities"] for line in lines] == [[round(p, 6) for p in f.probabilities] for f in found]


@pytest.mark.slow
def test_one_hot_layout_trains_without_a_validation_split_at_threshold_one_half(tmp_path: Path):
    file = write_shapes(tmp_path / "data", n=40, onehot=True)
    result = train.main(["--data", str(file), "--output-dir", str(tmp_path / "run"), *SMALL, "--epochs", "1",
                         "--label-smoothing", "0.1", "--class-weights", "auto"])
    assert "test_map" in result.final and "val_map" not in result.final
    meta = read_metadata(tmp_path / "run" / "model.safetensors")
    assert meta["task"] == "multilabel" and meta["thresholds"] == [0.5] * 5
    assert meta["config"]["task"] == "multilabel"


@pytest.mark.slow
def test_export_records_task_and_thresholds_and_checks_the_labels(trained, tmp_path: Path):
    pytest.importorskip("onnxruntime")
    import onnx

    _, run, _ = trained
    found = export_cmd.main(["--ckpt", str(run / "model.safetensors"), "--format", "onnx",
                             "--output", str(tmp_path / "m.onnx")])
    assert found["agreement"].ok and found["agreement"].same_top1 == found["agreement"].images
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert props["task"] == "multilabel"
    assert json.loads(props["thresholds"]) == pytest.approx(read_metadata(run / "model.safetensors")["thresholds"])


@pytest.mark.slow
def test_a_stopped_multilabel_run_resumes_to_the_uninterrupted_weights(tmp_path: Path, monkeypatch):
    file = write_shapes(tmp_path / "data", n=40, split=True)
    args = ["--data", str(file), *SMALL, "--epochs", "2", "--batch-size", "8"]  # 24 train images: 3 steps an epoch
    train_until_stopped([*args, "--output-dir", str(tmp_path / "run")], monkeypatch, optimizer_step=4)
    with contextlib.redirect_stdout(io.StringIO()):
        resumed = train.main([*args, "--output-dir", str(tmp_path / "run"), "--resume"])
        reference = train.main([*args, "--output-dir", str(tmp_path / "ref")])
    a, b = (load_file(str(r.run_dir / "model.safetensors")) for r in (reference, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history == [{**row, **{k: resumed.history[i][k] for k in TIMINGS}}
                               for i, row in enumerate(reference.history)]
    assert read_metadata(tmp_path / "run" / "model.safetensors")["thresholds"] == \
        read_metadata(tmp_path / "ref" / "model.safetensors")["thresholds"]


@pytest.mark.slow
def test_two_processes_count_each_image_once(tmp_path: Path):
    file = write_shapes(tmp_path / "data", n=33, split=True)  # 6 test images, 7 val: odd for 2 processes
    run = tmp_path / "run"
    proc = run_cmd([*ACCELERATE, str(free_port()), str(ROOT / "train.py"), "--data", str(file),
                    "--output-dir", str(run), *SMALL, "--batch-size", "4", "--epochs", "1"], env=CPU_ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stdout and "task: multi-label" in proc.stdout
    assert read_metadata(run / "model.safetensors")["metrics"]["num_test_samples"] == 6
    out2, out1 = tmp_path / "eval2", tmp_path / "eval1"
    eval_args = [str(ROOT / "eval.py"), "--ckpt", str(run / "model.safetensors"), "--batch-size", "4",
                 "--num-workers", "0", "--log-with", "none", "--no-plots"]
    proc = run_cmd([*ACCELERATE, str(free_port()), *eval_args, "--output-dir", str(out2)], env=CPU_ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cmd([sys.executable, *eval_args, "--output-dir", str(out1)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    m2, m1 = (json.loads((o / "metrics.json").read_text()) for o in (out2, out1))
    assert m2["num_samples"] == m1["num_samples"] == 6
    assert m2["map"] == pytest.approx(m1["map"]) and m2["micro_f1"] == pytest.approx(m1["micro_f1"])
    assert {c: row["support"] for c, row in m2["per_class"].items()} == \
        {c: row["support"] for c, row in m1["per_class"].items()}
    paths = [line.split(",")[0] for line in (out2 / "predictions.csv").read_text().splitlines()[1:]]
    assert len(paths) == len(set(paths)) == 6


def test_check_data_reads_a_multilabel_file(tmp_path: Path):
    file = write_shapes(tmp_path, n=20)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        train.main(["--data", str(file), "--check-data"])
    assert "no problems that stop a run" in out.getvalue()
    (tmp_path / "images" / "0003.png").unlink()
    with pytest.raises(UserError, match="cannot be used"), contextlib.redirect_stdout(io.StringIO()):
        train.main(["--data", str(file), "--check-data"])


@pytest.mark.slow
def test_bad_data_skip_leaves_out_a_missing_image_of_a_multilabel_file(tmp_path: Path):
    file = write_shapes(tmp_path, n=30)
    (tmp_path / "images" / "0003.png").unlink()
    with pytest.raises(UserError, match=r"0003.png \(not found, listed at labels.csv line 5\)"):
        train.main(["--data", str(file), "--output-dir", str(tmp_path / "a"), *SMALL])
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = train.main(["--data", str(file), "--output-dir", str(tmp_path / "b"), *SMALL, "--bad-data", "skip"])
    assert "left out 1 image(s)" in out.getvalue() and "test_map" in result.final


@pytest.mark.slow
def test_a_study_of_a_multilabel_file_ranks_by_map(tmp_path: Path):
    file = write_shapes(tmp_path / "data", n=32)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        results = study_cmd.main(["--data", str(file), "--model", "mobilenet_v3_small", "--weights", "none",
                                  "--epochs", "1", "--image-size", "32", "--batch-size", "8", "--num-workers", "0",
                                  "--strategies", "scratch,linear-probe", "--output-dir", str(tmp_path / "study")])
    records = json.loads((tmp_path / "study" / "study.json").read_text())["strategies"]
    assert [r["metric"] for r in records] == ["mAP", "mAP"]
    assert all(r["test_accuracy"] == r["history"][-1]["test_map"] for r in records)
    assert "scratch: test mAP" in out.getvalue() and results
