"""predict.py: new images in, top-k classes out, as a table or streamed to CSV / JSON lines."""

from __future__ import annotations

import csv
import json
import shutil
import sys
import venv
from pathlib import Path

import pytest
from conftest import ROOT, python_cmd, run_cmd, write_checkpoint, write_image_folder

from finetune.commands import predict
from finetune.errors import UserError
from finetune.models.inference import load_classifier

CLASSES = ["cat", "dog", "hot dog"]
QUIET = ["--num-workers", "0", "--mixed-precision", "no"]


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "model.safetensors", CLASSES)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """7 images in nested folders with no class structure."""
    write_image_folder(tmp_path / "photos" / "2024" / "may", {"x": 4}, size=40)
    write_image_folder(tmp_path / "photos" / "2025", {"y": 3}, size=30, ext=".jpg")
    return tmp_path / "photos"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_prints_a_table_of_files_folders_and_lists(ckpt: Path, photos: Path, tmp_path: Path):
    listed = sorted(photos.rglob("*.jpg"))[:2]
    (tmp_path / "list.txt").write_text("# two of them\n" + "\n".join(map(str, listed)) + "\n\n")
    single = sorted(photos.rglob("*.png"))[0]
    proc = run_cmd(python_cmd("predict.py", "--ckpt", str(ckpt), str(single), str(photos), str(tmp_path / "list.txt"),
                              "--top-k", "2", *QUIET))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "class 1" in proc.stdout and "p2" in proc.stdout
    assert "predicted 10 image(s), skipped 0" in proc.stdout  # 1 + 7 + 2: each input counts


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_output_file_agrees_with_the_python_api(ckpt: Path, photos: Path, tmp_path: Path, suffix: str):
    out = tmp_path / "out" / f"preds{suffix}"
    result = predict.main(["--ckpt", str(ckpt), str(photos), "--top-k", "2", "--output", str(out),
                           "--batch-size", "3", *QUIET])
    assert result["predicted"] == 7 and result["skipped"] == 0
    if suffix == ".csv":
        rows = [{"path": r["path"], "classes": [r["class_1"], r["class_2"]],
                 "probabilities": [float(r["probability_1"]), float(r["probability_2"])]} for r in read_csv(out)]
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = load_classifier(ckpt).predict(photos, top_k=2)
    assert [r["path"] for r in rows] == [p.source for p in expected]
    for row, want in zip(rows, expected):
        assert row["classes"] == want.classes  # predict.py folds BatchNorm: probabilities agree to rounding
        assert row["probabilities"] == pytest.approx(want.probabilities, abs=1e-4)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left behind


def test_unreadable_images_are_listed_and_skipped_or_stop_the_run(ckpt: Path, photos: Path, tmp_path: Path):
    bad = photos / "2025" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "preds.csv"
    result = predict.main(["--ckpt", str(ckpt), str(photos), "--output", str(out), *QUIET])
    assert result["skipped_paths"] == [str(bad)] and result["predicted"] == 7
    assert str(bad) not in {r["path"] for r in read_csv(out)}
    proc = run_cmd(python_cmd("predict.py", "--ckpt", str(ckpt), str(photos), "--bad-data", "fail", *QUIET))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "broken.jpg" in proc.stderr


