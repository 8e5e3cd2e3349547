"""What the run logs and pictures cost: the demo trained with them (the defaults: TensorBoard under
RUN/logs, samples.png and curves.png) and without (--log-with none --no-plots), interleaved.

    .venv/bin/python -m bench.tracking_overhead [--pairs 3] [--epochs 5]

Each run is a fresh process (so importing matplotlib and TensorBoard is counted) timing
``train.main`` from its call to its return, after importing it: wall-clock seconds, and the CPU
seconds of the process and its loader workers (on a machine shared with other work, CPU time is
the steadier measure). The runs alternate with/without, then without/with, so a change in the
machine's load hits both sides alike. Prints the mean of each side, their ratio, and the median of
the pairs' ratios; the target is at most 1.03. A shared machine's load makes whole runs differ by several percent, so the runs
with logging also time what they spend inside it (the ``RunLog`` calls, where the tracker and the
pictures are started, written and drawn, imports included) against the run's total.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import write_json
from finetune.data.demo import demo_dataset

ROOT = Path(__file__).resolve().parents[1]

TIMED = """
import contextlib, functools, gc, io, resource, sys, time
from finetune.report import tracking
from finetune.commands import train

def cpu():
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))

inside = [0.0, 0.0, 0.0]  # wall and CPU seconds inside the logging calls; wall seconds of the once-a-run ones
ONCE = ("__init__", "draw_samples", "finish")  # the tracker's start (its imports), samples.png, the wait for pictures at the end

def timed(method, once):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        t, c = time.perf_counter(), time.process_time()
        try:
            return method(*args, **kwargs)
        finally:
            inside[0] += time.perf_counter() - t
            inside[1] += time.process_time() - c
            inside[2] += (time.perf_counter() - t) if once else 0.0
    return wrapper

for cls, names in ((tracking.RunLog, ("__init__", "draw_samples", "end_epoch", "finish")),
                   (tracking.StepLog, ("start_epoch", "end_step", "flush"))):
    for name in names:
        setattr(cls, name, timed(getattr(cls, name), cls is tracking.RunLog and name in ONCE))
t, c = time.perf_counter(), cpu()
with contextlib.redirect_stdout(io.StringIO()):
    train.main(sys.argv[1:])
gc.collect()  # the loader workers end, and are counted
print(time.perf_counter() - t, cpu() - c, *inside)
"""
OFF = ["--log-with", "none", "--no-plots"]


def timed_run(argv: list[str]) -> list[float]:
    """Wall-clock and CPU seconds ``train.main(argv)`` took in a fresh process, those spent inside
    the logging calls, and the wall seconds of the once-a-run calls among them."""
    proc = subprocess.run([sys.executable, "-c", TIMED, *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed: {proc.stderr[-2000:]}")
    return [float(x) for x in proc.stdout.strip().splitlines()[-1].split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="runs of each side")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", default="bench/out/tracking_overhead.json")
    args = parser.parse_args()
    figures: dict[str, dict[str, list[float]]] = {"wall": {"with": [], "without": []},
                                                  "cpu": {"with": [], "without": []}}
    inside: dict[str, list[float]] = {"wall": [], "cpu": [], "recurring wall": []}
    with tempfile.TemporaryDirectory(prefix="tracking-") as tmp:
        base = ["--data", str(demo_dataset()), "--epochs", str(args.epochs)]
        for i in range(args.pairs):
            for side in (("with", "without") if i % 2 == 0 else ("without", "with")):
                run_dir = Path(tmp) / f"{side}-{i}"
                wall, cpu, in_wall, in_cpu, once_wall = timed_run([*base, "--output-dir", str(run_dir),
                                                        *(OFF if side == "without" else [])])
                figures["wall"][side].append(wall)
                figures["cpu"][side].append(cpu)
                note = ""
                if side == "with":
                    inside["wall"].append(in_wall / wall)
                    inside["cpu"].append(in_cpu / cpu)
                    # What every epoch pays (step points, epoch figures, curves.png), against the run's time.
                    inside["recurring wall"].append((in_wall - once_wall) / wall)
                    note = f"  (logging: {in_wall:.2f} s wall, {in_cpu:.2f} s CPU; once a run {once_wall:.2f} s wall)"
                print(f"pair {i + 1} {side:8s} {wall:7.2f} s wall {cpu:7.2f} s CPU{note}", flush=True)
        logged = Path(tmp) / "with-0"
        if not ((logged / "curves.png").is_file() and (logged / "logs").is_dir()):
            raise SystemExit("the logged run wrote no pictures or logs")
    res: dict = {"epochs": args.epochs, "pairs": args.pairs, "seconds": figures,
                 "inside_logging_fraction": inside}
    for name, sides in figures.items():
        with_, without = statistics.mean(sides["with"]), statistics.mean(sides["without"])
        # The median of the pairs' ratios: one pair that met a slow spell of the host (10% here)
        # moves the ratio of means by a third of that, the median not at all.
        paired = statistics.median(w / wo for w, wo in zip(sides["with"], sides["without"]))
        res[f"{name}_with_over_without"] = with_ / without
        res[f"{name}_median_pair_ratio"] = paired
        print(f"{name:4s} with logs and pictures {with_:.2f} s, without {without:.2f} s (means of {args.pairs}): "
              f"ratio {with_ / without:.4f}; median of the pairs' ratios {paired:.4f} (target <= 1.03)")
    for name, fractions in inside.items():
        share = statistics.mean(fractions)
        res[f"{name}_inside_logging"] = share
        print(f"{name} inside the logging calls{' that recur every epoch' if 'recurring' in name else ''}: "
              f"{100 * share:.2f}% of the logged runs' time, an overhead ratio of {1 / (1 - share):.4f}")
    write_json(args.out, res)


if __name__ == "__main__":
    main()
