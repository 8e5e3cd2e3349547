"""train.py and eval.py end to end: as subprocesses a user would run, and in-process for the flags."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, python_cmd, run_cmd, train_until_stopped, write_image_folder, write_truncated_jpeg
from safetensors import safe_open
from safetensors.torch import load_file

from finetune.commands import eval as eval_cmd
from finetune.commands import train
from finetune.errors import UserError
from finetune.models.checkpoint import read_metadata


def quiet_train(argv: list[str]) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return train.main(argv)


@pytest.mark.slow
def test_train_then_eval_as_a_user_would(tiny_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    proc = run_cmd(python_cmd("train.py", "--data", str(tiny_data), "--output-dir", str(run), *FAST, "--epochs", "2"))
    assert proc.returncode == 0, proc.stderr
    assert "python eval.py --ckpt" in proc.stdout
    for name in ("model.safetensors", "best.safetensors", "config.yaml", "state/progress.json"):
        assert (run / name).is_file(), name
    meta = read_metadata(run / "model.safetensors")
    assert meta["arch"] == "mobilenet_v3_small" and meta["classes"] == ["cat", "dog", "hot dog"]
    assert (meta["image_size"], meta["resize_size"]) == (32, 37)
    assert meta["config"]["epochs"] == 2 and meta["weights"] == "none"
    assert {"torch", "torchvision", "accelerate"} <= meta["versions"].keys()
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in f.keys())

    out = tmp_path / "eval"
    proc = run_cmd(python_cmd("eval.py", "--ckpt", str(run / "model.safetensors"), "--data", str(tiny_data / "test"),
                              "--output-dir", str(out), "--num-workers", "0"))
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout and "confusion matrix" in proc.stdout and "precision" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 15 and 0 <= metrics["accuracy"] <= 1
    assert metrics["accuracy"] == pytest.approx(meta["metrics"]["test_accuracy"])
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 15 and {r["true"] for r in rows} == {"cat", "dog", "hot dog"}


def test_top5_is_reported_with_more_than_five_classes(tmp_path: Path):
    data = tmp_path / "data"
    classes = {f"c{i}": 3 for i in range(7)}
    write_image_folder(data / "train", classes)
    write_image_folder(data / "test", {k: 1 for k in classes}, seed=1)
    result = quiet_train(["--data", str(data), "--output-dir", str(tmp_path / "run"), *FAST])
    with contextlib.redirect_stdout(io.StringIO()) as out:
        metrics = eval_cmd.main(["--ckpt", str(result.run_dir / "model.safetensors"), "--data", str(data),
                                 "--num-workers", "0"])
    assert 0 <= metrics["top5_accuracy"] <= 1 and metrics["top5_accuracy"] >= metrics["accuracy"]
    assert "top-5 accuracy" in out.getvalue()


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/data"], "data folder not found: /nonexistent/data"),
    (["--epochs", "zero"], "argument --epochs: must be a whole number, got 'zero'"),
    (["--model", "resnet99"], "unknown model 'resnet99'"),
])
def test_train_bad_input_is_one_line_and_nonzero_exit(args: list[str], message: str):
    proc = run_cmd(python_cmd("train.py", *args))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_image_that_fails_only_when_decoded_in_a_worker_is_named(tiny_data: Path, tmp_path: Path):
    # Its header is intact, so the quick preflight passes it; the worker's decode fails.
    bad = write_truncated_jpeg(tiny_data / "train" / "cat" / "broken.jpg")
    proc = run_cmd(python_cmd("train.py", "--data", str(tiny_data), "--output-dir", str(tmp_path / "r"),
                              *FAST, "--num-workers", "1"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"cannot decode image {bad}" in proc.stderr


@pytest.mark.slow
def test_eval_refuses_other_classes_and_bad_checkpoints(tiny_data: Path, tmp_path: Path):
    result = quiet_train(["--data", str(tiny_data), "--output-dir", str(tmp_path / "run"), *FAST])
    ckpt = result.run_dir / "model.safetensors"
    other = write_image_folder(tmp_path / "other", {"cat": 1, "zebra": 1})
    proc = run_cmd(python_cmd("eval.py", "--ckpt", str(ckpt), "--data", str(other)))
    assert proc.returncode == 2 and "classes the training set lacks: zebra" in proc.stderr
    (tmp_path / "x.safetensors").write_bytes(os.urandom(1000))
    proc = run_cmd(python_cmd("eval.py", "--ckpt", str(tmp_path / "x.safetensors"), "--data", str(other)))
    assert proc.returncode == 2 and "not a readable safetensors checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_same_seed_reproduces_weights_bit_for_bit(tiny_data: Path, tmp_path: Path):
    runs = [quiet_train(["--data", str(tiny_data), "--output-dir", str(tmp_path / f"r{i}"), *FAST, "--seed", "5",
                         "--num-workers", str(i)]) for i in (0, 1)]  # workers or not: same data order
    a, b = (load_file(str(r.run_dir / "model.safetensors")) for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = load_file(str(quiet_train(["--data", str(tiny_data), "--output-dir", str(tmp_path / "r2"), *FAST,
                                   "--seed", "6"]).run_dir / "model.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_linear_probe_trains_only_the_head(tiny_data: Path, tmp_path: Path):
    from finetune.models.build import build_pretrained

    result = quiet_train(["--data", str(tiny_data), "--output-dir", str(tmp_path / "run"), *FAST,
                          "--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--freeze", "backbone"])
    trained = load_file(str(result.run_dir / "model.safetensors"))
    original = build_pretrained("mobilenet_v2", "IMAGENET1K_V1")[0].state_dict()
    backbone = [k for k in trained if not k.startswith("classifier.1.")]
    assert all(torch.equal(trained[k], original[k]) for k in backbone)  # running stats too: BN stayed in eval
    assert not torch.equal(trained["classifier.1.weight"], original["classifier.1.weight"][:3])


def test_freeze_stage_keeps_lower_blocks(tiny_data: Path, tmp_path: Path):
    result = quiet_train(["--data", str(tiny_data), "--output-dir", str(tmp_path / "run"), *FAST,
                          "--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--freeze", "features.3"])
    model = result.model
    assert not any(p.requires_grad for p in model.features[:4].parameters())
    assert all(p.requires_grad for p in model.features[4:].parameters())


def test_reused_rows_are_reported(tmp_path: Path):
    data = tmp_path / "data"
    write_image_folder(data / "train", {"hotdog": 4, "Golden_Retriever": 4, "my thing": 4})
    write_image_folder(data / "test", {"hotdog": 1, "Golden_Retriever": 1, "my thing": 1})
    with contextlib.redirect_stdout(io.StringIO()) as out:
        train.main(["--data", str(data), "--output-dir", str(tmp_path / "run"), *FAST, "--model", "mobilenet_v2",
                    "--weights", "IMAGENET1K_V1"])
    assert "reused pretrained classifier rows: Golden_Retriever <- golden retriever, hotdog <- hotdog" in out.getvalue()


@pytest.mark.parametrize("flags, expected", [
    (["--mixed-precision", "no"], "precision fp32"),
    (["--mixed-precision", "bf16"], "precision bf16"),
    (["--mixed-precision", "fp16"], "precision bf16"),  # fp16 on CPU would silently be fp32
])
def test_mixed_precision_choices_on_cpu(tiny_data: Path, tmp_path: Path, flags, expected, capsys, monkeypatch):
    # The dtype the forward pass computes in, seen at the output layer (Accelerate casts the model's
    # final output back to fp32, so it is looked at inside).
    import finetune.training.run

    computed = set()
    prepare = finetune.training.run.prepare_session

    def watched(*, clf, **kwargs):
        clf.net.get_submodule(clf.head).register_forward_hook(
            lambda module, args, out: computed.add((module.training, out.dtype)))
        return prepare(clf=clf, **kwargs)

    monkeypatch.setattr(finetune.training.run, "prepare_session", watched)  # the run calls it by this name
    result = train.main(["--data", str(tiny_data), "--output-dir", str(tmp_path / "run"), *FAST, *flags])
    captured = capsys.readouterr()
    assert expected in captured.out and result.history[-1]["train_loss"] > 0
    assert {"lr_backbone", "images_per_s", "rss_mib"} <= result.history[-1].keys()
    assert all(key.isidentifier() for key in result.history[-1])  # run.history["images_per_s"], not "img/s"
    dtype = torch.float32 if expected == "precision fp32" else torch.bfloat16
    assert computed == {(True, dtype), (False, dtype)}  # training and evaluation
    if "fp16" in flags:
        assert "fp16 is not supported on the CPU" in captured.err


def test_gradient_accumulation_steps_the_scheduler_once_per_optimizer_step(tiny_data: Path, tmp_path: Path,
                                                                           monkeypatch):
    args = ["--data", str(tiny_data), *FAST, "--batch-size", "4", "--grad-accum-steps", "2", "--optimizer", "adamw",
            "--lr", "1e-3", "--epochs", "2", "--warmup-epochs", "0"]
    a = quiet_train([*args, "--output-dir", str(tmp_path / "a")])
    # 36 images in batches of 4, two batches per optimizer step: 9 batches, 5 scheduler steps an
    # epoch, 10 in all. After epoch 1 the cosine is half-way down; after epoch 2 at zero. A step per
    # batch would leave 1e-3 * 0.5 * (1 + cos(0.9 pi)) = 2.4e-5 after epoch 1.
    lrs = [next(v for k, v in row.items() if k.startswith("lr_")) for row in a.history]
    assert lrs == pytest.approx([0.5e-3, 0.0], abs=1e-9)
    # A finished run keeps no optimizer state: AdamW's own count of its steps, in the state saved
    # after epoch 1 of the same run stopped there.
    train_until_stopped([*args, "--output-dir", str(tmp_path / "b")], monkeypatch, epoch=0)
    state = torch.load(tmp_path / "b" / "state" / "optimizer.bin", weights_only=True)
    assert {int(s["step"]) for s in state["state"].values()} == {5}


def test_resume_without_state_starts_from_the_beginning(tiny_data: Path, tmp_path: Path):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        train.main(["--data", str(tiny_data), "--output-dir", str(tmp_path / "run"), *FAST, "--resume"])
    assert "no saved state in" in out.getvalue() and "starting from the beginning" in out.getvalue()


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tiny_data: Path, tmp_path: Path):
    args = ["--data", str(tiny_data), *FAST, "--epochs", "3", "--batch-size", "4", "--save-every", "2"]
    reference = quiet_train([*args, "--output-dir", str(tmp_path / "ref")])
    run = tmp_path / "run"
    proc = subprocess.Popen(python_cmd("train.py", *args, "--output-dir", str(run)), cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill it mid-way through the second epoch
        with contextlib.suppress(OSError, ValueError):
            progress = json.loads((run / "state" / "progress.json").read_text())
            if progress["epoch"] == 1 and progress["step"] > 0:
                break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    progress = json.loads((run / "state" / "progress.json").read_text())
    assert (1, 0) < (progress["epoch"], progress["step"]) < (3, 0)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        resumed = train.main([*args, "--output-dir", str(run), "--resume"])
    assert "resumed from" in out.getvalue()
    a = load_file(str(reference.run_dir / "model.safetensors"))
    b = load_file(str(resumed.run_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for key in ("test_acc", "train_loss", "train_acc"):  # the resumed epoch reports all of its batches
        assert [r[key] for r in resumed.history] == [r[key] for r in reference.history], key


def test_unwritable_output_dir_is_reported_before_training(tiny_data: Path, tmp_path: Path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(UserError, match="cannot write to output folder"):
        train.main(["--data", str(tiny_data), "--output-dir", str(blocked / "run"), *FAST])


@pytest.mark.slow
def test_non_finite_loss_stops_naming_the_step_and_saves_nothing_broken(tiny_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    proc = run_cmd(python_cmd("train.py", "--data", str(tiny_data), "--output-dir", str(run), *FAST,
                              "--epochs", "3", "--batch-size", "4", "--lr", "1e30", "--save-every", "1",
                              "--warmup-epochs", "0", "--mixed-precision", "no"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    # Caught at the first NaN loss, or at the first save after an update that broke the weights.
    assert re.search(r"the (loss|weights) became NaN or infinite (at step|in epoch)", proc.stderr)
    assert "last good checkpoint" in proc.stderr
    for path in (run / "state" / "model.safetensors", run / "model.safetensors"):
        if path.exists():
            assert all(torch.isfinite(t).all() for t in load_file(str(path)).values() if t.is_floating_point())


@pytest.mark.slow
def test_compile_option_trains_and_saves_clean_keys(tiny_data: Path, tmp_path: Path):
    result = quiet_train(["--data", str(tiny_data), "--output-dir", str(tmp_path / "run"), *FAST, "--compile",
                          "--model", "resnet18"])
    with safe_open(str(result.run_dir / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "fc.weight" in keys and not any("_orig_mod" in k for k in keys)
    assert result.history[-1]["train_loss"] > 0


def optimizer_groups(run: Path) -> dict[str, dict]:
    state = torch.load(run / "state" / "optimizer.bin", weights_only=True)
    names = {i: g["name"] for i, g in enumerate(state["param_groups"])}
    return {names[i]: g for i, g in enumerate(state["param_groups"])}


def test_head_learning_rate_multiplier_and_one_rate_from_scratch(tiny_data: Path, tmp_path: Path, monkeypatch):
    common = ["--data", str(tiny_data), *FAST, "--model", "mobilenet_v2", "--lr", "0.002", "--weight-decay", "0.001"]
    # Stopped after one optimizer step, so that the state keeps the optimizer (a finished run's does not).
    train_until_stopped([*common, "--weights", "IMAGENET1K_V1", "--lr-head-mult", "5", "--output-dir",
                         str(tmp_path / "ft")], monkeypatch, optimizer_step=1)
    groups = optimizer_groups(tmp_path / "ft")
    assert groups["head"]["initial_lr"] == pytest.approx(0.01) and groups["backbone"]["initial_lr"] == 0.002
    assert groups["backbone_no_decay"]["weight_decay"] == 0 and groups["backbone"]["weight_decay"] == 0.001
    train_until_stopped([*common, "--weights", "none", "--lr-head-mult", "5", "--output-dir", str(tmp_path / "sc")],
                        monkeypatch, optimizer_step=1)
    assert {g["initial_lr"] for g in optimizer_groups(tmp_path / "sc").values()} == {0.002}


def test_batchnorm_statistics_are_the_exact_averages_of_the_epochs_last_training_batches(tiny_data: Path,
                                                                                          tmp_path: Path, monkeypatch):
    # "Precise BN" measures the population the network trained on (augmented training images),
    # gathered by the training's own forward passes over the epoch's last batches.
    import finetune.training.loop

    seen = []  # per training batch: the first trainable BatchNorm layer's input means and count
    train_step = finetune.training.engine.Trainer.train_step

    def recording(trainer, step, images, targets):
        layer = next(m for m in trainer.accelerator.unwrap_model(trainer.model).modules()
                     if isinstance(m, torch.nn.BatchNorm2d) and m.weight.requires_grad)
        hook = layer.register_forward_hook(
            lambda m, inputs, out: seen.append((inputs[0].float().mean(dim=(0, 2, 3)), m.running_mean.clone())))
        try:
            return train_step(trainer, step, images, targets)
        finally:
            hook.remove()

    monkeypatch.setattr(finetune.training.engine.Trainer, "train_step", recording)
    evaluated = []
    evaluate = finetune.training.loop.evaluate_splits
    monkeypatch.setattr(finetune.training.loop, "evaluate_splits", lambda session: evaluated.append(
        next(m for m in session.clf.net.modules() if isinstance(m, torch.nn.BatchNorm2d)
             and m.weight.requires_grad).running_mean.clone()) or evaluate(session))
    out = train.main(["--data", str(tiny_data), "--output-dir", str(tmp_path / "run"), *FAST, "--batch-size", "2",
                      "--recalibrate-bn-batches", "2", "--augment", "classic"])
    assert len(seen) >= 3 and len(evaluated) == 1  # more batches than the window
    window = torch.stack([means for means, _ in seen[-2:]])
    # The evaluation normalised with the mean of the last two batches' means (equal batch sizes),
    # not a running average that still remembers the first batch and ImageNet.
    assert torch.allclose(evaluated[0], window.mean(0), atol=1e-2, rtol=1e-2)
    assert not torch.allclose(evaluated[0], seen[0][1], atol=1e-3)
    assert out.history[-1]["epoch"] == 1
