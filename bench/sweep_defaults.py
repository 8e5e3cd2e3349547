"""Choose the default recipe from measurements: a grid of recipes on many cases (kinds of data,
dataset sizes, image sizes, budgets), each run trained on a train split, validated on a carved
val split, and tested on a test split no run sees. Prints the grid and the default's regret.

    python bench/sweep_defaults.py            # the full sweep (about an hour on 2 cores)
    python bench/sweep_defaults.py --quick    # three small cases, four recipes (the tests run it)

Every run is cached in ``WORK/results.jsonl`` by case, flags, seed and a digest of the code, so an
interrupted sweep goes on where it stopped, and one table never mixes two versions of the code.
The default is whatever ``finetune.training.recipe`` resolves for the case, run with those explicit flags.

A case is scored by test accuracy, or, for a multi-label case (its name marked "(mAP)"), by test
mAP (macro average precision). Regret of a case: the best test score in the grid minus the default's. Targets: worst-case
regret <= 0.03, mean <= 0.01, and the default never below the chapter's own recipe.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import quietly
from bench.datasets import carve_val, digits, fashion_mnist, fit_folder, photos, textures
from finetune.commands import train
from finetune.config import TrainConfig
from finetune.data.demo import demo_dataset
from finetune.data.folders import image_folder
from finetune.data.labelfiles import eval_split
from finetune.data.loader import make_eval_loader
from finetune.data.presets import ModelInput, Preprocessing
from finetune.data.shapes import shapes
from finetune.data.sources import load_splits
from finetune.report.metrics import mean_average_precision
from finetune.training import recipe
from finetune.training.study import CHAPTER as CHAPTER_FIELDS
from finetune.training.study import as_flags

CHAPTER = as_flags(CHAPTER_FIELDS)
SGD = ["--optimizer", "sgd", "--lr", "0.001"]
WU = ["--warmup-epochs", "0.1"]  # a short warmup: most recipes below vary one thing around it
RECIPES: dict[str, list[str]] = {
    "chapter": CHAPTER,
    "previous default": [*SGD, "--augment", "classic", "--warmup-epochs", "1", "--probe-epochs", "0",
                         "--recalibrate-bn-batches", "0"],
    "classic": [*SGD, "--augment", "classic", *WU, "--probe-epochs", "0"],
    "classic no-recal": [*SGD, "--augment", "classic", *WU, "--probe-epochs", "0", "--recalibrate-bn-batches", "0"],
    "mild": [*SGD, "--augment", "mild", *WU, "--probe-epochs", "0"],
    "crop": [*SGD, "--augment", "crop", *WU, "--probe-epochs", "0"],
    "flip": [*SGD, "--augment", "flip", *WU, "--probe-epochs", "0"],
    "none": [*SGD, "--augment", "none", *WU, "--probe-epochs", "0"],
    "mild no-flip": [*SGD, "--augment", "mild", "--no-hflip", *WU, "--probe-epochs", "0"],
    # One axis at a time around the rule's own augmentation choice (--augment auto):
    "auto warmup 0": [*SGD, "--augment", "auto", "--warmup-epochs", "0", "--probe-epochs", "0"],
    "auto warmup 1": [*SGD, "--augment", "auto", "--warmup-epochs", "1", "--probe-epochs", "0"],
    "auto lr 3e-3": ["--optimizer", "sgd", "--lr", "0.003", "--augment", "auto", *WU, "--probe-epochs", "0"],
    "auto adamw 3e-4": ["--optimizer", "adamw", "--lr", "3e-4", "--augment", "auto", *WU, "--probe-epochs", "0"],
    "auto adamw 1e-3": ["--optimizer", "adamw", "--lr", "1e-3", "--augment", "auto", *WU, "--probe-epochs", "0"],
    "auto adamw 1e-4": ["--optimizer", "adamw", "--lr", "1e-4", "--augment", "auto", *WU, "--probe-epochs", "0"],
    "auto lp-ft": [*SGD, "--augment", "auto", *WU, "--probe-epochs", "PROBE"],
}
THREADS = 1  # one compute thread a run: no OpenMP spin-waits on a shared machine; --jobs runs several
QUICK_RECIPES = ["chapter", "previous default", "mild", "none"]


@dataclass(frozen=True)
class Case:
    data: str  # dataset name (see make_data)
    size: int  # --image-size
    epochs: int
    metric: str = "accuracy"  # what scores a run: "accuracy" (single-label) or "mAP" (multi-label)

    @property
    def name(self) -> str:
        return f"{self.data} {self.size}px {self.epochs}ep" + (" (mAP)" if self.metric == "mAP" else "")


CASES = [
    Case("lfw100", 64, 3), Case("lfw100", 224, 3), Case("lfw100", 64, 10),
    Case("fashion600", 64, 3), Case("fashion600", 64, 1), Case("fashion5000", 32, 1),
    Case("digits300", 32, 3), Case("digits300", 32, 10),
    Case("textures300", 96, 3), Case("textures300", 64, 1),
    Case("photos120", 224, 3), Case("photos120", 128, 10), Case("photos120", 224, 1),
    Case("shapes300", 64, 3, "mAP"),
]
QUICK_CASES = [Case("lfw100", 64, 1), Case("digits300", 32, 1), Case("shapes40", 32, 1, "mAP")]


def make_data(name: str, work: Path) -> tuple[Path, Path]:
    """(fit folder with train/ and val/, test folder) of a named dataset, written once under ``work``;
    of a multi-label one (``shapes``), (fit label file with train and val rows, test label file)."""
    if name == "lfw100":  # the demo's 140 train images: 20 per class to val
        fit = carve_val(demo_dataset(), work / name, 20)
        return fit, demo_dataset() / "test"
    if name.startswith("fashion"):
        n = int(name.removeprefix("fashion"))
        raw = fashion_mnist(work / f"{name}-raw", n_train=n + 500, n_test=1000)
        return carve_val(raw, work / name, 50, n_train_per_class=n // 10), raw / "test"
    if name.startswith("digits"):
        n = int(name.removeprefix("digits"))
        raw = digits(work / "digits-raw")  # 1257 train: 25 per class to val, the rest (up to n) to train
        return carve_val(raw, work / name, 25, n_train_per_class=n // 10), raw / "test"
    if name == "textures300":
        root = textures(work / name, n_train=50, n_val=20, n_test=40)
        return fit_folder(root), root / "test"
    if name == "photos120":
        root = photos(work / name, n_train=20, n_val=10, n_test=20)
        return fit_folder(root), root / "test"
    if name.startswith("shapes"):
        return shape_files(work / name, int(name.removeprefix("shapes")))
    raise ValueError(name)


def shape_files(root: Path, n: int) -> tuple[Path, Path]:
    """A multi-label case: ``n`` images of 1-3 shapes (96 px), a fifth of them val rows of the fit
    label file (which train.py takes as the split it evaluates, as a val/ folder alone), and a test
    label file of ``n`` other images (another seed) that no run sees."""
    fit, test = root / "fit" / "labels.csv", root / "test" / "labels.csv"
    if not (fit.is_file() and test.is_file()):
        raw = shapes(root / "fit", n=n, size=96, seed=0).read_text().splitlines()
        rows = [f"{line},{'val' if i % 5 == 4 else 'train'}" for i, line in enumerate(raw[1:])]
        fit.write_text("\n".join([raw[0] + ",split", *rows]) + "\n")
        shapes(root / "test", n=n, size=96, seed=1)
    return fit, test


def default_flags(case: Case, fit: Path) -> list[str]:
    """The recipe's choices for ``case`` as explicit flags (what a plain run would use)."""
    defaults = TrainConfig()
    ds = load_splits(fit).train  # a label file's train rows, or fit/train
    steps = math.ceil(len(ds) / defaults.batch_size)
    facts = recipe.DatasetFacts(num_images=len(ds), num_classes=len(ds.classes),
                                short_side=recipe.median_short_side([p for p, _ in ds.samples]),
                                image_size=case.size, epochs=case.epochs, steps_per_epoch=steps)
    chosen, _ = recipe.resolve(defaults, facts)  # what train.py resolves, as explicit flags
    flags = ["--optimizer", chosen.optimizer, "--lr", f"{chosen.lr:g}", "--augment", chosen.augment]
    if not chosen.hflip:
        flags.append("--no-hflip")
    return [*flags, "--warmup-epochs", f"{chosen.warmup_epochs:g}", "--probe-epochs", f"{chosen.probe_epochs:g}"]


