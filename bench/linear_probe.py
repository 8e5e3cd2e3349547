"""Linear probe on cached features versus full fine-tuning and versus the uncached probe.

    .venv/bin/python -m bench.linear_probe [--epochs 5] [--image-size 224]

On the demo data (LFW faces vs not faces, real ImageNet MobileNetV2): seconds per epoch of a full
fine-tuning run, of a linear probe through the frozen backbone (--no-cache-features), and of the
cached probe after its first epoch; test accuracy of the two probes. All in one invocation.
"""

from __future__ import annotations

import argparse
import tempfile

from bench.common import quietly, write_json
from finetune.commands import train
from finetune.data.demo import demo_dataset


def run(argv: list[str]) -> list[dict]:
    return quietly(train.main, argv).history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", default="bench/out/linear_probe.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="probe-") as tmp:
        base = ["--data", str(demo_dataset()), "--image-size", str(args.image_size), "--epochs", str(args.epochs)]
        probe = [*base, "--freeze", "backbone", "--augment", "none"]
        full = run([*base, "--output-dir", f"{tmp}/full"])
        uncached = run([*probe, "--no-cache-features", "--output-dir", f"{tmp}/uncached"])
        cached = run([*probe, "--output-dir", f"{tmp}/cached"])

    def later(history: list[dict]) -> float:  # mean seconds of the epochs after the first
        rows = history[1:] or history
        return sum(r["seconds"] for r in rows) / len(rows)

    res = {"seconds_per_epoch": {"full_finetune": later(full), "probe_uncached": later(uncached),
                                 "probe_cached": later(cached)},
           "test_accuracy": {"full_finetune": full[-1]["test_acc"], "probe_uncached": uncached[-1]["test_acc"],
                             "probe_cached": cached[-1]["test_acc"]}}
    res["full_over_cached"] = res["seconds_per_epoch"]["full_finetune"] / res["seconds_per_epoch"]["probe_cached"]
    print(f"{'run':16s} {'s/epoch':>10s} {'test acc':>9s}")
    for name in ("full_finetune", "probe_uncached", "probe_cached"):
        print(f"{name:16s} {res['seconds_per_epoch'][name]:10.4f} {res['test_accuracy'][name]:9.4f}")
    print(f"a cached probe epoch is {res['full_over_cached']:.0f}x faster than a full fine-tuning epoch")
    write_json(args.out, res)


if __name__ == "__main__":
    main()
