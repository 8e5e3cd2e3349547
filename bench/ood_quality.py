"""How well an out-of-distribution score tells a held-out test split of the training kind of data
from images of another kind: AUROC per pair of datasets, several scores side by side.

    .venv/bin/python -m bench.ood_quality [--work DIR] [--epochs 3]

For each pair (trained on A, shown B): mobilenet_v2 (ImageNet weights) is fine-tuned on A for a few
epochs at 64 px (val/ held out); its test images are the in-distribution set, up to --ood-images of
B's test images the out-of-distribution one. Scores, higher meaning "less like the training data":
- energy: -logsumexp(logits) (Liu et al. 2020);
- max_softmax: 1 - the top softmax probability (Hendrycks & Gimpel 2017), the usual baseline;
- mahalanobis: distance of the penultimate features to the nearest class mean, shared covariance
  fitted on the training images (Lee et al. 2018);
- knn_cosine: 1 - cosine similarity to the nearest training image's features (Sun et al. 2022),
  what predict.py uses (``models.calibration.knn_distance``).
Also: the share of A's test images and of B's images that the OOD threshold recorded in the
checkpoint marks unknown (predict.py --abstain, before its confidence rule), and what other rules
for that threshold would mark: a lower quantile of the validation scores, a normal fit to them
(mean + 1.645 sd), and the 95th percentile of the training images' leave-one-out scores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bench.trust_runs import load, outputs, prepare, split_paths, train_run
from finetune.models.calibration import Calibration, auroc, energy_score, feature_bank, knn_distance

PAIRS = (("faces", "fashion"), ("fashion", "textures"), ("textures", "photos"), ("photos", "faces"))


def mahalanobis(train_f: torch.Tensor, train_y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Distance to the nearest class mean under the shared (lightly shrunk) covariance."""
    train_f, f = train_f.double(), f.double()
    classes = train_y.unique()
    means = torch.stack([train_f[train_y == c].mean(0) for c in classes])
    centred = train_f - means[torch.searchsorted(classes, train_y)]
    cov = centred.T @ centred / len(train_f)
    cov += 1e-3 * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)  # fewer images than dimensions
    precision = torch.linalg.inv(cov)
    d = torch.stack([((f - m) @ precision * (f - m)).sum(1) for m in means], dim=1)
    return d.min(dim=1).values


def measure(root: Path, kind: str, other: str, epochs: int, ood_images: int) -> dict:
    run = train_run(kind, root, epochs=epochs)
    clf = load(run)
    data, other_data = prepare(kind, root), prepare(other, root)
    train_paths, train_names = split_paths(data, "train")
    test_paths, _ = split_paths(data, "test")
    ood_paths, _ = split_paths(other_data, "test", limit=ood_images)
    train_logits, train_f = outputs(clf, train_paths)
    train_y = torch.tensor([clf.classes.index(n) for n in train_names])
    test_logits, test_f = outputs(clf, test_paths)
    ood_logits, ood_f = outputs(clf, ood_paths)
    scores = {
        "energy": (energy_score(test_logits), energy_score(ood_logits)),
        "max_softmax": (1 - test_logits.softmax(1).max(1).values, 1 - ood_logits.softmax(1).max(1).values),
        "mahalanobis": (mahalanobis(train_f, train_y, test_f), mahalanobis(train_f, train_y, ood_f)),
        "knn_cosine": (knn_distance(test_f, feature_bank(train_f)), knn_distance(ood_f, feature_bank(train_f))),
    }
    result = {"trained_on": kind, "shown": other, "in_images": len(test_paths), "ood_images": len(ood_paths),
              "auroc": {name: auroc(a, b) for name, (a, b) in scores.items()}}
    threshold = Calibration.of(clf.meta).ood_threshold
    if threshold is not None and clf.ood_bank is not None:  # the checkpoint's own features and threshold
        in_s, out_s = clf.ood_scores(test_f), clf.ood_scores(ood_f)
        result["unknown_share"] = {"in": float((in_s > threshold).double().mean()),
                                   "ood": float((out_s > threshold).double().mean())}
        val_s = clf.ood_scores(outputs(clf, split_paths(data, "val")[0])[1]).double()
        loo = knn_distance(train_f, feature_bank(train_f), exclude_self=True).double()
        rules = {"val q95 (recorded)": threshold, "val q90": float(torch.quantile(val_s, 0.90)),
                 "val normal q95": float(val_s.mean() + 1.645 * val_s.std()),
                 "train leave-one-out q95": float(torch.quantile(loo, 0.95))}
        result["threshold_rules"] = {rule: {"threshold": t, "in": float((in_s > t).double().mean()),
                                            "ood": float((out_s > t).double().mean())} for rule, t in rules.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="folder for the datasets and runs (reused when present; default: temporary)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--ood-images", type=int, default=300)
    parser.add_argument("--out", default="bench/out/ood_quality.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ood-") as tmp:
        root = Path(args.work or tmp)
        results = [measure(root, a, b, args.epochs, args.ood_images) for a, b in PAIRS]
    names = list(results[0]["auroc"])
    print(f"{'trained on':>10s} {'shown':>9s} " + " ".join(f"{n:>12s}" for n in names)
          + f" {'unknown in / ood':>17s}")
    for r in results:
        share = r.get("unknown_share")
        shown = f"{share['in']:.2f} / {share['ood']:.2f}" if share else "-"
        print(f"{r['trained_on']:>10s} {r['shown']:>9s} " + " ".join(f"{r['auroc'][n]:12.3f}" for n in names)
              + f" {shown:>17s}")
    means = {n: sum(r["auroc"][n] for r in results) / len(results) for n in names}
    print(f"{'mean':>20s} " + " ".join(f"{means[n]:12.3f}" for n in names))
    ruled = [r for r in results if "threshold_rules" in r]
    if ruled:
        rules = list(ruled[0]["threshold_rules"])
        print("\nshare marked unknown, in / ood, by the rule that picks the threshold")
        print(f"{'trained on':>10s} {'shown':>9s} " + " ".join(f"{n:>24s}" for n in rules))
        for r in ruled:
            cells = [f"{v['in']:.2f} / {v['ood']:.2f}" for v in r["threshold_rules"].values()]
            print(f"{r['trained_on']:>10s} {r['shown']:>9s} " + " ".join(f"{c:>24s}" for c in cells))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"pairs": results, "mean_auroc": means}, indent=1))


if __name__ == "__main__":
    main()
