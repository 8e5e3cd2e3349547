"""What the run logs and pictures cost: the demo trained with them (the defaults: TensorBoard under
RUN/logs, samples.png and curves.png) and without (--log-with none --no-plots), interleaved.

    .venv/bin/python -m bench.tracking_overhead [--pairs 3] [--epochs 5]

Each run is a fresh process (so importing matplotlib and TensorBoard is counted) timing
``train.main`` from its call to its return, after importing it. The runs alternate
with/without, then without/with, so a change in the machine's load hits both sides alike.
Prints the mean seconds of each side and their ratio; the target is at most 1.03.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from finetune.demo import demo_dataset

ROOT = Path(__file__).resolve().parents[1]

TIMED = ("import sys, time, contextlib, io\nfrom finetune.commands import train\n"
         "t = time.perf_counter()\n"
         "with contextlib.redirect_stdout(io.StringIO()):\n"
         "    train.main(sys.argv[1:])\n"
         "print(time.perf_counter() - t)\n")
OFF = ["--log-with", "none", "--no-plots"]


def timed_run(argv: list[str]) -> float:
    """Seconds ``train.main(argv)`` took in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", TIMED, *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed: {proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="runs of each side")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", default="bench/out/tracking_overhead.json")
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {"with": [], "without": []}
    with tempfile.TemporaryDirectory(prefix="tracking-") as tmp:
        base = ["--data", str(demo_dataset()), "--epochs", str(args.epochs)]
        for i in range(args.pairs):
            for side in (("with", "without") if i % 2 == 0 else ("without", "with")):
                run_dir = Path(tmp) / f"{side}-{i}"
                seconds[side].append(timed_run([*base, "--output-dir", str(run_dir), *(OFF if side == "without" else [])]))
                print(f"pair {i + 1} {side:8s} {seconds[side][-1]:7.2f} s", flush=True)
        logged = Path(tmp) / "with-0"
        assert (logged / "curves.png").is_file() and (logged / "logs").is_dir(), "the logged run wrote no logs"
    res = {"epochs": args.epochs, "seconds": seconds,
           "mean_with": statistics.mean(seconds["with"]), "mean_without": statistics.mean(seconds["without"])}
    res["with_over_without"] = res["mean_with"] / res["mean_without"]
    print(f"with logs and pictures {res['mean_with']:.2f} s, without {res['mean_without']:.2f} s "
          f"(means of {args.pairs}): ratio {res['with_over_without']:.4f} (target <= 1.03)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
