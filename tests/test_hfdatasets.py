"""Hugging Face datasets as data (finetune/data/hfdatasets.py): save_to_disk folders, parquet files and
hf:NAME (through a load_dataset replaced by a dataset built here: the Hub is not reachable from tests)."""

from __future__ import annotations

import contextlib
import io
import pickle
import sys
from pathlib import Path

import datasets
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value
from datasets import Image as HFImage

from finetune.commands import eval as eval_cmd
from finetune.commands import train
from finetune.data import hfdatasets, images
from finetune.data.evalsplit import recorded_split
from finetune.data.hfdatasets import eval_split, is_hf_data, read_rows
from finetune.data.images import BadImageError, load_rgb, oriented_size
from finetune.data.labelfiles import Columns
from finetune.data.preflight import apply_policy, check_dataset
from finetune.data.presets import EvalPreset, TrainPreset
from finetune.data.shapes import SHAPE_KINDS, shapes
from finetune.data.sources import load_splits
from finetune.errors import UserError
from finetune.models.checkpoint import read_metadata
from tests.conftest import FAST, python_cmd, run_cmd

CLASSES = ["cat", "dog", "hot dog"]


@pytest.fixture(autouse=True)
def _quiet_and_cached_here(tmp_path: Path, monkeypatch):
    """The parquet builder's cache in tmp_path, not the user's; no progress bars in the test output."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    datasets.disable_progress_bars()


def files_of(folder: Path) -> list[Path]:
    """A split folder's images in ImageFolder's order: by class, then name."""
    return sorted(folder.rglob("*.png"), key=lambda p: (p.parent.name, p.name))


def part(folder: Path, labels: str = "classlabel", names: list[str] = CLASSES) -> Dataset:
    """A split folder's images as a Dataset of bytes (an Image feature) and labels, in ImageFolder's order."""
    files = files_of(folder)
    label = ClassLabel(names=names) if labels == "classlabel" else Value("string")
    return Dataset.from_dict({"image": [{"bytes": p.read_bytes(), "path": p.name} for p in files],
                              "label": [p.parent.name for p in files]},
                             features=Features({"image": HFImage(), "label": label}))


def saved(dataset, path: Path) -> Path:
    dataset.save_to_disk(str(path))
    return path


@pytest.fixture
def dataset_dict(tiny_data: Path, tmp_path: Path) -> Path:
    """tiny_data's train and test folders as a DatasetDict written by save_to_disk."""
    return saved(DatasetDict(train=part(tiny_data / "train"), test=part(tiny_data / "test")), tmp_path / "dd")


