"""audit.py: likely mislabeled images, duplicates and outliers, their files and pictures."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, python_cmd, run_cmd, write_checkpoint
from PIL import Image
from test_distributed import ACCELERATE, CPU_ENV

from finetune.audit import duplicates
from finetune.audit.duplicates import NEAR_RATIO, exact_copies, find_duplicates, near_duplicates, signatures
from finetune.audit.findings import DUPLICATE_COLUMNS, OUTLIER_COLUMNS, SUSPECT_COLUMNS
from finetune.audit.labels import confident_learning, find_label_issues
from finetune.audit.outliers import class_typicality
from finetune.commands import audit
from finetune.data.images import register_rows
from finetune.report.plots import duplicates_png, png_size, suspects_png

FAST = ["--image-size", "64", "--num-workers", "0", "--mixed-precision", "no", "--folds", "3"]


def clusters(per_class: int = 40, classes: int = 3, dims: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well separated Gaussian clusters, one per class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (classes, dims))
    labels = np.repeat(np.arange(classes), per_class)
    return centres[labels] + rng.normal(0, 1, (len(labels), dims)), labels


def test_moved_labels_are_the_top_suspects_with_their_true_class_suggested():
    features, truth = clusters()
    moved = np.array([3, 17, 45, 61, 90, 111])
    labels = truth.copy()
    labels[moved] = (labels[moved] + 1) % 3
    issues = find_label_issues(features, labels, 3, folds=5)
    assert set(issues.order[:len(moved)].tolist()) == set(moved.tolist())
    assert issues.flagged[moved].all() and issues.flagged.sum() <= len(moved) + 2
    assert (issues.suggested[moved] == truth[moved]).all()


def test_confident_learning_prunes_nothing_from_clean_confident_labels():
    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = np.where(np.eye(2)[labels] == 1, 0.9, 0.1)
    issues = confident_learning(probs, labels)
    assert not issues.flagged.any()
    assert np.allclose(issues.joint, np.diag([3, 3]))


def test_suspects_rank_by_the_given_label_against_its_class_threshold():
    # Class 0's images average 0.9 for their label, class 1's 0.7: a 0.6 says more against a 0 label.
    p0 = np.array([0.95, 0.95, 0.95, 0.95, 0.6])
    p1 = np.array([0.75, 0.75, 0.75, 0.75, 0.5])
    probs = np.concatenate([np.stack([p0, 1 - p0], 1), np.stack([1 - p1, p1], 1)])
    labels = np.array([0] * 5 + [1] * 5)
    issues = confident_learning(probs, labels)
    assert np.allclose(issues.thresholds, [p0.mean(), p1.mean()])
    assert list(issues.order[:2]) == [4, 9]  # 0.6 / 0.88 before 0.5 / 0.70, though 0.6 > 0.5
    relative = issues.relative_confidence(labels)
    assert np.all(np.diff(relative[issues.order]) >= 0)


def test_resized_recompressed_and_cropped_copies_are_near_duplicates_and_other_crops_are_not(tmp_path: Path):
    write_photo_crops(tmp_path, {name: 12 for name in PHOTOS}, seed=0)
    originals = sorted(tmp_path.rglob("*.png"))
    copies = []
    for n, source in enumerate(originals[:6:2]):
        image = Image.open(source)
        w, h = image.size
        altered = [image.resize((w * 6 // 10, h * 6 // 10)).resize((w, h)), image,
                   image.crop((w * 6 // 100, h * 2 // 100, w * 98 // 100, h * 94 // 100))][n]
        copies.append(tmp_path / f"copy-{n}.jpg")
        altered.save(copies[-1], quality=60 if n == 1 else 90)
    paths = [str(p) for p in originals + copies]
    pairs = near_duplicates(signatures(paths))
    expected = {(paths.index(str(source)), len(originals) + n) for n, source in enumerate(originals[:6:2])}
    assert {(p.first, p.second) for p in pairs} == expected
    assert all(0.8 < p.similarity <= 1 and not p.exact for p in pairs)


def test_an_exact_copy_does_not_hide_the_near_duplicates_of_its_original(tmp_path: Path):
    write_photo_crops(tmp_path, {name: 10 for name in PHOTOS}, seed=0)
    originals = sorted(tmp_path.rglob("*.png"))
    shutil.copy(originals[4], tmp_path / "exact.png")
    Image.open(originals[4]).resize((90, 90)).save(tmp_path / "near.png")
    paths = [str(p) for p in originals] + [str(tmp_path / "exact.png"), str(tmp_path / "near.png")]
    found = {(p.first, p.second, p.exact) for p in find_duplicates(paths)}
    assert {(4, len(originals), True), (4, len(originals) + 1, False)} <= found  # its exact copy is left out


def test_two_images_of_one_shape_in_other_grey_levels_are_not_near_duplicates(tmp_path: Path, monkeypatch):
    write_photo_crops(tmp_path, {name: 10 for name in PHOTOS}, seed=0)
    paths = [str(p) for p in sorted(tmp_path.rglob("*.png"))]
    x = np.arange(32)[None, :].repeat(32, axis=0)
    for name, edge, bright in (("white", 10, 255), ("grey", 11, 170)):  # black, then a plain edge, as in LFW's "not a face"
        Image.fromarray(np.where(x < edge, 0, bright).astype(np.uint8)).save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    edges = (len(paths) - 2, len(paths) - 1)
    sigs = signatures(paths)
    assert edges not in {(p.first, p.second) for p in near_duplicates(sigs)}
    monkeypatch.setattr(duplicates, "LEVEL_RMS", np.inf)  # their shapes alone pass the ratio test
    assert edges in {(p.first, p.second) for p in near_duplicates(sigs)}


def test_exact_copies_are_files_with_the_same_bytes(tmp_path: Path):
    for name, content in (("a", b"one"), ("b", b"two"), ("c", b"one"), ("d", b"one")):
        (tmp_path / name).write_bytes(content)
    pairs = exact_copies([str(tmp_path / n) for n in "abcd"])
    assert [(p.first, p.second, p.exact) for p in pairs] == [(0, 2, True), (0, 3, True)]


def test_a_datasets_rows_are_compared_like_files(tmp_path: Path):
    write_photo_crops(tmp_path, {name: 4 for name in PHOTOS}, seed=0)
    rows = [p.read_bytes() for p in sorted(tmp_path.rglob("*.png"))]
    rows.append(rows[2])
    register_rows("audit-test-rows[", lambda i: rows[i])
    paths = [f"audit-test-rows[{i}]" for i in range(len(rows))]
    assert [(p.first, p.second, p.exact) for p in find_duplicates(paths)] == [(2, len(rows) - 1, True)]


def test_an_image_far_from_its_class_is_an_outlier():
    features, labels = clusters()
    features[7] = features[7] + 30 * np.random.default_rng(2).normal(0, 1, features.shape[1])
    typical = class_typicality(features, labels)
    assert typical.outlier[7] and typical.z[7] == typical.z.min()
    assert typical.outlier.sum() <= 2


def write_photo_crops(root: Path, counts: dict[str, int], seed: int) -> None:
    """``count`` random 64-pixel crops (a third to a half of the short side) per class, each class
    cut from its own scikit-image photo."""
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        photo = getattr(skdata, PHOTOS[name])()[..., :3]
        h, w = photo.shape[:2]
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            side = int(min(h, w) * rng.uniform(0.33, 0.5))
            y, x = rng.integers(0, h - side), rng.integers(0, w - side)
            Image.fromarray(photo[y:y + side, x:x + side]).resize((64, 64)).save(root / name / f"{i:03d}.png")


PHOTOS = {"astronaut": "astronaut", "cat": "chelsea", "coffee": "coffee"}


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """Three classes of photo crops; a cat filed under coffee; a train image copied into test byte
    for byte, and another resized into test."""
    data = tmp_path / "data"
    write_photo_crops(data / "train", {name: 14 for name in PHOTOS}, seed=0)
    write_photo_crops(data / "test", {name: 5 for name in PHOTOS}, seed=1)
    shutil.move(data / "train" / "cat" / "000.png", data / "train" / "coffee" / "moved.png")
    shutil.copy(data / "train" / "astronaut" / "003.png", data / "test" / "astronaut" / "exact.png")
    Image.open(data / "train" / "coffee" / "004.png").resize((90, 90)).save(data / "test" / "coffee" / "near.png")
    return data


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_audit_writes_its_files_and_finds_what_was_planted(planted: Path, tmp_path: Path):
    out = tmp_path / "audit"
    findings = audit.main(["--data", str(planted), "--output-dir", str(out), *FAST])
    assert findings is not None
    columns, suspects = read_csv(out / "suspects.csv")
    assert tuple(columns) == SUSPECT_COLUMNS
    assert suspects[0]["path"].endswith("moved.png")
    assert (suspects[0]["given"], suspects[0]["suggested"], suspects[0]["split"]) == ("coffee", "cat", "train")
    assert 0.5 < float(suspects[0]["score"]) <= 1
    scores = [float(r["score"]) for r in suspects]
    assert scores == sorted(scores, reverse=True)  # the rows are in the order of their score
    columns, pairs = read_csv(out / "duplicates.csv")
    assert tuple(columns) == DUPLICATE_COLUMNS
    found = {(Path(r["path_a"]).name, Path(r["path_b"]).name, r["kind"], r["split_a"], r["split_b"]) for r in pairs}
    assert ("003.png", "exact.png", "exact", "train", "test") in found
    assert ("004.png", "near.png", "near", "train", "test") in found
    assert len(found) <= 4  # crops of one photo are alike, but not near-duplicates
    columns, _ = read_csv(out / "outliers.csv")
    assert tuple(columns) == OUTLIER_COLUMNS
    for name in ("suspects.png", "duplicates.png"):
        png = (out / name).read_bytes()
        with Image.open(io.BytesIO(png)) as image:
            image.load()  # decodes whole
            assert image.size == png_size(png) and min(image.size) >= 200


def test_a_label_file_is_audited_like_its_folder(planted: Path, tmp_path: Path):
    rows = ["image,label,split"] + [f"{p.relative_to(planted)},{p.parent.name},{p.parent.parent.name}"
                                     for p in sorted(planted.rglob("*.png"))]
    (planted / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "audit"
    audit.main(["--data", str(planted / "labels.csv"), "--output-dir", str(out), "--no-plots", *FAST])
    _, suspects = read_csv(out / "suspects.csv")
    assert suspects[0]["path"].endswith("moved.png") and suspects[0]["suggested"] == "cat"
    assert not (out / "suspects.png").exists()


def test_pictures_of_nothing_found_still_draw():
    for png in (suspects_png([], [], [], [], total=0, images_audited=10), duplicates_png([], [], [], total=0)):
        assert png_size(png)[0] > 100


@pytest.mark.parametrize("args, message", [
    (["--data", "MISSING"], "data folder not found"),
    (["--near-ratio", "1.5"], "--near-ratio"),
    (["--model", "nonet"], "unknown model 'nonet'"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str, tmp_path: Path):
    args = [a.replace("MISSING", str(tmp_path / "missing")) for a in args]
    proc = run_cmd(python_cmd("audit.py", *args, "--output-dir", str(tmp_path / "out")), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


@pytest.mark.slow  # two processes launched through accelerate
def test_two_processes_write_the_same_files_as_one(planted: Path, tmp_path: Path):
    args = ["--data", str(planted), "--no-plots", *FAST, "--batch-size", "4"]
    two = run_cmd([*ACCELERATE, str(free_port()), *python_cmd("audit.py")[1:], *args, "--output-dir",
                   str(tmp_path / "two")], env=CPU_ENV, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es) on cpu" in two.stdout
    one = run_cmd(python_cmd("audit.py", *args, "--output-dir", str(tmp_path / "one")))
    assert one.returncode == 0, one.stderr[-3000:]
    keys = {"suspects.csv": ("path", "given", "suggested"), "duplicates.csv": ("kind", "path_a", "path_b"),
            "outliers.csv": ("path",)}
    for name, columns in keys.items():
        (_, ours), (_, theirs) = read_csv(tmp_path / "two" / name), read_csv(tmp_path / "one" / name)
        assert ours, name
        assert [[r[c] for c in columns] for r in ours] == [[r[c] for c in columns] for r in theirs], name


def test_a_checkpoint_embeds_with_its_own_network_and_preprocessing(planted: Path, tmp_path: Path, capsys):
    ckpt = write_checkpoint(tmp_path / "model.safetensors", list(PHOTOS), image_size=48)
    findings = audit.main(["--data", str(planted), "--ckpt", str(ckpt), "--output-dir", str(tmp_path / "out"),
                           "--no-plots", *FAST])
    assert f"with {ckpt}" in capsys.readouterr().out
    assert findings.embeddings.features.shape == (len(findings.embeddings), 1024)  # its classifier layer's input
    assert (tmp_path / "out" / "suspects.csv").exists()


def test_the_near_ratio_flag_defaults_to_the_measured_ratio():
    assert audit.AuditConfig().near_ratio == NEAR_RATIO
