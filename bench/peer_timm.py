"""The project's train.py against timm's own train.py, side by side on one short run.

    .venv/bin/python -m bench.peer_timm --timm-train PATH/pytorch-image-models/train.py [--rounds 2]

Both train resnet18 from random weights on the same JPEG photos (192 train, 64 test, 500x375,
written once under ``--work``), batch 32, 224 px, 3 epochs with a test pass after each: timm with
bf16 autocast, channels-last, 2 loader workers and its cosine schedule; the project with its
defaults (which choose bf16 and channels-last on a CPU that runs bf16 fast). Rounds alternate which
tool goes first. Whole-process wall times are measured here; the project's phases come from the
run's own ``timings.json`` (``finetune.utils.phases``): start-up until the training loop begins, the
training passes (the wait for each epoch's first batch, and BatchNorm statistics, included: they
are gathered by them), the test passes,
saving, logging and pictures (what held the training thread), and the post-training calibration.
The ratio printed is timm's time over the project's: 1.0 or more means the project is at least
as fast.

timm's ``train.py`` lives in timm's repository (github.com/huggingface/pytorch-image-models), not
in the pip package; its version must match the installed timm closely enough to import.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import write_json
from bench.datasets import photo_folder

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("start-up", "train", "test", "saving", "logging", "calibration", "other")


def timm_command(script: Path, data: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, str(script), "--data-dir", str(data), "--train-split", "train", "--val-split", "test",
            "--model", args.model, "--num-classes", "2", "-b", str(args.batch_size), "--img-size", str(args.image_size),
            "--epochs", str(args.epochs), "--device", args.device, "--amp", "--amp-dtype", "bfloat16",
            "--channels-last", "--workers", "2", "--sched", "cosine", "--output", str(out)]


def project_command(data: Path, out: Path, args: argparse.Namespace, extra: list[str]) -> list[str]:
    return [sys.executable, str(args.project / "train.py"), "--data", str(data), "--model", args.model, "--weights", "none",
            "--batch-size", str(args.batch_size), "--image-size", str(args.image_size), "--epochs", str(args.epochs),
            "--output-dir", str(out), *extra]


def timed(command: list[str], log: Path, cwd: Path) -> float:
    """Wall seconds of ``command`` as a fresh process in ``cwd``; its output goes to ``log``."""
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                              env={**os.environ, "PYTHONPATH": str(cwd)})
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"error: {command[1]} exited {done.returncode}; its output is in {log}")
    return seconds


def phases(run_dir: Path, wall: float) -> dict[str, float]:
    """The project's run by phase (``timings.json``), "other" being the rest of the process's wall time."""
    if not (run_dir / "timings.json").is_file():  # a version of the project from before it kept one
        return {"other": wall}
    record = json.loads((run_dir / "timings.json").read_text())
    marks = record["since_process_start"]
    # Until the loop begins: from there the training phase's clock runs, first batch included.
    spent = {"start-up": marks.get("fit_start", marks["first_step"]), **record["seconds"]}
    spent["other"] = wall - sum(spent.values())
    # Inside the start-up: the imports and command line, then setting up until the loop begins.
    return {**spent, "marks": {k: marks[k] for k in ("run_start", "fit_start", "first_step") if k in marks}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm-train", type=Path, required=True, help="timm's train.py (from its repository)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the two")
    parser.add_argument("--work", type=Path, default=Path("/tmp/finetune-peer-timm"))
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cpu", help="timm's --device (the project picks its own)")
    parser.add_argument("--project", type=Path, default=ROOT, help="the checkout whose train.py runs (another "
                        "version's, to compare before and after)")
    parser.add_argument("--project-flags", default="", help="extra train.py flags, e.g. '--no-plots --log-with none'")
    parser.add_argument("--out", type=Path, default=Path("bench/out/peer_timm.json"))
    args = parser.parse_args(argv)
    if not args.timm_train.is_file():
        sys.exit(f"error: --timm-train {args.timm_train} is not a file (timm's train.py, from its repository)")
    data = args.work / "photos"
    if not (data / "test").is_dir():
        shutil.rmtree(data, ignore_errors=True)
        photo_folder(data, 192, 64)
    rows = []
    for round_ in range(args.rounds):
        times = {}
        for tool in ("timm", "project") if round_ % 2 == 0 else ("project", "timm"):
            out = args.work / f"{tool}-{round_}"
            shutil.rmtree(out, ignore_errors=True)
            command = timm_command(args.timm_train, data, out, args) if tool == "timm" else \
                project_command(data, out, args, args.project_flags.split())
            times[tool] = timed(command, args.work / f"{tool}-{round_}.log", args.project.resolve())
            if tool == "project":
                times["phases"] = phases(out, times[tool])
        rows.append(times)
        print(f"round {round_ + 1}: timm {times['timm']:.1f} s, project {times['project']:.1f} s, "
              f"ratio {times['timm'] / times['project']:.3f}", flush=True)
    print(f"\nthe project's run by phase, seconds (mean of {args.rounds} rounds):")
    for name in PHASES:
        print(f"  {name:12s} {statistics.mean(r['phases'].get(name, 0.0) for r in rows):6.2f}")
    marks = [r["phases"].get("marks", {}) for r in rows]
    if all(marks):
        print("  start-up: the run began (imports, command line) at {:.2f} s, its loop at {:.2f} s, its first step "
              "at {:.2f} s after the process started".format(
                  *(statistics.mean(m[k] for m in marks) for k in ("run_start", "fit_start", "first_step"))))
    ratios = [r["timm"] / r["project"] for r in rows]
    # The calibration (the temperature and the out-of-distribution score) is work timm's script does
    # not do: the ratio without it says how the rest of the run compares.
    uncalibrated = [r["timm"] / (r["project"] - r["phases"].get("calibration", 0.0)) for r in rows]
    summary = {"timm_s": [round(r["timm"], 2) for r in rows], "project_s": [round(r["project"], 2) for r in rows],
               "ratios": [round(x, 3) for x in ratios], "min_ratio": round(min(ratios), 3),
               "ratios_without_calibration": [round(x, 3) for x in uncalibrated]}
    print(f"\nwithout the project's calibration phase (work timm does not do): "
          f"{', '.join(f'{x:.3f}' for x in uncalibrated)}")
    print(f"\nwhole process, timm's time over the project's: {', '.join(f'{x:.3f}' for x in ratios)} "
          f"(target >= 1.0 every round: {'met' if min(ratios) >= 1.0 else 'NOT met'})")
    result = {"rows": rows, "summary": summary, "settings": {k: str(v) for k, v in vars(args).items()}}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