def resolve_flags(flags: list[str], case: Case) -> list[str]:
    probe = "1" if case.epochs >= 3 else "0.3"  # LP-FT: one epoch of probe, a third of a 1-epoch run
    return [probe if f == "PROBE" else f for f in flags]


@torch.inference_mode()
def _eval_inputs(size: int) -> tuple[Preprocessing, ModelInput]:
    pre = Preprocessing(size, round(size * 256 / 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return pre, ModelInput(pre.mean, pre.std, TrainConfig().channels_last)


@torch.inference_mode()
def test_accuracy(model: torch.nn.Module, test_dir: Path, classes: list[str], size: int) -> float:
    """Accuracy of a trained model (as train.main left it: prepared, mixed precision) on ``test_dir``."""
    pre, to_input = _eval_inputs(size)
    loader = make_eval_loader(image_folder(test_dir, classes), pre, batch_size=128, num_workers=0)
    model.eval()
    correct = total = 0
    for images, targets, _ in loader:
        correct += (model(to_input(images)).argmax(1) == targets).sum().item()
        total += len(targets)
    return correct / total


@torch.inference_mode()
def test_map(model: torch.nn.Module, test_file: Path, classes: list[str], size: int) -> float:
    """mAP (macro average precision) of a trained multi-label model on every row of ``test_file``."""
    pre, to_input = _eval_inputs(size)
    ds, _ = eval_split(test_file, classes, None, task="multilabel")
    loader = make_eval_loader(ds, pre, batch_size=128, num_workers=0)
    model.eval()
    targets, probabilities = [], []
    for images, hot, _ in loader:
        targets.append(hot)
        probabilities.append(torch.sigmoid(model(to_input(images)).float()))
    return mean_average_precision(torch.cat(targets), torch.cat(probabilities))


def test_score(case: Case, model: torch.nn.Module, test: Path, classes: list[str]) -> float:
    """The case's metric of a trained model on its test set."""
    return (test_map if case.metric == "mAP" else test_accuracy)(model, test, classes, case.size)


def run(case: Case, flags: list[str], fit: Path, test_dir: Path, work: Path, seed: int) -> dict[str, Any]:
    out_dir = work / "runs" / f"{abs(hash((case, tuple(flags), seed)))}"
    shutil.rmtree(out_dir, ignore_errors=True)
    argv = ["--data", str(fit), "--image-size", str(case.size), "--epochs", str(case.epochs), "--seed", str(seed),
            "--num-workers", "0", "--threads", str(THREADS), "--output-dir", str(out_dir), "--log-with", "none", "--no-plots", *flags]
    start = time.perf_counter()
    out = quietly(train.main, argv)
    # The split train.py evaluated (the fit data's val part) is the run's validation score.
    result = {"val": out.history[-1]["test_map" if case.metric == "mAP" else "test_acc"],
              "test": test_score(case, out.model, test_dir, out.classes),
              "seconds": round(time.perf_counter() - start, 1)}
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


def code_version() -> str:
    """A digest of the code a run's result depends on: the package, this sweep and its datasets.
    Part of every cache key, so that one table never mixes results of two versions (a change of
    the eval preprocessing alone moved a 32 px case by 0.03)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*root.joinpath("finetune").rglob("*.py"), root / "bench" / "sweep_defaults.py",
                        root / "bench" / "datasets.py"]):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


CODE_VERSION = code_version()


def key(case: Case, flags: list[str], seed: int) -> str:
    return json.dumps([dataclasses.astuple(case), flags, seed, CODE_VERSION])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three small cases, four recipes")
    parser.add_argument("--work", default="/tmp/finetune-sweep", help="datasets, runs and the results cache")
    parser.add_argument("--out", default="bench/out/sweep.json")
    parser.add_argument("--recipes", nargs="*", help="a subset of the grid")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0], help="seeds; a second one for close calls")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one compute thread each")
    parser.add_argument("--cases", nargs="*", help="only the cases whose name contains one of these")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cases = QUICK_CASES if args.quick else CASES
    if args.cases:
        cases = [c for c in cases if any(part in c.name for part in args.cases)]
    names = args.recipes or (QUICK_RECIPES if args.quick else list(RECIPES))
    cache_file = work / "results.jsonl"
    cache = {}
    if cache_file.exists():
        for line in cache_file.read_text().splitlines():
            entry = json.loads(line)
            cache[entry["key"]] = entry["result"]

    def measured(case: Case, flags: list[str], fit: Path, test_dir: Path) -> dict[str, float]:
        per_seed = []
        for seed in args.seeds:
            k = key(case, flags, seed)
            if k not in cache:
                cache[k] = run(case, flags, fit, test_dir, work, seed)
                with cache_file.open("a") as f:
                    f.write(json.dumps({"key": k, "result": cache[k]}) + "\n")
            per_seed.append(cache[k])
        return {m: sum(r[m] for r in per_seed) / len(per_seed) for m in ("val", "test", "seconds")}

    # Run what the cache lacks, several runs at a time (each on one thread), then read it all back.
    folders = {case: make_data(case.data, work) for case in cases}
    todo = []  # recipe by recipe, so that a sweep cut short still compares whole rows
    for flags_of in [lambda c, n=n: resolve_flags(RECIPES[n], c) for n in names] + \
            [lambda c: default_flags(c, folders[c][0])]:
        for case in cases:
            flags = flags_of(case)
            todo += [(case, flags, *folders[case], work, seed) for seed in args.seeds
                     if key(case, flags, seed) not in cache and (case, flags, *folders[case], work, seed) not in todo]
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run, *job): job for job in todo}
        for future in concurrent.futures.as_completed(futures):
            case, flags, _, _, _, seed = futures[future]
            k = key(case, flags, seed)
            cache[k] = future.result()
            with cache_file.open("a") as f:
                f.write(json.dumps({"key": k, "result": cache[k]}) + "\n")
            print(f"  ran {case.name} seed {seed} {' '.join(flags)}: test {cache[k]['test']:.3f}", flush=True)

    rows = []
    for case in cases:
        fit, test_dir = make_data(case.data, work)
        row: dict[str, Any] = {"case": case.name, "metric": case.metric, "recipes": {}}
        for name in names:
            row["recipes"][name] = measured(case, resolve_flags(RECIPES[name], case), fit, test_dir)
            r = row["recipes"][name]
            print(f"{case.name:26s} {name:18s} val {r['val']:.3f}  test {r['test']:.3f}  ({r['seconds']} s)",
                  flush=True)
        flags = default_flags(case, fit)
        row["default_flags"] = " ".join(flags)
        row["default"] = measured(case, flags, fit, test_dir)
        best = max([r["test"] for r in row["recipes"].values()] + [row["default"]["test"]])
        row["regret"] = best - row["default"]["test"]
        print(f"{case.name:26s} {'DEFAULT':18s} val {row['default']['val']:.3f}  "
              f"test {row['default']['test']:.3f}  regret {row['regret']:.3f}  ({row['default_flags']})", flush=True)
        rows.append(row)
    summary = report(rows, names)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    return {"rows": rows, "summary": summary}


def report(rows: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Print the grid (the test score: accuracy, or mAP for a case marked (mAP); the best of each case
    starred) and the default's regret."""
    print("\ntest accuracy per case, mAP for a case marked (mAP) (* best in the grid)")
    header = ["case", *names, "default", "regret"]
    print(" | ".join(header))
    for row in rows:
        best = max(r["test"] for r in row["recipes"].values())
        cells = [f"{row['recipes'][n]['test']:.3f}{'*' if row['recipes'][n]['test'] == best else ''}"
                 for n in names]
        print(" | ".join([row["case"], *cells, f"{row['default']['test']:.3f}", f"{row['regret']:.3f}"]))
    regrets = [row["regret"] for row in rows]
    below_chapter = [row["case"] for row in rows if "chapter" in row["recipes"]
                     and row["default"]["test"] < row["recipes"]["chapter"]["test"]]
    summary = {"worst_regret": max(regrets), "mean_regret": sum(regrets) / len(regrets),
               "below_chapter": below_chapter,
               "mean_test": {n: sum(r["recipes"][n]["test"] for r in rows) / len(rows) for n in names}}
    summary["mean_test"]["default"] = sum(r["default"]["test"] for r in rows) / len(rows)
    print(f"\ndefault: worst-case regret {summary['worst_regret']:.3f} (target <= 0.03), mean regret "
          f"{summary['mean_regret']:.3f} (target <= 0.01); below the chapter's recipe on: "
          f"{', '.join(below_chapter) or 'no case'}")
    print("mean test score: " + ", ".join(f"{n} {a:.3f}" for n, a in summary["mean_test"].items()))
    return summary


if __name__ == "__main__":
    main()
