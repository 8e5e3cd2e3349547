"""Datasets that download: the classic chapter's hotdog / not-hotdog ImageFolder.

    python -m finetune.data.downloads hotdog        # then: accelerate launch train.py --data PATH

The archive is checked against its SHA-1 before anything is extracted, extracted beside its
final place and renamed, so an interrupted download leaves nothing half-made.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from finetune.config import option, parse_config
from finetune.data.demo import cache_dir
from finetune.errors import UserError, leave, run_cli
from finetune.utils.files import file_digest


@dataclass(frozen=True)
class Archive:
    url: str
    sha1: str
    folder: str  # the dataset folder inside the archive (holding train/ and test/)


ARCHIVES = {
    # d2l.ai's hotdog dataset: 1,400 hotdog and 1,400 not-hotdog photos, train/ and test/.
    "hotdog": Archive("http://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip",
                      "fba480ffa8aa7e0febbb511d181409f899b9baa5", "hotdog"),
}


def download_dataset(name: str, root: Path | None = None, archive: Archive | None = None) -> Path:
    """The dataset folder of ``name`` (``train/`` and ``test/``), downloaded on first use.

    Args:
        name: a key of ``ARCHIVES``.
        root: where datasets live (default: the finetune cache folder).
        archive: override the archive (tests).

    Raises:
        UserError: unknown name, no network, a damaged archive.
    """
    if archive is None:
        if name not in ARCHIVES:
            raise UserError(f"unknown dataset '{name}'; available: {', '.join(ARCHIVES)}")
        archive = ARCHIVES[name]
    root = root or cache_dir()
    target = root / name
    if (target / "train").is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        zip_path = staging / "archive.zip"
        try:
            with urllib.request.urlopen(archive.url, timeout=60) as response, open(zip_path, "wb") as out:
                shutil.copyfileobj(response, out)
        except Exception as err:  # URLError, socket and SSL errors: all mean "cannot download"
            raise UserError(f"cannot download {archive.url} ({type(err).__name__}); on a machine with internet "
                            f"run `python -m finetune.data.downloads {name}` and copy {target} here") from None
        if file_digest(zip_path, "sha1") != archive.sha1:
            raise UserError(f"{archive.url} downloaded damaged (SHA-1 mismatch); try again")
        try:
            with zipfile.ZipFile(zip_path) as zf:
                for member in zf.namelist():  # refuse paths that would land outside the staging folder
                    if os.path.isabs(member) or ".." in Path(member).parts:
                        raise UserError(f"{archive.url} holds an unsafe path: {member}")
                zf.extractall(staging / "x")
        except zipfile.BadZipFile:
            raise UserError(f"{archive.url} is not a zip archive") from None
        extracted = staging / "x" / archive.folder
        if not (extracted / "train").is_dir():
            raise UserError(f"{archive.url} has no {archive.folder}/train folder")
        if not target.exists():
            os.replace(extracted, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass
class DownloadConfig:
    dataset: str = option("hotdog", f"dataset to download: {', '.join(ARCHIVES)}")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # `python -m finetune.data.downloads hotdog`
        argv = ["--dataset", *argv]
    config: DownloadConfig = parse_config(argv, DownloadConfig, description=__doc__.splitlines()[0])
    path = download_dataset(config.dataset)
    print(f"{config.dataset}: {path}\n  accelerate launch train.py --data {path}")


if __name__ == "__main__":
    leave(run_cli(main))
