"""Dataset preflight on real bad files written here."""

from __future__ import annotations

import contextlib
import io
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from conftest import FAST, python_cmd, run_cmd, write_image_folder, write_truncated_jpeg
from PIL import Image

from finetune.commands import train
from finetune.data.folders import load_splits
from finetune.data.preflight import apply_policy, check_dataset
from finetune.errors import UserError


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels (a decompression bomb), with no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.fixture
def messy(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    data = tmp_path / "data"
    write_image_folder(data / "train", {"cat": 6, "dog": 6}, ext=".jpg")
    write_image_folder(data / "test", {"cat": 2, "dog": 2}, seed=1, ext=".jpg")
    good = data / "train" / "cat" / "000.jpg"
    bad = {
        "zero": data / "train" / "cat" / "zero.jpg",
        "text": data / "train" / "dog" / "notes.jpg",
        "truncated": data / "train" / "dog" / "truncated.jpg",
        "bomb": data / "train" / "cat" / "bomb.png",
    }
    bad["zero"].write_bytes(b"")
    bad["text"].write_text("this is not an image")
    write_truncated_jpeg(bad["truncated"])
    png_header_only(bad["bomb"], 30000, 30000)
    Image.open(good).save(data / "train" / "dog" / "really_a_png.jpg", format="PNG")
    shutil.copy(good, data / "test" / "cat" / "leaked.jpg")
    return data, bad


def test_full_check_finds_every_problem(messy):
    data, bad = messy
    report = check_dataset(data, full=True)
    found = dict(report.bad)
    assert found[str(bad["zero"])] == "empty file (0 bytes)"
    assert found[str(bad["text"])] == "not an image"
    assert found[str(bad["truncated"])].startswith("cannot be decoded")
    assert "decompression-bomb limit" in found[str(bad["bomb"])]
    assert report.wrong_extension == [(str(data / "train" / "dog" / "really_a_png.jpg"), "PNG")]
    assert report.duplicates == [(str(data / "train" / "cat" / "000.jpg"), str(data / "test" / "cat" / "leaked.jpg"))]
    assert report.counts == {"train": {"cat": 6, "dog": 7}, "test": {"cat": 3, "dog": 2}}


def test_quick_check_reads_headers_only(messy):
    data, bad = messy
    report = check_dataset(data, full=False)
    # A truncated JPEG has a valid header: only decoding finds it (and the loader names it).
    assert str(bad["truncated"]) not in report.bad_paths()
    assert {str(bad[k]) for k in ("zero", "text", "bomb")} <= report.bad_paths()
    assert report.duplicates == []


def test_imbalance_and_empty_classes(tmp_path: Path):
    data = tmp_path / "data"
    write_image_folder(data / "train", {"many": 22, "few": 2})
    write_image_folder(data / "test", {"many": 1, "few": 1})
    assert any("very imbalanced in train: 22 vs 2" in w for w in check_dataset(data).warnings)
    (data / "train" / "few" / "000.png").write_bytes(b"")
    (data / "train" / "few" / "001.png").write_bytes(b"")
    # Skipping the bad files leaves the class empty: the layout check says so before a run starts.
    exclude, notes = apply_policy(check_dataset(data), "skip")
    assert len(exclude) == 2 and "skipping 2 image(s)" in notes[0]
    with pytest.raises(UserError, match="class 'few' in .*train has no images"):
        load_splits(data, frozenset(exclude))
    proc = run_cmd(python_cmd("train.py", "--data", str(data), "--output-dir", str(tmp_path / "run"), *FAST,
                              "--bad-data", "skip"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: class 'few' in" in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fail_policy_names_the_files_and_skip_policy_trains_without_them(messy, tmp_path: Path):
    data, bad = messy
    bad["truncated"].unlink()  # only the decoder finds this one; see the next test
    proc = run_cmd(python_cmd("train.py", "--data", str(data), "--output-dir", str(tmp_path / "r1"), *FAST))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "3 image(s) cannot be used" in proc.stderr and str(bad["zero"]) in proc.stderr
    assert "--bad-data skip" in proc.stderr
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = train.main(["--data", str(data), "--output-dir", str(tmp_path / "r2"), *FAST, "--bad-data", "skip"])
    assert "skipping 3 image(s)" in out.getvalue() and str(bad["text"]) in out.getvalue()
    assert "1 test image(s) also appear in train" not in out.getvalue()  # the quick check does not hash
    assert result.history[-1]["train_loss"] > 0


@pytest.mark.slow
def test_check_data_command_reports_and_exits(messy, tmp_path: Path):
    data, bad = messy
    proc = run_cmd(python_cmd("train.py", "--check-data", "--data", str(data)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "images per class" in proc.stdout and f"bad image: {bad['truncated']}" in proc.stdout
    assert "duplicate:" in proc.stdout and "wrong extension:" in proc.stdout
    assert "4 image(s) cannot be used" in proc.stderr
    clean = write_image_folder(tmp_path / "clean" / "train", {"a": 2, "b": 2}).parent
    write_image_folder(clean / "test", {"a": 1, "b": 1}, seed=1)
    proc = run_cmd(python_cmd("train.py", "--check-data", "--data", str(clean)))
    assert proc.returncode == 0 and "no problems that stop a run" in proc.stdout


def test_cached_quick_check_reads_only_changed_files(messy, tmp_path: Path, monkeypatch):
    """A restart re-reads only the files whose size or mtime changed, and reports the same problems."""
    import os

    from finetune.data import preflight

    data, bad = messy
    cache = tmp_path / "cache"
    read: list[str] = []
    real = preflight._check_file
    monkeypatch.setattr(preflight, "_check_file", lambda path, full: read.append(str(path)) or real(path, full))
    first = check_dataset(data, cache=cache)
    assert len(read) == 22 and first.bad_paths() == {str(bad[k]) for k in ("zero", "text", "bomb")}

    read.clear()
    second = check_dataset(data, cache=cache)
    assert read == []  # nothing changed: no file is opened
    assert (second.bad, second.wrong_extension, second.counts) == (first.bad, first.wrong_extension, first.counts)

    fixed, touched = bad["zero"], data / "test" / "dog" / "000.jpg"
    shutil.copy(data / "train" / "cat" / "000.jpg", fixed)  # same name, now a good image
    os.utime(touched, ns=(1, 1))  # same size, another mtime
    (data / "train" / "dog" / "notes.jpg").unlink()
    third = check_dataset(data, cache=cache)
    assert sorted(read) == sorted([str(fixed), str(touched)])
    assert third.bad_paths() == {str(bad["bomb"])}
    assert third.counts == check_dataset(data).counts  # the uncached check agrees


def test_unreadable_cache_is_checked_afresh(messy, tmp_path: Path):
    data, bad = messy
    cache = tmp_path / "cache"
    check_dataset(data, cache=cache)
    for path in cache.iterdir():
        path.write_text("{not json")
    assert check_dataset(data, cache=cache).bad_paths() == check_dataset(data).bad_paths()


@pytest.mark.slow
def test_main_process_checks_and_the_others_receive_its_exclusions(messy, tmp_path: Path):
    import json
    import sys

    from conftest import ROOT, free_port

    data, bad = messy
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {"ACCELERATE_USE_CPU": "1", "FINETUNE_CACHE": str(tmp_path / "cache")}
    for policy in ("skip", "fail"):
        out = tmp_path / policy
        out.mkdir()
        proc = run_cmd([*launch, "--main_process_port", str(free_port()), str(ROOT / "tests" / "preflight_probe.py"),
                        str(out), str(data), policy], env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert ranks[1]["read"] == 0  # only the main process opens files
        if policy == "skip":
            assert ranks[0]["read"] == 22
            assert ranks[0]["exclude"] == ranks[1]["exclude"] == sorted(str(bad[k]) for k in ("zero", "text", "bomb"))
        else:  # the second start: every header comes from the main process's cache
            assert ranks[0]["read"] == 0
            assert "3 image(s) cannot be used" in ranks[0]["error"] and ranks[1]["error"] == ranks[0]["error"]