def test_what_is_a_dataset(dataset_dict: Path, tiny_data: Path, tmp_path: Path):
    assert is_hf_data(dataset_dict) and is_hf_data("hf:beans") and is_hf_data("hf:user/name:config")
    assert not is_hf_data(tiny_data) and not is_hf_data(tmp_path / "labels.csv") and not is_hf_data(tmp_path / "no")
    (tmp_path / "pq" / "data").mkdir(parents=True)
    part(tiny_data / "test").to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    assert is_hf_data(tmp_path / "pq") and is_hf_data(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet")


def test_dataset_dict_gives_the_splits_as_the_folders_do(dataset_dict: Path, tiny_data: Path):
    splits = load_splits(dataset_dict)
    folders = load_splits(tiny_data)
    assert splits.classes == folders.classes == CLASSES
    assert splits.train.targets == folders.train.targets and splits.test.targets == folders.test.targets
    assert splits.train.samples[:2] == [(f"{dataset_dict}/train[0]", 0), (f"{dataset_dict}/train[1]", 0)]
    record = splits.records["test"]
    assert record["dataset"] == {"source": str(dataset_dict), "split": "test", "columns": Columns(
        "image", "label").to_dict()} and record["num_files"] == 15 and record["carved"] is None


def test_rows_decode_exactly_as_the_same_files(dataset_dict: Path, tiny_data: Path):
    rows, files = load_splits(dataset_dict).train, load_splits(tiny_data).train
    for (row, _), (file, _) in list(zip(rows.samples, files.samples))[::7]:
        assert torch.equal(EvalPreset(crop_size=12, resize_size=14)(row), EvalPreset(crop_size=12, resize_size=14)(file))
        torch.manual_seed(0)
        augmented = TrainPreset(size=12)(row)
        torch.manual_seed(0)
        assert torch.equal(augmented, TrainPreset(size=12)(file))
        assert oriented_size(row) == oriented_size(file) == (16, 16)
        assert load_rgb(row).tobytes() == load_rgb(file).tobytes()
    assert rows[0][1] == 0 and rows[0][0].size == (16, 16)  # an ImageFolder's item: (PIL image, target)


def test_a_spawned_worker_reads_rows_from_the_unpickled_dataset(dataset_dict: Path):
    train = load_splits(dataset_dict).train
    path = train.samples[0][0]
    expected = images.read_image_bytes(path)
    images._ROW_READERS.clear()  # a process that has not opened the dataset
    with pytest.raises(BadImageError, match=r"cannot decode image .*train\[0\]"):
        images.read_image_bytes(path)
    again = pickle.loads(pickle.dumps(train))
    assert images.read_image_bytes(again.samples[0][0]) == expected


def test_a_single_dataset_with_a_split_column_or_without(tiny_data: Path, tmp_path: Path):
    whole = datasets.concatenate_datasets([part(tiny_data / "train"), part(tiny_data / "test")])
    with_split = saved(whole.add_column("split", ["train"] * 36 + ["test"] * 15), tmp_path / "split")
    splits = load_splits(with_split)
    assert len(splits.train) == 36 and len(splits.test) == 15 and splits.records["test"]["dataset"]["split"] == "test"
    assert splits.test.samples[0][0] == f"{with_split}/rows[36]"

    plain = saved(whole, tmp_path / "plain")
    carved = load_splits(plain, test_fraction=0.2, val_fraction=0.2)
    record = carved.records["test"]
    assert record["carved"] == {"fraction": 0.2, "seed": 0} and record["dataset"]["split"] is None
    assert len(carved.train) + len(carved.val) + len(carved.test) == 51
    assert "has no test split: holding out" in carved.notes[0]
    # The same rows again, for eval.py: carved from the record, refused once the rows changed.
    again, which = eval_split(plain, CLASSES, record)
    assert again.samples == carved.test.samples and "held out of" in which
    assert recorded_split({"splits": {"test": record}}, CLASSES, "m.safetensors").samples == carved.test.samples
    saved(whole.select(range(40)), tmp_path / "plain2")
    record["dataset"]["source"] = record["root"] = str(tmp_path / "plain2")
    with pytest.raises(UserError, match=r"is not the one the checkpoint was evaluated on"):
        recorded_split({"splits": {"test": record}}, CLASSES, "m.safetensors")


def test_parquet_folder_with_string_labels_and_a_validation_split(tiny_data: Path, tmp_path: Path):
    data = tmp_path / "pq" / "data"
    data.mkdir(parents=True)
    for name, folder in (("train", "train"), ("validation", "test"), ("test", "test")):
        part(tiny_data / folder, labels="string").to_parquet(str(data / f"{name}-00000-of-00001.parquet"))
    splits = load_splits(tmp_path / "pq")
    assert splits.classes == CLASSES  # strings: sorted
    assert len(splits.train) == 36 and len(splits.val) == 15 and len(splits.test) == 15
    assert splits.val.samples[0][0] == f"{tmp_path / 'pq'}/validation[0]"
    assert torch.equal(EvalPreset(crop_size=12, resize_size=14)(splits.test.samples[3][0]),
                       EvalPreset(crop_size=12, resize_size=14)(str(files_of(tiny_data / "test")[3])))
    single = tmp_path / "one.parquet"
    part(tiny_data / "train", labels="string").to_parquet(str(single))
    assert len(load_splits(single).test) > 0  # one file: a test part carved out


def test_hf_name_goes_through_load_dataset(dataset_dict: Path, monkeypatch):
    calls = []

    def load_dataset(name, config=None):  # the real call's arguments: name, then the config
        calls.append((name, config))
        return datasets.load_from_disk(str(dataset_dict))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    hfdatasets._read_rows.cache_clear()
    splits = load_splits("hf:someone/pets:small")
    assert calls == [("someone/pets", "small")]
    assert splits.train.samples[0][0] == "hf:someone/pets:small/train[0]"
    assert splits.records["test"]["dataset"]["source"] == "hf:someone/pets:small"
    assert EvalPreset(crop_size=12, resize_size=14)(splits.test.samples[0][0]).shape == (3, 12, 12)
    load_splits("hf:pets")
    assert calls[-1] == ("pets", None)


def test_hf_name_that_cannot_be_loaded_is_one_line(monkeypatch):
    def load_dataset(name, config=None):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)\nmore lines")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(UserError, match=r"^cannot load hf:nowhere: Couldn't reach 'nowhere' on the Hub \(Local"
                                        r"EntryNotFoundError\)$"):
        load_splits("hf:nowhere")
    with pytest.raises(UserError, match="hf: needs a dataset's name"):
        load_splits("hf:")


