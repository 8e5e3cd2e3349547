"""Finding splits and carving held-out parts (finetune.data.folders) on folders written here."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from conftest import write_image_folder

from finetune.data.folders import carve, image_folder, load_splits, split_fingerprint
from finetune.errors import UserError


def counts(ds) -> dict[str, int]:
    return {ds.classes[t]: n for t, n in sorted(Counter(ds.targets).items())}


def names(ds) -> set[str]:
    return {Path(p).relative_to(ds.root).as_posix() for p, _ in ds.samples}


@pytest.mark.parametrize("layout", ["flat", "train-only"])
def test_flat_folder_or_train_alone_holds_out_a_stratified_test_part(tmp_path: Path, layout: str):
    data = tmp_path / "data"
    write_image_folder(data if layout == "flat" else data / "train", {"a": 10, "b": 20, "c": 5})
    splits = load_splits(data)
    assert splits.classes == ["a", "b", "c"]
    assert counts(splits.test) == {"a": 2, "b": 4, "c": 1} and counts(splits.train) == {"a": 8, "b": 16, "c": 4}
    assert not names(splits.train) & names(splits.test)
    assert "holding out 7 of its images (20% of each class" in splits.notes[0]
    record = splits.records["test"]
    assert record["carved"] == {"fraction": 0.2, "seed": 0} and record["num_files"] == 7
    assert record["fingerprint"] == split_fingerprint([p for p, _ in splits.test.samples], splits.test.root)
    assert splits.selected_on == "test"
    # Seeded: the same files again; another seed or fraction holds out others.
    assert names(load_splits(data).test) == names(splits.test)
    assert names(load_splits(data, split_seed=1).test) != names(splits.test)
    assert counts(load_splits(data, test_fraction=0.5).test) == {"a": 5, "b": 10, "c": 2}


def test_val_fraction_carves_validation_from_train_only(tiny_data: Path):
    splits = load_splits(tiny_data, val_fraction=0.25)
    assert counts(splits.val) == {"cat": 3, "dog": 3, "hot dog": 3}
    assert counts(splits.train) == {"cat": 9, "dog": 9, "hot dog": 9}
    assert len(splits.test.samples) == 15 and splits.test.root == str(tiny_data / "test")
    assert not names(splits.val) & names(splits.train)
    assert splits.selected_on == "val" and splits.records["val"]["carved"]["fraction"] == 0.25
    assert splits.records["test"]["carved"] is None


def test_val_and_test_folders_choose_on_val(tmp_path: Path):
    write_image_folder(tmp_path / "train", {"a": 3, "b": 3})
    write_image_folder(tmp_path / "val", {"a": 1, "b": 1}, seed=1)
    write_image_folder(tmp_path / "test", {"a": 2, "b": 2}, seed=2)
    splits = load_splits(tmp_path)
    assert splits.val.root == str(tmp_path / "val") and splits.test.root == str(tmp_path / "test")
    assert splits.selected_on == "val"
    with pytest.raises(UserError, match="has a val/ folder"):
        load_splits(tmp_path, val_fraction=0.2)


def test_val_folder_alone_is_the_split_that_chooses(tmp_path: Path):
    write_image_folder(tmp_path / "train", {"a": 3, "b": 3})
    write_image_folder(tmp_path / "val", {"a": 1, "b": 1}, seed=1)
    splits = load_splits(tmp_path)
    assert splits.val is None and splits.test.root == str(tmp_path / "val")
    assert splits.selected_on == "val"  # the checkpoint names the folder that chose it


def test_carving_is_stable_when_files_are_added(tmp_path: Path):
    """A file's side depends on its own path's rank: adding files moves few others across."""
    write_image_folder(tmp_path / "data", {"a": 50})
    before = names(carve(image_folder(tmp_path / "data"), 0.2, seed=3)[1])
    for i in range(50, 55):
        shutil.copy(tmp_path / "data" / "a" / "000.png", tmp_path / "data" / "a" / f"{i:03d}.png")
    after = names(carve(image_folder(tmp_path / "data"), 0.2, seed=3)[1])
    assert len(before) == 10 and len(after) == 11 and len(before & after) >= 9


def test_too_few_images_to_hold_out_is_one_line(tmp_path: Path):
    write_image_folder(tmp_path / "data", {"a": 1, "b": 1})
    with pytest.raises(UserError, match="no images left for the test split"):
        load_splits(tmp_path / "data")


def test_split_fingerprint_names_the_files_not_where_they_live(tmp_path: Path):
    a = write_image_folder(tmp_path / "one", {"x": 2, "y": 2})
    b = shutil.copytree(a, tmp_path / "two")
    listing = lambda root: [p for p, _ in image_folder(root).samples]  # noqa: E731
    assert split_fingerprint(listing(a), a) == split_fingerprint(reversed(listing(b)), b)
    (b / "y" / "000.png").rename(b / "x" / "009.png")  # same bytes, another class
    assert split_fingerprint(listing(a), a) != split_fingerprint(listing(b), b)


def quiet(main, argv: list[str]) -> tuple[dict, str]:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as out:
        return main(argv), out.getvalue()


@pytest.mark.slow
def test_best_checkpoint_is_chosen_on_val_and_reports_that_epochs_test_accuracy(tmp_path: Path):
    from conftest import FAST

    from finetune.commands import train
    from finetune.models.checkpoint import read_metadata

    data = tmp_path / "data"
    write_image_folder(data / "train", {"a": 8, "b": 8})
    write_image_folder(data / "val", {"a": 3, "b": 3}, seed=1)
    write_image_folder(data / "test", {"a": 4, "b": 4}, seed=2)
    result, out = quiet(train.main, ["--data", str(data), "--output-dir", str(tmp_path / "run"), *FAST,
                                     "--epochs", "3", "--lr", "0.05"])
    history = result.history
    assert all({"val_acc", "test_acc"} <= row.keys() for row in history)
    best_epoch = max(history, key=lambda row: (row["val_acc"], -row["epoch"]))["epoch"]  # the first best
    best = read_metadata(tmp_path / "run" / "best.safetensors")
    assert best["selected_on"] == "val" and best["metrics"]["epoch"] == best_epoch
    assert best["metrics"]["test_accuracy"] == history[best_epoch - 1]["test_acc"]
    assert best["metrics"]["val_accuracy"] == history[best_epoch - 1]["val_acc"]
    assert (f"best.safetensors: epoch {best_epoch}, chosen on validation accuracy "
            f"{history[best_epoch - 1]['val_acc']:.4f}; its test accuracy {history[best_epoch - 1]['test_acc']:.4f}") in out
    assert best["splits"]["val"]["root"] == str(data / "val") and best["splits"]["test"]["num_files"] == 8


@pytest.mark.slow
def test_flat_folder_trains_and_eval_sees_exactly_the_held_out_files(tmp_path: Path):
    import csv
    import json

    from conftest import FAST

    from finetune.commands import eval as eval_cmd
    from finetune.commands import train
    from finetune.models.checkpoint import read_metadata

    data = write_image_folder(tmp_path / "flat", {"a": 10, "b": 10})
    run = tmp_path / "run"
    result, out = quiet(train.main, ["--data", str(data), "--output-dir", str(run), *FAST, "--val-fraction", "0.25"])
    assert "has no separate test split: holding out 4 of its images (20% of each class" in out
    assert "holding out 4 training images (25% of each class) for validation" in out
    assert "12 train / 4 val / 4 test images" in out and f"--data {data}" in out
    meta = read_metadata(run / "model.safetensors")
    assert meta["selected_on"] == "val" and meta["splits"]["test"]["carved"] == {"fraction": 0.2, "seed": 0}
    assert meta["metrics"]["num_test_samples"] == 4 and meta["metrics"]["num_val_samples"] == 4

    metrics, out = quiet(eval_cmd.main, ["--ckpt", str(run / "model.safetensors"), "--data", str(data),
                                         "--output-dir", str(tmp_path / "eval"), "--num-workers", "0", "--no-plots"])
    assert "evaluating the 4 images held out of" in out and metrics["num_samples"] == 4
    paths = [row["path"] for row in csv.DictReader((tmp_path / "eval" / "predictions.csv").open())]
    assert split_fingerprint(paths, data) == meta["splits"]["test"]["fingerprint"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_samples"] == 4
    # Without --data: the same part, held out again from the folder the checkpoint records.
    metrics, _ = quiet(eval_cmd.main, ["--ckpt", str(run / "model.safetensors"), "--output-dir",
                                       str(tmp_path / "eval-recorded"), "--num-workers", "0", "--no-plots"])
    assert metrics["num_samples"] == 4
    rows = csv.DictReader((tmp_path / "eval-recorded" / "predictions.csv").open())
    assert split_fingerprint([row["path"] for row in rows], data) == meta["splits"]["test"]["fingerprint"]

    for path in paths[:1]:
        Path(path).unlink()  # the held-out part is no longer what the checkpoint was evaluated on
    with pytest.raises(UserError, match="is not the one the checkpoint was evaluated on"):
        eval_cmd.main(["--ckpt", str(run / "model.safetensors"), "--data", str(data),
                       "--output-dir", str(tmp_path / "eval2"), "--num-workers", "0", "--no-plots"])
