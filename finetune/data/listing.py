"""Listing a dataset's image files with their sizes and modification times, and keeping a per-file
check result across runs, so that a restart re-reads only the files that changed.

The cache of one dataset folder is a folder of JSON files: ``index.json`` holds, per directory of
images, a digest of its listing (names, sizes, mtimes) and the files found bad; one file per
directory holds every file's size, mtime and result. A second start lists the directories,
compares digests, and reads per-file entries only where a directory changed. Every file is
written atomically; nothing is unpickled.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.data.folders import is_image_name
from finetune.errors import UserError
from finetune.utils.files import atomic_write_text

CACHE_VERSION = 1  # of the cache files' layout
Result = list[Any]  # [problem or None, actual format where the extension is wrong or None]


@dataclass
class DirListing:
    """The image files directly in one directory, sorted by name."""

    path: str
    names: list[str]
    sizes: list[int]
    mtimes: list[int]  # st_mtime_ns

    def digest(self) -> str:
        """A digest of the listing: equal exactly when no file was added, removed, resized or touched."""
        h = hashlib.sha256("\0".join(self.names).encode("utf-8", "surrogateescape"))
        h.update(array.array("q", self.sizes).tobytes())
        h.update(array.array("q", self.mtimes).tobytes())
        return h.hexdigest()


def list_folder(folder: str | Path) -> list[DirListing]:
    """A ``DirListing`` for ``folder`` and each directory below it (symlinks followed).

    A file that cannot be stat'ed (a dangling link) is listed with size 0: as unusable as an empty file.
    """
    out = []
    pending = [str(folder)]
    while pending:
        path = pending.pop()
        files = []
        # Entries of a directory descriptor stat relative to it: no path walk per file.
        fd = os.open(path, os.O_RDONLY)
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir():
                        pending.append(os.path.join(path, entry.name))
                    elif is_image_name(entry.name):
                        try:
                            st = entry.stat()
                            files.append((entry.name, st.st_size, st.st_mtime_ns))
                        except OSError:
                            files.append((entry.name, 0, 0))
        finally:
            os.close(fd)
        files.sort()
        out.append(DirListing(path, [f[0] for f in files], [f[1] for f in files], [f[2] for f in files]))
    return sorted(out, key=lambda d: d.path)


def _key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


class ResultCache:
    """Check results of a dataset's files, by path, size and mtime (see the module docstring).

    Args:
        folder: the cache's own folder (one per dataset folder).
        root: the dataset folder; paths are kept relative to it.
    """

    def __init__(self, folder: Path, root: str):
        self.folder = folder
        self.root = root
        index = self._read(folder / "index.json")
        valid = index.get("version") == CACHE_VERSION and index.get("root") == root
        self.dirs: dict[str, dict[str, Any]] = index.get("dirs", {}) if valid else {}
        self.seen: set[str] = set()
        self.changed: dict[str, dict[str, Any]] = {}  # dir -> entries to write

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none yet, or unreadable: check again
            return {}
        return data if isinstance(data, dict) else {}

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def unchanged(self, listing: DirListing) -> dict[str, Result] | None:
        """The results of the non-clean files of ``listing`` if none of its files changed, else None."""
        rel = self._rel(listing.path)
        self.seen.add(rel)
        known = self.dirs.get(rel)
        if known is None or known.get("digest") != listing.digest():
            return None
        return known.get("flagged", {})

    def entries(self, listing: DirListing) -> dict[str, list[Any]]:
        """Per-file ``[size, mtime_ns, problem, wrong format]`` last recorded for ``listing``'s directory."""
        rel = self._rel(listing.path)
        if rel not in self.dirs:
            return {}
        data = self._read(self.folder / f"{_key(rel)}.json")
        files = data.get("files") if data.get("dir") == rel else None
        return files if isinstance(files, dict) else {}

    def record(self, listing: DirListing, flagged: dict[str, Result]) -> None:
        """Keep the results of every file of ``listing``: ``flagged`` (by name) holds those that
        are not clean."""
        rel = self._rel(listing.path)
        self.seen.add(rel)
        clean = [None, None]
        files = {name: [size, mtime, *flagged.get(name, clean)]
                 for name, size, mtime in zip(listing.names, listing.sizes, listing.mtimes)}
        self.dirs[rel] = {"digest": listing.digest(), "flagged": flagged}
        self.changed[rel] = files

    def save(self) -> None:
        """Write what changed (directories gone from the dataset are dropped). A cache that cannot be
        written only costs time at the next start: that is not an error."""
        gone = set(self.dirs) - self.seen
        if not self.changed and not gone:
            return
        for rel in gone:
            del self.dirs[rel]
            (self.folder / f"{_key(rel)}.json").unlink(missing_ok=True)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for rel, files in self.changed.items():
                atomic_write_text(self.folder / f"{_key(rel)}.json",
                                  json.dumps({"dir": rel, "files": files}, separators=(",", ":")))
            atomic_write_text(self.folder / "index.json", json.dumps(
                {"version": CACHE_VERSION, "root": self.root, "dirs": self.dirs}, separators=(",", ":")))
        except (OSError, UserError):
            shutil.rmtree(self.folder, ignore_errors=True)  # half of a cache would only mislead
