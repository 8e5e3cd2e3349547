"""Pick default hyperparameters from measurements: each candidate recipe on several datasets
and image sizes, pretrained MobileNetV2 (the weights that install offline), equal epochs.

    python -m bench.sweep_defaults [--epochs 5] [--out bench/out/sweep.json]

Prints test accuracy per (dataset, size, recipe) and each recipe's worst and mean accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from finetune.commands import train
from bench.common import quietly
from bench.datasets import digits, fashion_mnist
from finetune.demo import demo_dataset

RECIPES = {
    "sgd lr0.01 x10": ["--optimizer", "sgd", "--lr", "0.01"],
    "sgd lr0.003 x10": ["--optimizer", "sgd", "--lr", "0.003"],
    "sgd lr0.001 x10": ["--optimizer", "sgd", "--lr", "0.001"],
    "adamw lr1e-4 x10": ["--optimizer", "adamw", "--lr", "1e-4"],
    "adamw lr3e-4 x10": ["--optimizer", "adamw", "--lr", "3e-4"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--work", default="/tmp/finetune-sweep")
    parser.add_argument("--out", default="bench/out/sweep.json")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    args = parser.parse_args()
    work = Path(args.work)
    cases = [("lfw", demo_dataset(), 64), ("lfw", demo_dataset(), 128),
             ("fashion1k", fashion_mnist(work / "fashion1k"), 64),
             ("digits", digits(work / "digits"), 32)]
    results = []
    for name, data, size in cases:
        for recipe in args.recipes:
            argv = ["--data", str(data), "--image-size", str(size), "--epochs", str(args.epochs),
                    "--output-dir", str(work / "runs" / f"{name}-{size}-{recipe.replace(' ', '_')}"),
                    *RECIPES[recipe]]
            start = time.perf_counter()
            out = quietly(train.main, argv)
            acc = out["history"][-1]["test_acc"]
            results.append({"data": name, "size": size, "recipe": recipe, "test_acc": acc,
                            "seconds": round(time.perf_counter() - start, 1)})
            print(f"{name:10s} {size:4d}px  {recipe:18s} test acc {acc:.4f}  ({results[-1]['seconds']} s)", flush=True)
    print("\nrecipe              worst    mean")
    for recipe in args.recipes:
        accs = [r["test_acc"] for r in results if r["recipe"] == recipe]
        print(f"{recipe:18s} {min(accs):.4f}  {sum(accs) / len(accs):.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
