"""Loader-only images/s: the data pipeline before issue 13 and now, next to a bare decode of the same files.

    python -m bench.loader_speed [--images 48] [--rounds 5] [--workers N] [--out bench/out/loader_speed.json]

Writes three small folders (500x375 JPEGs, 3000x2000 JPEGs, 500x375 PNGs; photo crops from
scikit-image) and, for each, measures:
- one core: the train and eval presets as the dataset calls them (seeding per image included),
  the old presets (bench/legacy_presets.py) and the new ones interleaved round by round, so
  that the other load of a shared machine hits both alike; ratios are medians of per-round ratios.
  Images per second of this process's CPU time (one thread): what a core of its own would do,
  also where other programs share the cores (wall-clock rates then fall with their load);
- a bare full decode of the same files (Pillow, and libjpeg-turbo through simplejpeg): the floor
  a pipeline that decodes every pixel cannot beat;
- the same images as rows of a Hugging Face dataset (written by ``save_to_disk``, read by
  ``finetune.data.hfdatasets``): the train and eval presets on the rows, interleaved with the same
  presets on the files; ``rows/files`` ratios are medians of per-round ratios;
- N loader workers (default: this machine's cores): whole DataLoader epochs, old and new interleaved.
Then it projects the feed of a 16-core GPU host (15 workers) against the GPU's estimated ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import datasets
import simplejpeg
import torch
from PIL import Image
from torch.utils.data import DataLoader

from bench import legacy_presets
from bench.datasets import photo_folder
from finetune.data import folders, hfdatasets, presets
from finetune.data import loader as data

SIZE, RESIZE = 224, 256
# resnet18 at 224 px, bf16 + channels-last, on one H200: issue 13's estimate, not a measurement.
GPU_CEILING = (12_000, 14_000)
HOST_CORES = 16


SETS = {"small": "jpeg 500x375", "large": "jpeg 3000x2000", "png": "png 500x375"}


def write_sets(root: Path, n: int, which: list[str]) -> dict[str, Path]:
    """The folders named in ``which`` (of ``SETS``; 500x375 JPEGs always), ``n`` training images each."""
    sets = {SETS["small"]: photo_folder(root / "small", n, 0)}
    if "large" in which:
        sets[SETS["large"]] = photo_folder(root / "large", n, 0, size=(3000, 2000))
    if "png" in which:
        sets[SETS["png"]] = root / "png"
        for jpg in sorted((root / "small" / "train").rglob("*.jpg")):
            out = root / "png" / "train" / jpg.parent.name / (jpg.stem + ".png")
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.open(jpg).save(out)
    return sets


def as_rows(ds: Any, out: Path) -> hfdatasets.RowImages:
    """The files of an ImageFolder as the rows of a dataset written by ``save_to_disk`` (image bytes
    and a ClassLabel, in the folder's order), read back as training reads them."""
    rows = datasets.Dataset.from_dict(
        {"image": [{"bytes": Path(p).read_bytes(), "path": Path(p).name} for p, _ in ds.samples],
         "label": [t for _, t in ds.samples]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=ds.classes)}))
    datasets.disable_progress_bars()
    rows.save_to_disk(str(out))
    table = hfdatasets.read_rows(out)
    return hfdatasets.RowImages(table, table.rows, ds.classes)


def pipelines(folder: Path) -> dict[str, Callable[[int], Any]]:
    """What one core runs per image: name -> f(index)."""
    ds = folders.image_folder(folder / "train")
    rows = as_rows(ds, folder / "rows")
    assert [t for _, t in rows.samples] == ds.targets  # image i is the same image either way
    paths = [p for p, _ in ds.samples]
    train_old = legacy_presets.SeededDataset(ds, legacy_presets.TrainPreset(size=SIZE), seed=0)
    train_new = data.SeededDataset(ds, presets.TrainPreset(size=SIZE), seed=0)
    eval_old = data.IndexedDataset(ds, legacy_presets.EvalPreset(crop_size=SIZE, resize_size=RESIZE))
    eval_new = data.IndexedDataset(ds, presets.EvalPreset(crop_size=SIZE, resize_size=RESIZE))
    train_rows = data.SeededDataset(rows, presets.TrainPreset(size=SIZE), seed=0)
    eval_rows = data.IndexedDataset(rows, presets.EvalPreset(crop_size=SIZE, resize_size=RESIZE))
    runs = {"train before": lambda i: train_old[(0, i)], "train now": lambda i: train_new[(0, i)],
            "eval before": lambda i: eval_old[i], "eval now": lambda i: eval_new[i],
            "train now, dataset rows": lambda i: train_rows[(0, i)], "eval now, dataset rows": lambda i: eval_rows[i],
            "bare decode, Pillow": lambda i: Image.open(paths[i]).convert("RGB")}
    if paths[0].endswith(".jpg"):
        runs["bare decode, libjpeg-turbo"] = lambda i: simplejpeg.decode_jpeg(Path(paths[i]).read_bytes())
    return runs


