"""Preflight at scale: the seconds a run's start spends checking 100,000 small images, the first
time (every header read) and the second (results cached by path, size and mtime).

    python -m bench.preflight_speed [--images 100000] [--rounds 3] [--out result.json]

Each round deletes the cache, times a first start, then a second, so first and second starts
alternate (A/B/A/B) under the same load from other work on the machine. The listing alone (the
directory walk and one stat per file, which a second start cannot avoid) is timed in the same
rounds. Target: a second start within 1 s on 2 cores. Wall and CPU seconds are both printed: on a
machine shared with other work, the wall time also counts waiting for a core.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from finetune.data.folders import class_folders, find_layout
from finetune.data.listing import list_folder
from finetune.data.preflight import apply_policy, check_dataset

CLASSES = 10
TEST_SHARE = 10  # one image in ten goes to test/


def tiny_images(count: int) -> list[bytes]:
    """A few distinct 8x8 PNGs and JPEGs, encoded once (writing them is then only file I/O)."""
    out = []
    for i in range(count):
        img = Image.new("RGB", (8, 8), (i * 40 % 256, i * 90 % 256, i * 20 % 256))
        buffer = io.BytesIO()
        img.save(buffer, format="PNG" if i % 2 else "JPEG")
        out.append(buffer.getvalue())
    return out


def make_dataset(root: Path, images: int) -> None:
    """``images`` files in ``root/train`` and ``root/test``, ``CLASSES`` classes."""
    blobs = tiny_images(8)
    for split in ("train", "test"):
        for c in range(CLASSES):
            (root / split / f"class{c}").mkdir(parents=True)
    for i in range(images):
        split = "test" if i // CLASSES % TEST_SHARE == 0 else "train"
        blob = blobs[i % len(blobs)]
        ext = ".png" if i % len(blobs) % 2 else ".jpg"
        with open(root / split / f"class{i % CLASSES}" / f"{i:06d}{ext}", "wb") as f:
            f.write(blob)


def timed(work) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of ``work()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def start(data: Path, cache: Path) -> None:
    """A run's preflight: check (with the cache) and apply the fail policy."""
    exclude, _ = apply_policy(check_dataset(data, full=False, cache=cache), "fail")
    assert not exclude


def listing(data: Path) -> None:
    for folder in find_layout(data).folders().values():
        for c in class_folders(folder):
            list_folder(folder / c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="preflight-bench-"))
    try:
        data, cache = tmp / "data", tmp / "cache"
        begin = time.perf_counter()
        make_dataset(data, args.images)
        print(f"wrote {args.images} images in {time.perf_counter() - begin:.1f} s; {os.cpu_count()} CPUs")
        runs: dict[str, list[tuple[float, float]]] = {"first": [], "second": [], "listing": []}
        for r in range(args.rounds):
            shutil.rmtree(cache, ignore_errors=True)
            runs["first"].append(timed(lambda: start(data, cache)))
            runs["second"].append(timed(lambda: start(data, cache)))
            runs["listing"].append(timed(lambda: listing(data)))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.2f} s (CPU {v[-1][1]:.2f} s)" for k, v in runs.items()))
        result = {"images": args.images, "rounds": args.rounds}
        for key, values in runs.items():
            result[f"{key}_s"] = statistics.median(v[0] for v in values)
            result[f"{key}_cpu_s"] = statistics.median(v[1] for v in values)
        result["first_over_second"] = result["first_s"] / result["second_s"]
        result["cache_mib"] = sum(p.stat().st_size for p in cache.iterdir()) / 2**20
        print(f"median of {args.rounds}: first start {result['first_s']:.2f} s, second start {result['second_s']:.2f} s "
              f"(CPU {result['second_cpu_s']:.2f} s): {result['first_over_second']:.1f}x faster; the listing alone "
              f"{result['listing_s']:.2f} s (CPU {result['listing_cpu_s']:.2f} s); cache {result['cache_mib']:.1f} MiB; "
              f"target second start <= 1 s: {'met' if result['second_s'] <= 1 else 'NOT met'}")
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
