"""Label files (finetune.data.labelfiles): the formats tools write, the splits, and bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import Counter
from pathlib import Path

import pytest
from conftest import FAST, python_cmd, run_cmd, write_image_folder

from finetune.commands import eval as eval_cmd
from finetune.commands import train
from finetune.config import parse_config
from finetune.data.labelfiles import (
    Columns,
    LabelledImages,
    eval_split,
    is_label_file,
    labelled_fingerprint,
    read_table,
    recorded_split,
)
from finetune.data.preflight import apply_policy, check_dataset
from finetune.data.sources import load_splits
from finetune.errors import UserError
from finetune.models.checkpoint import read_metadata


def images(root: Path, classes: dict[str, int], seed: int = 0) -> list[tuple[str, str]]:
    """Images in ``root/images/CLASS/NNN.png``; their (path relative to root, class), sorted."""
    write_image_folder(root / "images", classes, seed=seed)
    return sorted((p.relative_to(root).as_posix(), p.parent.name) for p in (root / "images").rglob("*.png"))


def write_csv(path: Path, header: str, lines: list[str], *, newline: str = "\n", bom: bool = False) -> Path:
    path.write_text(("\ufeff" if bom else "") + newline.join([header, *lines]) + newline, encoding="utf-8",
                    newline="")
    return path


def counts(ds) -> dict[str, int]:
    return {ds.classes[t]: n for t, n in sorted(Counter(ds.targets).items())}


def rel(ds) -> set[str]:
    return {Path(os.path.relpath(p, ds.root)).as_posix() for p, _ in ds.samples}


@pytest.fixture
def rows(tmp_path: Path) -> list[tuple[str, str]]:
    return images(tmp_path, {"cat": 5, "dog": 5})


# Formats as tools write them


def test_pandas_csv_with_index_column_bom_crlf_quotes_and_blank_lines(tmp_path: Path, rows):
    # pandas' to_csv: an unnamed index column first; Excel: a BOM and CRLF; a quoted path with a comma.
    first = tmp_path / rows[0][0]
    first.rename(first.with_name("a, b.png"))
    rows[0] = ("images/cat/a, b.png", "cat")
    lines = [f'{i},"{p}",{c}' for i, (p, c) in enumerate(rows)]
    file = write_csv(tmp_path / "labels.csv", ",image,label", lines + ["", ",,", ""], newline="\r\n", bom=True)
    table = read_table(file)
    assert table.columns.image == "image" and table.columns.label == "label" and table.layout == "column"
    assert [r.labels for r in table.rows] == [(c,) for _, c in rows]
    assert [r.path for r in table.rows] == [str(tmp_path / p) for p, _ in rows]
    assert table.rows[0].where == "labels.csv line 2" and table.rows[-1].where == f"labels.csv line {len(rows) + 1}"
    splits = load_splits(file)
    assert splits.classes == ["cat", "dog"] and len(splits.train) + len(splits.test) == 10


def test_quoted_labels_joined_by_commas_are_several_labels(tmp_path: Path, rows):
    file = write_csv(tmp_path / "l.csv", "image,label", [f'{rows[0][0]},"cat,dog"', f"{rows[1][0]},cat"])
    table = read_table(file)
    assert table.columns.sep == "," and [r.labels for r in table.rows] == [("cat", "dog"), ("cat",)]


def test_pandas_index_column_read_back_and_written_again_is_no_data(tmp_path: Path, rows):
    file = write_csv(tmp_path / "labels.csv", "Unnamed: 0,Path,Class", [f"{i},{p},{c}" for i, (p, c) in enumerate(rows)])
    table = read_table(file)
    assert (table.columns.image, table.columns.label) == ("Path", "Class")  # names matched whatever their case


def test_tsv_jsonl_and_both_json_layouts_read_the_same_rows(tmp_path: Path, rows):
    write_csv(tmp_path / "a.tsv", "filename\ttags", [f"{p}\t{c}" for p, c in rows])
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"file": p, "label": c}) for p, c in rows) + "\n\n")
    (tmp_path / "records.json").write_text(json.dumps([{"image": p, "labels": [c]} for p, c in rows]))
    columns = {"image": {str(i): p for i, (p, _) in enumerate(rows)}, "label": {str(i): c for i, (_, c) in enumerate(rows)}}
    (tmp_path / "columns.json").write_text(json.dumps(columns))  # pandas' default to_json
    expected = [(str(tmp_path / p), (c,)) for p, c in rows]
    for name in ("a.tsv", "a.jsonl", "records.json", "columns.json"):
        assert is_label_file(tmp_path / name)
        assert [(r.path, r.labels) for r in read_table(tmp_path / name).rows] == expected, name
    assert read_table(tmp_path / "a.jsonl").rows[1].where == "a.jsonl line 2"
    assert read_table(tmp_path / "records.json").rows[1].where == "records.json row 2"


def test_named_columns_and_separators(tmp_path: Path, rows):
    (p0, _), (p1, _) = rows[:2]
    file = write_csv(tmp_path / "l.csv", "img,what,part", [f"{p0},a|b,train", f"{p1},c,train"])
    with pytest.raises(UserError, match=r"no image column .*--image-column.*its columns: 'img', 'what', 'part'"):
        read_table(file)
    table = read_table(file, Columns(image="img", label="what", split="part"))
    assert table.columns.sep == "|" and [r.labels for r in table.rows] == [("a", "b"), ("c",)]
    assert read_table(file, Columns(image="img", label="what", sep=";", split="part")).rows[0].labels == ("a|b",)
    semi = write_csv(tmp_path / "s.csv", "image,labels", [f'{p0},"dog; cat ;dog"', f"{p1},cat"])
    assert read_table(semi).rows[0].labels == ("dog", "cat")  # stripped, each label once
    with pytest.raises(UserError, match="no column 'nope' \\(--label-column\\)"):
        read_table(file, Columns(image="img", label="nope"))
    with pytest.raises(UserError, match="exclude each other"):
        Columns(label="a", onehot=("b", "c"))


def test_relative_paths_are_relative_to_the_label_file_and_absolute_ones_stay(tmp_path: Path, rows):
    (tmp_path / "meta").mkdir()
    p0, p1 = rows[0][0], rows[1][0]
    file = write_csv(tmp_path / "meta" / "l.csv", "image,label", [f"../{p0},cat", f"{tmp_path / p1},cat"])
    assert [r.path for r in read_table(file).rows] == [str(tmp_path / p0), str(tmp_path / p1)]


def test_one_hot_columns_found_or_named(tmp_path: Path, rows):
    lines = [f"{i},{p},{int(c == 'cat')},{int(c == 'dog')}" for i, (p, c) in enumerate(rows)]
    file = write_csv(tmp_path / "l.csv", ",image,cat,dog", lines)
    table = read_table(file)
    assert table.layout == "onehot" and table.columns.onehot == ("cat", "dog")  # the index column is no class
    assert [r.labels for r in table.rows] == [(c,) for _, c in rows]
    splits = load_splits(file)
    assert splits.classes == ["cat", "dog"] and len(splits.train) + len(splits.test) == 10
    # pandas writes booleans as True/False and 0/1 columns with gaps as floats
    assert read_table(write_csv(tmp_path / "b.csv", "image,cat,dog", [f"{rows[0][0]},True,0.0"])).rows[0].labels == ("cat",)
    named = read_table(file, Columns(onehot=("dog",)))
    assert [r.labels for r in named.rows] == [("dog",) if c == "dog" else () for _, c in rows]
    json_file = tmp_path / "l.jsonl"
    json_file.write_text("\n".join(json.dumps({"image": p, "cat": c == "cat", "dog": int(c == "dog")}) for p, c in rows))
    assert [r.labels for r in read_table(json_file).rows] == [(c,) for _, c in rows]


def test_several_labels_are_kept_for_multilabel_and_refused_by_single_label_training(tmp_path: Path, rows):
    file = write_csv(tmp_path / "l.csv", "image,label", [f"{rows[0][0]},cat;dog", *(f"{p},{c}" for p, c in rows[1:])])
    assert read_table(file).rows[0].labels == ("cat", "dog")
    with pytest.raises(UserError, match=r"^l.csv line 2 has several labels \(cat;dog\), which --task single "
                                        "refuses: pass --task multilabel"):
        load_splits(file, task="single")
    onehot = write_csv(tmp_path / "o.csv", "image,cat,dog", [f"{rows[0][0]},0,0", f"{rows[1][0]},1,0"])
    with pytest.raises(UserError, match="o.csv line 2 has no label"):
        load_splits(onehot, task="single")


# Splits


def test_split_column_makes_the_splits_and_val_rows_alone_are_the_test_split(tmp_path: Path):
    rows = images(tmp_path, {"a": 6, "b": 6})
    part = {p: ("test" if i % 3 == 0 else "VALID" if i % 3 == 1 else "train") for i, (p, _) in enumerate(rows)}
    file = write_csv(tmp_path / "l.csv", "image,label,split", [f"{p},{c},{part[p]}" for p, c in rows])
    splits = load_splits(file)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4, 4, 4)
    assert splits.selected_on == "val" and splits.train.root == str(tmp_path)
    record = splits.records["test"]
    assert record["carved"] is None and record["labels"]["split"] == "test" and record["name"] == "test"
    assert record["labels"]["file"] == str(file) and record["fingerprint"] == labelled_fingerprint(splits.test)
    with pytest.raises(UserError, match="has val rows beside its test rows"):
        load_splits(file, val_fraction=0.2)
    only_val = write_csv(tmp_path / "v.csv", "image,label,split",
                         [f"{p},{c},{'validation' if part[p] == 'test' else 'train'}" for p, c in rows])
    splits = load_splits(only_val)
    assert splits.val is None and len(splits.test) == 4 and splits.records["test"]["name"] == "val"


def test_without_split_column_a_test_part_is_carved_by_path_hash_and_recorded(tmp_path: Path):
    rows = images(tmp_path, {"a": 10, "b": 20, "c": 5})
    file = write_csv(tmp_path / "l.csv", "image,label", [f"{p},{c}" for p, c in rows])
    splits = load_splits(file)
    assert counts(splits.test) == {"a": 2, "b": 4, "c": 1} and counts(splits.train) == {"a": 8, "b": 16, "c": 4}
    assert not rel(splits.train) & rel(splits.test)
    assert "l.csv has no test rows: holding out 7 of its images" in splits.notes[0]
    record = splits.records["test"]
    assert record["carved"] == {"fraction": 0.2, "seed": 0} and record["labels"]["split"] is None
    # The same files whatever the rows' order; another seed holds out others.
    write_csv(file, "image,label", [f"{p},{c}" for p, c in reversed(rows)])
    assert rel(load_splits(file).test) == rel(splits.test)
    assert rel(load_splits(file, split_seed=1).test) != rel(splits.test)
    with_val = load_splits(file, val_fraction=0.25)
    assert counts(with_val.val) == {"a": 2, "b": 4, "c": 1} and with_val.selected_on == "val"


def test_samples_are_ordered_as_the_same_images_in_class_folders(tmp_path: Path):
    write_image_folder(tmp_path / "train", {"cat": 4, "dog": 4, "hot dog": 4})
    write_image_folder(tmp_path / "test", {"cat": 2, "dog": 2, "hot dog": 2}, seed=1)
    lines = [f"{p.relative_to(tmp_path).as_posix()},{p.parent.name},{split}"
             for split in ("test", "train") for p in sorted((tmp_path / split).rglob("*.png"), reverse=True)]
    from_file = load_splits(write_csv(tmp_path / "l.csv", "image,label,split", lines))
    from_folders = load_splits(tmp_path)
    assert from_file.classes == from_folders.classes
    for name in ("train", "test"):
        a, b = getattr(from_file, name), getattr(from_folders, name)
        assert [(os.path.abspath(p), t) for p, t in b.samples] == a.samples


def test_eval_split_and_the_recorded_split(tmp_path: Path):
    rows = images(tmp_path, {"a": 5, "b": 5})
    file = write_csv(tmp_path / "l.csv", "image,label", [f"{p},{c}" for p, c in rows])
    splits = load_splits(file)
    record = splits.records["test"]
    again = recorded_split(record, splits.classes, "ckpt")
    assert again.samples == splits.test.samples
    ds, which = eval_split(file, splits.classes, record)
    assert ds.samples == splits.test.samples and "held out of" in which
    other = write_csv(tmp_path / "other.csv", "image,label", [f"{p},{c}" for p, c in rows[:3]])
    ds, which = eval_split(other, splits.classes, record)
    assert len(ds) == 3 and which.startswith("every row of")
    # A relabelled row changes the held-out part: refused, with --data to evaluate it as it is.
    moved = min(rel(splits.test))
    write_csv(file, "image,label", [f"{p},{'b' if p == moved else c}" for p, c in rows])
    with pytest.raises(UserError, match="is not the one the checkpoint was evaluated on"):
        recorded_split(record, splits.classes, "ckpt")
    file.unlink()
    with pytest.raises(UserError, match="the label file recorded in ckpt, .* is gone; pass --data FILE"):
        recorded_split(record, splits.classes, "ckpt")


def test_labelled_images_quacks_like_an_image_folder(tmp_path: Path, rows):
    table = read_table(write_csv(tmp_path / "l.csv", "image,label", [f"{p},{c}" for p, c in rows]))
    ds = LabelledImages(table, table.rows, ["cat", "dog"])
    image, target = ds[0]
    assert image.mode == "RGB" and target == 0 and len(ds) == 10 and ds.class_to_idx == {"cat": 0, "dog": 1}
    assert ds.where[ds.samples[0][0]] == "l.csv line 2" and ds.label_lists[ds.samples[-1][0]] == ("dog",)


# Bad input: one line naming the file and the row


@pytest.mark.parametrize("header, lines, message", [
    ("image,label", ["{p0},cat", ",dog"], r"^l.csv line 3: empty image path \(fix the row, or pass --bad-data skip\)"),
    ("image,label", ["{p0},cat", "images/nothing.png,dog"], r"^l.csv line 3: image not found: .*nothing.png"),
    ("image,label,split", ["{p0},cat,train", "{p1},cow,test"],
     r"^l.csv line 3: label 'cow' of a test image is none of the training set's classes"),
    ("image,label", ["{p0},cat", "{p1},dog", "{p0},dog"],
     r"^l.csv line 4 lists .*/000.png again with other labels \(dog; l.csv line 2: cat\)"),
    ("image,label,split", ["{p0},cat,train", "{p0},cat,test"], r"^l.csv line 3 lists .* again in another split"),
    ("image,label,split", ["{p0},cat,train", "{p1},dog,tst"],
     r"^l.csv line 3: split 'tst' is none of train, val \(or valid, validation\) and test"),
    ("{p0},cat", ["{p1},dog"], r"l.csv has no header row: its first line is data \(images/cat/000.png, cat\)"),
    ("image,cat,dog", ["{p0},1,0", "{p1},0,2"], r"l.csv has no label column .*column 'dog' holds '2' at l.csv line 3"),
    ("image,cat,dog", ["{p0},1,"], r"l.csv has no label column .*column 'dog' holds '' at l.csv line 2"),
    ("image,label", [",cat", " ,dog"], r"l.csv has no usable row \(2 with an empty image path\)"),
    ("image,label", [], r"l.csv has no usable row"),
    ("image,label", ["{p0},cat,extra"], r"^l.csv line 2 has 3 fields, the header 2 \(a field with commas"),
])
def test_bad_rows_are_one_line_naming_file_and_row(tmp_path: Path, rows, header, lines, message):
    fill = {"p0": rows[0][0], "p1": rows[-1][0]}
    file = write_csv(tmp_path / "l.csv", header.format(**fill), [line.format(**fill) for line in lines])
    with pytest.raises(UserError, match=message) as err:
        load_splits(file)
    assert "\n" not in str(err.value)


def test_one_hot_column_named_that_is_not_0_or_1(tmp_path: Path, rows):
    file = write_csv(tmp_path / "l.csv", "image,cat,dog", [f"{rows[0][0]},1,0", f"{rows[1][0]},yes,0"])
    with pytest.raises(UserError, match=r"^l.csv line 3: one-hot column 'cat' holds 'yes', not 0 or 1"):
        read_table(file, Columns(onehot=("cat", "dog")))


def test_unreadable_label_files(tmp_path: Path):
    with pytest.raises(UserError, match="label file not found"):
        load_splits(tmp_path / "nope.csv")
    (tmp_path / "l.jsonl").write_text('{"image": "a.png", "label": "x"}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"l.jsonl line 2 is not a JSON object"):
        read_table(tmp_path / "l.jsonl")
    (tmp_path / "l.json").write_text('{"image": "a.png"}')
    with pytest.raises(UserError, match=r"must hold a list of objects"):
        read_table(tmp_path / "l.json")
    (tmp_path / "l.csv").write_bytes(b"image,label\n\xff\xfe,x\n")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        read_table(tmp_path / "l.csv")


def test_missing_images_and_empty_paths_fail_or_are_skipped_by_the_preflight(tmp_path: Path, rows):
    lines = [f"{p},{c}" for p, c in rows] + ["images/cat/gone.png,cat", ",dog"]
    file = write_csv(tmp_path / "l.csv", "image,label", lines)
    report = check_dataset(file)
    assert report.bad == [("l.csv line 13", "empty image path"),
                          (str(tmp_path / "images/cat/gone.png"), "not found, listed at l.csv line 12")]
    assert report.counts == {"train": {"cat": 5, "dog": 5}}
    with pytest.raises(UserError, match=r"2 image\(s\) cannot be used: l.csv line 13 \(empty image path\); .*gone.png "
                                        r"\(not found, listed at l.csv line 12\); .*pass --bad-data skip"):
        apply_policy(report, "fail")
    exclude, notes = apply_policy(report, "skip")
    assert notes[0].startswith("skipping 2 image(s)")
    splits = load_splits(file, frozenset(exclude))
    assert len(splits.train) + len(splits.test) == 10


def test_preflight_finds_bad_images_a_label_file_lists(tmp_path: Path, rows):
    (tmp_path / "images" / "cat" / "000.png").write_bytes(b"")
    file = write_csv(tmp_path / "l.csv", "image,label,split", [f"{p},{c},{'test' if i % 2 else 'train'}"
                                                               for i, (p, c) in enumerate(rows)])
    report = check_dataset(file, full=True)
    assert report.bad == [(str(tmp_path / "images/cat/000.png"), "empty file (0 bytes)")]
    assert report.counts == {"test": {"cat": 2, "dog": 3}, "train": {"cat": 2, "dog": 2}}
    splits = load_splits(file, frozenset(report.bad_paths()))
    assert len(splits.train) + len(splits.test) == 9


# End to end: train.py and eval.py on a label file

EVAL = ["--num-workers", "0", "--batch-size", "8", "--log-with", "none", "--no-plots"]
TIMINGS = ("images_per_s", "seconds", "rss_mib")  # how long, not what: they differ between any two runs


def labels_of(data: Path, splits: tuple[str, ...]) -> Path:
    """``data/labels.csv`` listing ``data/SPLIT/CLASS/*.png`` with a split column, in no helpful order."""
    lines = [f"{p.relative_to(data).as_posix()},{p.parent.name},{split}"
             for split in splits for p in sorted((data / split).rglob("*.png"), reverse=True)]
    return write_csv(data / "labels.csv", "image,label,split", lines)


@pytest.mark.slow
def test_same_images_as_class_folders_and_as_a_label_file_train_the_same(tiny_data: Path, tmp_path: Path):
    """The done-when of label files: the same history and test accuracy, to the last digit, on the same seed."""
    file = labels_of(tiny_data, ("train", "test"))
    common = [*FAST, "--epochs", "2", "--seed", "3", "--log-with", "none", "--no-plots"]
    by_folder = train.main(["--data", str(tiny_data), "--output-dir", str(tmp_path / "folders"), *common])
    by_file = train.main(["--data", str(file), "--output-dir", str(tmp_path / "file"), *common])
    assert by_file.classes == by_folder.classes == ["cat", "dog", "hot dog"]
    strip = [{k: v for k, v in row.items() if k not in TIMINGS} for row in by_folder.history]
    assert [{k: v for k, v in row.items() if k not in TIMINGS} for row in by_file.history] == strip
    assert by_file.history[-1]["test_acc"] == by_folder.history[-1]["test_acc"]
    ckpt = tmp_path / "file" / "model.safetensors"
    record = read_metadata(ckpt)["splits"]["test"]
    assert record["labels"]["file"] == str(file) and record["num_files"] == 15
    # eval.py: the recorded test rows without --data; the label file's test rows with it.
    recorded = eval_cmd.main(["--ckpt", str(ckpt), *EVAL])
    given = eval_cmd.main(["--ckpt", str(ckpt), "--data", str(file), *EVAL, "--output-dir", str(tmp_path / "e")])
    folder = eval_cmd.main(["--ckpt", str(tmp_path / "folders" / "model.safetensors"), *EVAL])
    assert recorded["num_samples"] == given["num_samples"] == 15
    assert recorded["accuracy"] == given["accuracy"] == folder["accuracy"] == by_file.history[-1]["test_acc"]


@pytest.mark.slow
def test_missing_image_fails_in_one_line_or_is_skipped_and_counted(tiny_data: Path, tmp_path: Path):
    file = labels_of(tiny_data, ("train", "test"))
    with file.open("a") as f:
        f.write("train/cat/gone.png,cat,train\n")
    proc = run_cmd(python_cmd("train.py", "--data", str(file), "--output-dir", str(tmp_path / "a"), *FAST))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "gone.png (not found, listed at labels.csv line 53)" in proc.stderr
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = train.main(["--data", str(file), "--output-dir", str(tmp_path / "b"), *FAST, "--bad-data", "skip",
                             "--log-with", "none", "--no-plots"])
    assert "skipping 1 image(s) that cannot be used" in out.getvalue()
    assert "--bad-data skip left out 1 image(s) found before the run" in out.getvalue()
    assert len(result.history) == 1


def test_flags_name_the_columns(tmp_path: Path):
    config = parse_config(["--data", "l.csv", "--image-column", "img", "--label-columns", "cat, dog",
                           "--split-column", "part", "--label-sep", "/"])
    assert Columns.from_config(config) == Columns(image="img", sep="/", onehot=("cat", "dog"), split="part")
    assert Columns.from_config(parse_config([])) == Columns()
    assert Columns.from_dict(Columns(onehot=("a", "b")).to_dict()) == Columns(onehot=("a", "b"))


def test_check_data_reports_the_missing_images_of_a_label_file(tiny_data: Path):
    file = labels_of(tiny_data, ("train", "test"))
    with file.open("a") as f:
        f.write("train/cat/gone.png,cat,train\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(UserError, match=r"1 image\(s\) cannot be used"):
        train.main(["--data", str(file), "--check-data"])
    assert "gone.png: not found, listed at labels.csv line 53" in out.getvalue()
    with file.open("a") as f:
        f.write("train/dog/000.png,cat,train\n")  # the same image, labelled again otherwise: the rows come first
    with pytest.raises(UserError, match=r"labels.csv line 54 lists train/dog/000.png again with other labels"):
        train.main(["--data", str(file), "--check-data"])
