"""How much temperature scaling improves the probabilities of a short fine-tune: ECE (15 bins) and
NLL on the test split, before and after, on several kinds of small real data.

    .venv/bin/python -m bench.calibration_quality [--work DIR] [--epochs 3]

Per kind: mobilenet_v2 (ImageNet weights) fine-tuned for a few epochs at 64 px with val/ held out
(bench.trust_runs); the temperature fitted on the validation logits exactly as training fits it
(``models.calibration.calibration_meta``); ECE and NLL of the test split with T = 1 and with it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bench.trust_runs import KINDS, load, outputs, prepare, split_paths, train_run
from finetune.models.calibration import calibration_figures, calibration_meta


def measure(root: Path, kind: str, epochs: int) -> dict:
    run = train_run(kind, root, epochs=epochs)
    clf = load(run)
    data = prepare(kind, root)
    results = {}
    for split in ("val", "test"):
        paths, names = split_paths(data, split)
        logits, _ = outputs(clf, paths)
        results[split] = (logits, torch.tensor([clf.classes.index(n) for n in names]))
    fitted = calibration_meta(*results["val"], None, None)["calibration"]
    test = calibration_figures(*results["test"], fitted["temperature"])
    recorded = clf.meta.get("calibration", {}).get("temperature")
    return {"kind": kind, "val_images": fitted["images"], "test_images": len(results["test"][1]),
            "test_accuracy": float((results["test"][0].argmax(1) == results["test"][1]).double().mean()),
            "temperature": fitted["temperature"], "recorded_temperature": recorded,
            **{k: test[k] for k in ("ece_before", "ece_after", "nll_before", "nll_after")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="folder for the datasets and runs (reused when present; default: temporary)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--out", default="bench/out/calibration_quality.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="calibration-") as tmp:
        root = Path(args.work or tmp)
        results = [measure(root, kind, args.epochs) for kind in args.kinds]
    print(f"{'kind':>9s} {'val':>4s} {'test':>5s} {'acc':>6s} {'T':>6s} {'ECE before':>11s} {'ECE after':>10s} "
          f"{'NLL before':>11s} {'NLL after':>10s}")
    for r in results:
        print(f"{r['kind']:>9s} {r['val_images']:4d} {r['test_images']:5d} {r['test_accuracy']:6.3f} "
              f"{r['temperature']:6.3f} {r['ece_before']:11.4f} {r['ece_after']:10.4f} {r['nll_before']:11.4f} "
              f"{r['nll_after']:10.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
