"""The hotdog download: checked, extracted whole, one clear line when offline."""

from __future__ import annotations

import hashlib
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import run_cmd, write_image_folder

from finetune.data.downloads import Archive, download_dataset
from finetune.errors import UserError


def make_zip(tmp_path: Path, evil: bool = False) -> tuple[Path, str]:
    src = tmp_path / "src" / "hotdog"
    write_image_folder(src / "train", {"hotdog": 2, "not-hotdog": 2})
    write_image_folder(src / "test", {"hotdog": 1, "not-hotdog": 1})
    path = tmp_path / "hotdog.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(src.rglob("*.png")):
            zf.write(f, f.relative_to(src.parent))
        if evil:
            zf.writestr("../outside.txt", "escaped")
    return path, hashlib.sha1(path.read_bytes()).hexdigest()


def test_download_checks_and_extracts(tmp_path: Path):
    path, sha1 = make_zip(tmp_path)
    data = download_dataset("hotdog", root=tmp_path / "cache", archive=Archive(path.as_uri(), sha1, "hotdog"))
    assert sorted(p.name for p in (data / "train").iterdir()) == ["hotdog", "not-hotdog"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["hotdog"]  # no staging left behind


@pytest.mark.parametrize("case, message", [
    ("bad-hash", "SHA-1 mismatch"),
    ("unsafe-path", "unsafe path: ../outside.txt"),
    ("offline", "cannot download http://127.0.0.1:9/hotdog.zip"),
])
def test_download_failures_are_one_line_and_leave_nothing(tmp_path: Path, case: str, message: str):
    path, sha1 = make_zip(tmp_path, evil=case == "unsafe-path")
    archive = Archive(path.as_uri(), "0" * 40 if case == "bad-hash" else sha1, "hotdog")
    if case == "offline":
        archive = Archive("http://127.0.0.1:9/hotdog.zip", sha1, "hotdog")
    with pytest.raises(UserError, match=message):
        download_dataset("hotdog", root=tmp_path / "cache", archive=archive)
    assert list((tmp_path / "cache").iterdir()) == []
    assert not (tmp_path / "outside.txt").exists()


def test_command_names_unknown_datasets(tmp_path: Path):
    proc = run_cmd([sys.executable, "-m", "finetune.data.downloads", "cifar"], env={"FINETUNE_CACHE": str(tmp_path)})
    assert proc.returncode == 2 and "unknown dataset 'cifar'; available: hotdog" in proc.stderr
