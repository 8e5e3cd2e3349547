"""eval.py as a user calls it: a run folder as --ckpt, many classes, output cut short by a pipe."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, ROOT, write_image_folder

import eval as eval_cmd
import train
from finetune.errors import UserError


@pytest.fixture(scope="module")
def many_classes_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("many")
    classes = {f"c{i:02d}": 2 for i in range(31)}
    write_image_folder(root / "data" / "train", classes, size=8)
    write_image_folder(root / "data" / "test", {k: 1 for k in classes}, size=8, seed=1)
    with contextlib.redirect_stdout(io.StringIO()):
        result = train.main(["--data", str(root / "data"), "--output-dir", str(root / "run"), *FAST,
                             "--log-with", "none", "--no-plots"])
    return result.run_dir, root / "data"


def test_a_run_folder_is_its_model_and_a_wide_matrix_is_explained(many_classes_run, tmp_path: Path):
    run, data = many_classes_run
    with contextlib.redirect_stdout(io.StringIO()) as out:
        metrics = eval_cmd.main(["--ckpt", str(run), "--data", str(data), "--num-workers", "0",
                                 "--output-dir", str(tmp_path / "e")])
    assert metrics["checkpoint"] == str(run / "model.safetensors")
    assert "confusion matrix: 31 classes are too many to print; it is in metrics.json" in out.getvalue()
    assert len(metrics["confusion_matrix"]) == 31


def test_a_folder_without_a_model_is_one_clear_error(tmp_path: Path):
    with pytest.raises(UserError, match="is a folder without model.safetensors"):
        eval_cmd.main(["--ckpt", str(tmp_path), "--data", str(tmp_path)])


@pytest.mark.slow
def test_output_cut_short_by_a_pipe_still_writes_the_metrics(many_classes_run, tmp_path: Path):
    run, data = many_classes_run
    out = tmp_path / "e"
    # `true` reads nothing and exits: every write to the pipe fails (head -1 would be a race).
    command = (f"{sys.executable} {ROOT / 'eval.py'} --ckpt {run} --data {data} --num-workers 0 "
               f"--output-dir {out} | true; echo status ${{PIPESTATUS[0]}}")
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "status 0", proc.stdout + proc.stderr
    assert (out / "metrics.json").is_file() and (out / "predictions.csv").is_file()


def test_eval_agrees_with_the_training_test_pass(tiny_data: Path, tmp_path: Path):
    """Training printed 0.6944 and eval.py 0.6111 for one checkpoint: eval folded BatchNorm (in bf16).

    By default eval.py now runs the numerics of the training's own test pass: the precision it
    recorded, no folding. The reference is that test pass (engine.evaluate on the model as
    Accelerate prepared it for training); the confidences must agree to the CSV's last digit.
    """
    import csv

    import torch

    from finetune.data.folders import image_folder
    from finetune.data.loader import make_eval_loader
    from finetune.data.presets import ModelInput
    from finetune.models.inference import load_classifier
    from finetune.training.engine import evaluate
    from finetune.utils.runtime import build_accelerator

    with contextlib.redirect_stdout(io.StringIO()):
        result = train.main(["--data", str(tiny_data), "--output-dir", str(tmp_path / "run"), *FAST,
                             "--mixed-precision", "bf16", "--log-with", "none", "--no-plots"])
        metrics = eval_cmd.main(["--ckpt", str(result.run_dir), "--data", str(tiny_data), "--num-workers", "0",
                                 "--output-dir", str(tmp_path / "e"), "--no-plots", "--log-with", "none"])
    clf = load_classifier(result.run_dir)
    assert clf.meta["precision"] == "bf16"
    assert metrics["accuracy"] == result.history[-1]["test_acc"]

    accelerator = build_accelerator(clf.meta["precision"])
    test = image_folder(tiny_data / "test", clf.classes)
    model, loader = accelerator.prepare(clf.model.to(memory_format=torch.channels_last),
                                        make_eval_loader(test, clf.preprocessing, batch_size=8, num_workers=0))
    mean, std = clf.preprocessing.mean, clf.preprocessing.std
    reference = evaluate(accelerator, model, loader, len(clf.classes), to_input=ModelInput(mean, std, True))
    with open(tmp_path / "e" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["confidence"]) for r in rows] == pytest.approx(reference.confidence.tolist(), abs=6e-7)
