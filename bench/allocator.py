"""Freed memory kept in the process (``finetune.utils.allocator``) against glibc's own settings, side by side.

    .venv/bin/python -m bench.allocator [--steps 8] [--pairs 2] [--workloads resnet18:224:32,...]

Each measurement is a fresh process (the allocator's settings last a process's life): a training
step of MODEL at SIZE px and batch BATCH (random images, AdamW, the project's CPU precision and
memory format), then an eval forward pass, with ``FINETUNE_MALLOC=system`` (glibc's settings) and
without it (the project's), in ABBA order per pair. Prints the median step and forward times, the
ratio (glibc's time over the project's: above 1 means faster with freed memory kept), the page
faults per step and each process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from bench.common import write_json

WORKLOADS = ("resnet18:224:32", "resnet18:112:64", "resnet18:384:8", "resnet50:160:16", "mobilenet_v2:224:32",
             "efficientnet_b0:224:16", "convnext_tiny:128:16", "vit_b_16:224:8")
MODES = {"system": {"FINETUNE_MALLOC": "system"}, "kept": {}}


def child(workload: str, steps: int) -> dict[str, float]:
    """One process's figures for ``workload`` (``MODEL:SIZE:BATCH``)."""
    import torch
    import torchvision

    from finetune.utils.allocator import keep_freed_memory
    from finetune.utils.runtime import cpu_has_fast_bf16

    kept = keep_freed_memory()
    name, size, batch = workload.split(":")
    torch.manual_seed(0)
    net = torchvision.models.get_model(name, num_classes=10).to(memory_format=torch.channels_last)
    x = torch.randn(int(batch), 3, int(size), int(size)).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (int(batch),))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    precision = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32

    def timed(fn) -> tuple[float, float]:
        times, faults = [], []
        for _ in range(steps):
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        warm = len(times) // 4 + 1  # the first steps build kernels and grow the heap
        return statistics.median(times[warm:]), statistics.median(faults[warm:])

    def train_step() -> None:
        with torch.autocast("cpu", precision, enabled=precision != torch.float32):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def forward() -> None:
        with torch.inference_mode(), torch.autocast("cpu", precision, enabled=precision != torch.float32):
            net(x)

    net.train()
    step_s, step_faults = timed(train_step)
    net.eval()
    forward_s, forward_faults = timed(forward)
    return {"kept": kept, "step_s": step_s, "step_faults": step_faults, "forward_s": forward_s,
            "forward_faults": forward_faults, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(workload: str, mode: str, steps: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "FINETUNE_MALLOC"} | MODES[mode]
    done = subprocess.run([sys.executable, "-m", "bench.allocator", "--child", workload, "--steps", str(steps)],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: {workload} ({mode}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="MODEL:SIZE:BATCH, comma-separated")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=2, help="ABBA pairs of processes per workload")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench/out/allocator.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    results = {}
    print(f"{'workload':24s} {'step s glibc/kept':>18s} {'ratio':>6s} {'forward s glibc/kept':>21s} {'ratio':>6s} "
          f"{'faults/step glibc/kept':>23s} {'peak RSS MiB glibc/kept':>24s}")
    for workload in args.workloads.split(","):
        runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
        for pair in range(args.pairs):
            order = ("system", "kept") if pair % 2 == 0 else ("kept", "system")
            for mode in order + order[::-1]:
                runs[mode].append(measure(workload, mode, args.steps))
        med = {mode: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for mode, rs in runs.items()}
        if not med["kept"]["kept"]:
            sys.exit("error: this system's C library was left alone (not glibc, or the environment chose an "
                     "allocator): nothing to compare")
        g, k = med["system"], med["kept"]
        ratio = {what: g[what] / k[what] for what in ("step_s", "forward_s", "peak_rss_mib")}
        results[workload] = {"glibc": g, "kept": k, "ratio": ratio, "runs": runs}
        print(f"{workload:24s} {g['step_s']:8.3f}/{k['step_s']:<9.3f} {ratio['step_s']:6.2f} "
              f"{g['forward_s']:10.3f}/{k['forward_s']:<10.3f} {ratio['forward_s']:6.2f} "
              f"{g['step_faults']:11.0f}/{k['step_faults']:<11.0f} {g['peak_rss_mib']:11.0f}/{k['peak_rss_mib']:<12.0f}")
    steps = [r["ratio"]["step_s"] for r in results.values()]
    rss = [1 / r["ratio"]["peak_rss_mib"] for r in results.values()]
    print(f"training step, glibc's time over the project's: min {min(steps):.2f}, median {statistics.median(steps):.2f}; "
          f"peak RSS, the project's over glibc's: median {statistics.median(rss):.2f}, max {max(rss):.2f}")
    write_json(args.out, results)


if __name__ == "__main__":
    main()