def test_images_come_through_eval_loader_also_from_workers(ckpt: Path, photos: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    # eval.py's loader (its collate hands over channels-last uint8 batches) is what makes predict.py as fast
    from finetune.data import loader as data

    made = []

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    real = data.make_eval_loader
    monkeypatch.setattr(data, "make_eval_loader", spy)
    bad = photos / "2025" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "preds.csv"
    result = predict.main(["--ckpt", str(ckpt), str(photos), "--output", str(out), "--batch-size", "3",
                           "--num-workers", "1", "--mixed-precision", "no"])
    assert len(made) == 1 and made[0].collate_fn is data.collate and made[0].num_workers == 1
    assert result["skipped_paths"] == [str(bad)] and result["predicted"] == 7  # skipped in a worker, still named
    bad.unlink()
    expected = load_classifier(ckpt).predict(photos)
    assert [(r["path"], r["class_1"]) for r in read_csv(out)] == [(p.source, p.classes[0]) for p in expected]


@pytest.mark.parametrize("args, message", [
    ([], "needs --ckpt FILE and at least one INPUT"),
    (["nowhere/"], "input not found: nowhere"),
    (["https://example.com/cat.jpg"], "https://example.com/cat.jpg is a URL: predict reads local files only"),
    (["{photos}", "--output", "preds.txt"], "--output must end in .csv or .jsonl"),
    (["{photos}", "--top-k", "0"], "--top-k must be at least 1"),
])
def test_bad_input_is_one_line(ckpt: Path, photos: Path, args: list[str], message: str):
    with pytest.raises(UserError, match=message):
        predict.main(["--ckpt", str(ckpt), *[a.format(photos=photos) for a in args], *QUIET])


def test_only_unreadable_inputs_exit_2_naming_each(ckpt: Path, tmp_path: Path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("a text file, not an image")
    proc = run_cmd(python_cmd("predict.py", "--ckpt", str(ckpt), str(bad), *QUIET))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"skipped unreadable image: {bad}" in proc.stdout
    assert proc.stderr.strip() == "error: none of the 1 image(s) could be read (see above): nothing predicted"


def test_the_python_api_skips_an_unreadable_image_with_a_warning(ckpt: Path, photos: Path):
    bad = photos / "2025" / "broken.jpg"
    bad.write_text("a text file, not an image")
    with pytest.warns(UserWarning, match=f"skipped unreadable image: cannot decode image {bad}: not an image"):
        predictions = load_classifier(ckpt).predict([photos])
    assert len(predictions) == 7 and str(bad) not in {p.source for p in predictions}
    with pytest.raises(UserError, match="not an image"):
        load_classifier(ckpt).predict([photos], bad_data="fail")


def test_empty_folder_is_reported(ckpt: Path, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        predict.main(["--ckpt", str(ckpt), str(tmp_path / "empty"), *QUIET])


@pytest.mark.slow
def test_two_processes_predict_each_image_exactly_once(ckpt: Path, photos: Path, tmp_path: Path):
    from test_distributed import ACCELERATE, CPU_ENV

    out = tmp_path / "preds.csv"
    proc = run_cmd([*ACCELERATE, "29631", str(ROOT / "predict.py"), "--ckpt", str(ckpt), str(photos),
                    "--output", str(out), "--batch-size", "2", "--num-workers", "0"], env=CPU_ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = [r["path"] for r in read_csv(out)]
    assert sorted(paths) == sorted(map(str, [*photos.rglob("*.png"), *photos.rglob("*.jpg")]))  # 7 over 2 processes


@pytest.mark.slow
def test_pip_install_gives_a_working_finetune_predict(ckpt: Path, photos: Path, tmp_path: Path):
    """The package installed (not editable) into a fresh venv; its command runs from another folder.
    The venv borrows this environment's packages (torch, ...) through a .pth file: no download."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)  # pip and setuptools come borrowed too
    site = next(env_dir.glob("lib/python*/site-packages"))
    (site / "borrowed.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    clean = {"PYTHONPATH": None, "VIRTUAL_ENV": None}
    source = tmp_path / "source"  # a copy: building leaves build/ and *.egg-info behind
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info",
                                                               "__pycache__", ".pytest_cache", "out"))
    proc = run_cmd([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    str(source)],
                   env=clean, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    image = sorted(photos.rglob("*.png"))[0]
    proc = run_cmd([str(env_dir / "bin" / "finetune-predict"), "--ckpt", str(ckpt), str(image), *QUIET],
                   env=clean, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "predicted 1 image(s)" in proc.stdout
    proc = run_cmd([str(env_dir / "bin" / "python"), "-c", "import finetune; print(finetune.__file__)"],
                   env=clean, cwd=tmp_path)
    assert str(site) in proc.stdout and str(source) not in proc.stdout