def one_core(folder: Path, rounds: int) -> dict[str, Any]:
    """Images per CPU-second per pipeline (median of rounds) and the now/before ratios (median of
    per-round ratios)."""
    runs = pipelines(folder)
    n = len(folders.image_folder(folder / "train").samples)
    for run in runs.values():  # warm up: imports, first-call allocations, the page cache
        run(0)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.process_time()
            for i in range(n):
                run(i)
            rates[name].append(n / (time.process_time() - start))
    out: dict[str, Any] = {name: statistics.median(r) for name, r in rates.items()}
    for kind in ("train", "eval"):
        out[f"{kind} ratio"] = statistics.median(
            now / before for now, before in zip(rates[f"{kind} now"], rates[f"{kind} before"]))
        out[f"{kind} rows/files ratio"] = statistics.median(
            rows / files for rows, files in zip(rates[f"{kind} now, dataset rows"], rates[f"{kind} now"]))
    return out


def loader_rate(loader: DataLoader, epochs: int) -> float:
    """Images/s over ``epochs`` whole epochs, after one epoch that starts the workers."""
    for _ in loader:
        pass
    seen, start = 0, time.perf_counter()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch + 1)
        for images, _ in loader:
            seen += len(images)
    return seen / (time.perf_counter() - start)


def with_workers(folder: Path, workers: int, rounds: int) -> dict[str, float]:
    """Train-loader images/s with ``workers`` workers, before and now, interleaved."""
    ds = folders.image_folder(folder / "train")
    options = {"batch_size": 32, "num_workers": workers, "persistent_workers": True, "prefetch_factor": 4}
    loaders = {
        "before": DataLoader(legacy_presets.SeededDataset(ds, legacy_presets.TrainPreset(size=SIZE), 0),
                             sampler=data.EpochSampler(len(ds), 0), **options),
        "now": DataLoader(data.SeededDataset(ds, presets.TrainPreset(size=SIZE), 0),
                          sampler=data.EpochSampler(len(ds), 0), collate_fn=data.collate, **options)}
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(rounds):
        for name, loader in loaders.items():
            rates[name].append(loader_rate(loader, 2))
    out = {name: statistics.median(r) for name, r in rates.items()}
    out["ratio"] = statistics.median(a / b for a, b in zip(rates["now"], rates["before"]))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="images per folder")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (odd: a clean median)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="loader workers (0: one core only)")
    parser.add_argument("--sets", default="small,large,png",
                        help="which folders: small (500x375 JPEGs, always), large (3000x2000 JPEGs), png")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core: what a loader worker has
    results: dict[str, Any] = {"cores": len(os.sched_getaffinity(0)), "workers": args.workers, "size": SIZE}
    with tempfile.TemporaryDirectory() as tmp:
        sets = write_sets(Path(tmp), args.images, args.sets.split(","))
        for name, folder in sets.items():
            core = one_core(folder, args.rounds)
            results[name] = {"one core": core}
            print(f"{name}, one core (images per CPU-second):")
            for key, value in core.items():
                print(f"  {key:28s} {value:8.2f}{'x' if 'ratio' in key else ''}")
            if args.workers > 0:
                multi = with_workers(folder, args.workers, max(1, args.rounds // 2))
                results[name][f"{args.workers} workers"] = multi
                print(f"  train loader, {args.workers} workers: {multi['now']:.1f} vs {multi['before']:.1f} img/s "
                      f"before: {multi['ratio']:.2f}x")
    core = results["jpeg 500x375"]["one core"]
    results["train_now_over_before"], results["eval_now_over_before"] = core["train ratio"], core["eval ratio"]
    results["train_rows_over_files"] = core["train rows/files ratio"]
    results["eval_rows_over_files"] = core["eval rows/files ratio"]
    feed = (HOST_CORES - 1) * core["train now"]
    results["projection"] = {"host cores": HOST_CORES, "workers": HOST_CORES - 1, "feed img/s": feed,
                             "before img/s": (HOST_CORES - 1) * core["train before"], "gpu ceiling": GPU_CEILING}
    print(f"projection for a {HOST_CORES}-core GPU host, {HOST_CORES - 1} workers at the one-core rate of this "
          f"machine (train, 500x375 JPEGs): {feed:,.0f} img/s now, {(HOST_CORES - 1) * core['train before']:,.0f} "
          f"before; resnet18 on one H200 is estimated at {GPU_CEILING[0]:,}-{GPU_CEILING[1]:,} img/s "
          f"(not measured): the loader covers {feed / GPU_CEILING[1]:.0%}-{feed / GPU_CEILING[0]:.0%} of it")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
