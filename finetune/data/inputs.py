"""What predict reads: image files, folders searched recursively (no class structure needed), and
text files listing image paths, one a line."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from finetune.data.folders import image_files
from finetune.errors import UserError

LIST_SUFFIXES = (".txt", ".lst")


def image_paths(inputs: Iterable[str | Path]) -> Iterator[Path]:
    """Every image named by ``inputs``, in order: a folder gives its images sorted by path; a
    ``.txt``/``.lst`` file gives the paths it lists (blank lines and ``#`` comments skipped;
    relative paths are taken from the current folder, like the inputs themselves).

    Raises:
        UserError: an input does not exist, or a listed path does not.
    """
    for item in inputs:
        if "://" in str(item):  # Path() would fold the URL's double slash into one
            raise UserError(f"{item} is a URL: predict reads local files only; download it first "
                            "(e.g. curl -O URL) and pass the file")
        path = Path(item)
        if path.is_dir():
            yield from image_files(path)
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            yield from _listed(path)
        elif path.exists():
            yield path  # any file: one that is not an image is reported when it fails to decode
        else:
            raise UserError(f"input not found: {path}")


def _listed(list_file: Path) -> Iterator[Path]:
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read the list of images {list_file}: {err}") from None
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = Path(line)
        if not path.is_file():
            raise UserError(f"{list_file}, line {number}: image not found: {path}")
        yield path