@pytest.mark.slow  # the Hub client retries for about 25 s before it gives up
def test_an_unreachable_hub_is_our_one_line_alone(tmp_path: Path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": None,
           "HF_DATASETS_OFFLINE": None, "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}
    proc = run_cmd(python_cmd("train.py", "--data", "hf:beans", "--output-dir", str(tmp_path / "a"), *FAST), env=env)
    assert proc.returncode == 2
    assert proc.stderr == "error: cannot load hf:beans: Couldn't reach 'beans' on the Hub (LocalEntryNotFoundError)\n"
    assert proc.stdout == ""


def test_classlabel_order_is_the_class_order_and_strings_are_sorted(tiny_data: Path, tmp_path: Path):
    names = ["hot dog", "dog", "cat", "bird"]  # the dataset's own order; no bird in train
    dd = saved(DatasetDict(train=part(tiny_data / "train", names=names), test=part(tiny_data / "test", names=names)),
               tmp_path / "ordered")
    splits = load_splits(dd)
    assert splits.classes == ["hot dog", "dog", "cat"]
    assert "class(es) without training rows left out: bird" in splits.notes[-1]
    strings = saved(DatasetDict(train=part(tiny_data / "train", "string"), test=part(tiny_data / "test", "string")),
                    tmp_path / "strings")
    assert load_splits(strings).classes == CLASSES


def test_several_labels_are_kept_and_refused_by_single_label_training(tiny_data: Path, tmp_path: Path):
    files = files_of(tiny_data / "test")
    labels = [[p.parent.name] for p in files]
    labels[4] = ["cat", "dog"]
    ds = Dataset.from_dict({"image": [{"bytes": p.read_bytes(), "path": None} for p in files], "objects": labels},
                           features=Features({"image": HFImage(), "objects": List(ClassLabel(names=CLASSES))}))
    path = saved(ds, tmp_path / "multi")
    table = read_rows(path)
    assert table.rows[4].labels == ("cat", "dog") and table.rows[0].labels == ("cat",)
    assert table.columns.label == "objects"
    with pytest.raises(UserError, match=r"^.*multi rows row 4 has several labels \(cat;dog\), which --task single "
                                        r"refuses: pass --task multilabel \(or auto\)"):
        load_splits(path, task="single")
    splits = load_splits(path)  # auto: several labels in a row make it multi-label
    assert splits.task == "multilabel" and splits.task_why.endswith("multi rows row 4 has several labels (cat;dog)")
    # Carved as one group (a multi-label set's label sets are too many to stratify by), in row order.
    assert "has no test split: holding out 3 of its rows (20% of the rows, split seed 0)" in splits.notes[-1]
    assert all(isinstance(t, tuple) for t in splits.train.targets + splits.test.targets)
    assert sorted(p for p, _ in splits.train.samples + splits.test.samples) == sorted(r.path for r in table.rows)


def shape_rows(file: Path, classlabel: bool) -> Dataset:
    """The rows of a shapes label file (image, labels, split) as a Dataset: the labels a list of
    ClassLabel or of strings."""
    lines = [line.split(",") for line in file.read_text().splitlines()[1:]]
    kinds = sorted(SHAPE_KINDS)
    inner = ClassLabel(names=kinds) if classlabel else Value("string")
    return Dataset.from_dict(
        {"image": [{"bytes": (file.parent / image).read_bytes(), "path": None} for image, _, _ in lines],
         "tags": [labels.split(";") for _, labels, _ in lines], "split": [split for _, _, split in lines]},
        features=Features({"image": HFImage(), "tags": List(inner), "split": Value("string")}))


@pytest.mark.parametrize("classlabel", [True, False], ids=["Sequence(ClassLabel)", "list of strings"])
def test_a_list_label_column_gives_the_splits_of_the_same_multilabel_file(tmp_path: Path, classlabel: bool):
    file = shapes(tmp_path / "shapes", n=30, size=32, split=True)
    path = saved(shape_rows(file, classlabel), tmp_path / "multi")
    by_file, by_rows = load_splits(file), load_splits(path)
    assert by_file.task == by_rows.task == "multilabel"
    assert by_rows.classes == by_file.classes == sorted(SHAPE_KINDS)
    for name in ("train", "val", "test"):  # the same rows, in the same order, with the same labels
        assert getattr(by_rows, name).targets == getattr(by_file, name).targets
        assert len(getattr(by_rows, name).samples) == len(getattr(by_file, name).samples) > 0
    assert [r["name"] for r in by_rows.records.values()] == ["test", "val"]


@pytest.mark.slow  # a training run and two evaluations
def test_a_multilabel_dataset_trains_and_evaluates(tmp_path: Path):
    file = shapes(tmp_path / "shapes", n=30, size=32, split=True)
    path = saved(shape_rows(file, classlabel=True), tmp_path / "multi")
    result = train.main(["--data", str(path), "--output-dir", str(tmp_path / "run"), *FAST, "--log-with", "none",
                         "--no-plots"])
    assert "test_map" in result.history[-1] and "val_map" in result.history[-1]
    ckpt = tmp_path / "run" / "model.safetensors"
    assert read_metadata(ckpt)["task"] == "multilabel"
    recorded = eval_cmd.main(["--ckpt", str(ckpt), *EVAL])  # the recorded test split, as multi-label
    given = eval_cmd.main(["--ckpt", str(ckpt), "--data", str(path), *EVAL, "--output-dir", str(tmp_path / "e")])
    assert recorded["task"] == given["task"] == "multilabel"
    assert recorded["num_samples"] == given["num_samples"] == 6
    assert recorded["map"] == given["map"] == pytest.approx(result.history[-1]["test_map"])


@pytest.mark.parametrize("columns, message", [
    (Columns(image="picture"), r"has no column 'picture' \(--image-column\); its columns: image \(Image\), label "
                               r"\(ClassLabel\)"),
    (Columns(label="image"), r"column 'image' holds images, not labels"),
    (Columns(image="label"), r"column 'label' holds ClassLabel, not images"),
    (Columns(split="part"), r"has splits of its own \(train, test\): --split-column is for a dataset of one split"),
    (Columns(onehot=("cat", "dog")), r"--label-columns .* is for label files"),
])
def test_bad_columns_are_one_line(dataset_dict: Path, columns: Columns, message: str):
    with pytest.raises(UserError, match=message):
        load_splits(dataset_dict, columns=columns)


def test_bad_datasets_are_one_line(tiny_data: Path, tmp_path: Path):
    files = files_of(tiny_data / "test")
    no_label = saved(Dataset.from_dict({"image": [{"bytes": p.read_bytes(), "path": None} for p in files],
                                        "note": ["x"] * len(files)},
                                       features=Features({"image": HFImage(), "note": Value("string")})),
                     tmp_path / "nolabel")
    with pytest.raises(UserError, match=r"has no label column \(a ClassLabel, or label.*its columns: image \(Image\), "
                                        r"note \(string\)"):
        load_splits(no_label)
    whole = part(tiny_data / "test")
    with pytest.raises(UserError, match=r"has no column 'part' \(--split-column\)"):
        load_splits(saved(whole, tmp_path / "whole"), columns=Columns(split="part"))
    unknown = saved(whole.add_column("split", ["train"] * 14 + ["holdout"]), tmp_path / "unknown")
    with pytest.raises(UserError, match=r"unknown rows row 14: split 'holdout' is none of train, val"):
        load_splits(unknown)
    no_train = saved(DatasetDict(validation=whole, test=whole), tmp_path / "notrain")
    with pytest.raises(UserError, match=r"has no train split \(its splits: validation, test\)"):
        load_splits(no_train)
    extra = saved(DatasetDict(train=part(tiny_data / "train"), test=whole, unlabelled=whole), tmp_path / "extra")
    assert "left out its split(s) unlabelled" in load_splits(extra).notes[0]
    missing = saved(whole.cast_column("label", Value("int64")).map(lambda row: {"label": -1}).cast_column(
        "label", ClassLabel(names=CLASSES)), tmp_path / "missing")
    with pytest.raises(UserError, match=r"missing rows row 0 has no label: single-label training needs one"):
        load_splits(missing)
    (tmp_path / "nothing.parquet").write_bytes(b"no parquet")
    with pytest.raises(UserError, match=r"^cannot load .*nothing.parquet: "):
        load_splits(tmp_path / "nothing.parquet")


def unreadable(tiny_data: Path, tmp_path: Path) -> Path:
    """tiny_data as a DatasetDict whose train row 2 holds bytes that are not an image and row 5 none."""
    train = part(tiny_data / "train")
    broken = [None if i == 5 else {"bytes": b"not an image" if i == 2 else row["bytes"], "path": None}
              for i, row in enumerate(train.cast_column("image", HFImage(decode=False))["image"])]
    train = Dataset.from_dict({"image": broken, "label": train["label"]}, features=train.features)
    return saved(DatasetDict(train=train, test=part(tiny_data / "test")), tmp_path / "broken")


def test_the_preflight_checks_the_rows_images(tiny_data: Path, tmp_path: Path):
    path = unreadable(tiny_data, tmp_path)
    report = check_dataset(path, full=True)
    assert report.bad == [(f"{path}/train[2]", "not an image"), (f"{path}/train[5]", "the row holds no image")]
    assert report.counts == {"train": {"cat": 10, "dog": 12, "hot dog": 12}, "test": {"cat": 5, "dog": 5, "hot dog": 5}}
    with pytest.raises(UserError, match=r"2 image\(s\) cannot be used: .*broken/train\[2\] \(not an image\)"):
        apply_policy(report, "fail")
    exclude, notes = apply_policy(report, "skip")
    assert len(load_splits(path, frozenset(exclude)).train) == 34 and notes[0].startswith("skipping 2 image(s)")
    with pytest.raises(BadImageError, match=r"cannot decode image .*broken/train\[5\]: the row holds no image"):
        EvalPreset(crop_size=12, resize_size=14)(f"{path}/train[5]")
    # Duplicates between train and test are found by content, as files' are.
    dup = saved(DatasetDict(train=part(tiny_data / "train"), test=part(tiny_data / "train")), tmp_path / "dup")
    assert len(check_dataset(dup, full=True).duplicates) == 36


def test_flags_of_the_label_columns_name_a_dataset_s_columns(dataset_dict: Path, tmp_path: Path):
    renamed = saved(datasets.load_from_disk(str(dataset_dict)).rename_columns({"image": "pic", "label": "kind"}),
                    tmp_path / "renamed")
    splits = load_splits(renamed)  # found by feature type
    assert splits.records["test"]["dataset"]["columns"]["image"] == "pic"
    assert load_splits(renamed, columns=Columns(image="pic", label="kind")).classes == CLASSES


# End to end: train.py and eval.py on a dataset

EVAL = ["--num-workers", "0", "--batch-size", "8", "--log-with", "none", "--no-plots"]
TIMINGS = ("images_per_s", "seconds", "rss_mib")  # how long, not what: they differ between any two runs


@pytest.mark.slow
def test_same_images_as_class_folders_and_as_a_dataset_train_the_same(tiny_data: Path, dataset_dict: Path,
                                                                      tmp_path: Path):
    """The same history and test accuracy, to the last digit, on the same seed."""
    common = [*FAST, "--epochs", "2", "--seed", "3", "--log-with", "none", "--no-plots"]
    by_folder = train.main(["--data", str(tiny_data), "--output-dir", str(tmp_path / "folders"), *common])
    by_rows = train.main(["--data", str(dataset_dict), "--output-dir", str(tmp_path / "rows"), *common])
    assert by_rows.classes == by_folder.classes == CLASSES
    strip = [{k: v for k, v in row.items() if k not in TIMINGS} for row in by_folder.history]
    assert [{k: v for k, v in row.items() if k not in TIMINGS} for row in by_rows.history] == strip
    assert by_rows.eval_data == dataset_dict
    ckpt = tmp_path / "rows" / "model.safetensors"
    record = read_metadata(ckpt)["splits"]["test"]
    assert record["dataset"]["source"] == str(dataset_dict) and record["num_files"] == 15
    # eval.py: the recorded test split without --data; the dataset's test split with it.
    recorded = eval_cmd.main(["--ckpt", str(ckpt), *EVAL])
    given = eval_cmd.main(["--ckpt", str(ckpt), "--data", str(dataset_dict), *EVAL, "--output-dir", str(tmp_path / "e")])
    folder = eval_cmd.main(["--ckpt", str(tmp_path / "folders" / "model.safetensors"), *EVAL])
    assert recorded["num_samples"] == given["num_samples"] == 15
    assert recorded["accuracy"] == given["accuracy"] == folder["accuracy"] == by_rows.history[-1]["test_acc"]
    assert (tmp_path / "e" / "predictions.csv").read_text().splitlines()[1].startswith(f"{dataset_dict}/test[0],cat,")


@pytest.mark.slow
def test_unreadable_row_fails_in_one_line_or_is_skipped_and_counted(tiny_data: Path, tmp_path: Path):
    path = unreadable(tiny_data, tmp_path)
    env = {"HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}
    proc = run_cmd(python_cmd("train.py", "--data", str(path), "--output-dir", str(tmp_path / "a"), *FAST), env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "2 image(s) cannot be used" in proc.stderr and "broken/train[5] (the row holds no image)" in proc.stderr
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = train.main(["--data", str(path), "--output-dir", str(tmp_path / "b"), *FAST, "--bad-data", "skip",
                             "--log-with", "none", "--no-plots"])
    assert "--bad-data skip left out 2 image(s) found before the run" in out.getvalue()
    assert len(result.history) == 1
    # --check-data decodes every row's image and names the bad ones.
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(UserError, match=r"2 image\(s\) cannot be used"):
        train.main(["--data", str(path), "--check-data"])
    assert "broken/train[2]: not an image" in out.getvalue()


@pytest.mark.slow
def test_eval_refuses_a_dataset_that_changed_and_a_missing_column_in_one_line(dataset_dict: Path, tiny_data: Path,
                                                                             tmp_path: Path):
    env = {"HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}
    proc = run_cmd(python_cmd("train.py", "--data", str(dataset_dict), "--image-column", "picture",
                              "--output-dir", str(tmp_path / "a"), *FAST), env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "has no column 'picture' (--image-column)" in proc.stderr
    train.main(["--data", str(dataset_dict), "--output-dir", str(tmp_path / "b"), *FAST, "--log-with", "none",
                "--no-plots"])
    DatasetDict(train=part(tiny_data / "train"), test=part(tiny_data / "test").select(range(10))).save_to_disk(
        str(tmp_path / "dd2"))
    saved_dir = tmp_path / "dd"
    saved_dir.rename(tmp_path / "dd-old")
    (tmp_path / "dd2").rename(saved_dir)
    proc = run_cmd(python_cmd("eval.py", "--ckpt", str(tmp_path / "b" / "model.safetensors"), *EVAL), env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "the test rows of" in proc.stderr and "changed since training (15 rows then, 10 now" in proc.stderr


def test_without_the_datasets_package_one_line_says_how_to_get_it(dataset_dict: Path, monkeypatch):
    hfdatasets._read_rows.cache_clear()
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(UserError, match=r"^Hugging Face datasets need the datasets package: pip install datasets$"):
        load_splits(dataset_dict)
