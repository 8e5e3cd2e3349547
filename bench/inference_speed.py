"""Inference speed, side by side in one run: predict.py against eval.py on the same images, and
ONNX Runtime against PyTorch eager on the CPU at batch 1 and 32.

    .venv/bin/python -m bench.inference_speed [--images 256] [--repeats 3] [--out bench/out/inference_speed.json]

Writes a folder of photo-sized JPEGs (about 500x375, crops of scikit-image photos) and a resnet18
checkpoint at 224 px (random weights: speed does not depend on them). Then:

- predict.py and eval.py run in-process on the same folder with the same batch size, workers and
  precision, alternating A/B/B/A over ``--repeats`` rounds so that the machine's load hits both
  alike; each side's best round counts (target: predict >= 0.9x eval's images/s).
- The checkpoint is exported to ONNX; one ``InferenceSession`` and the eager fp32 model (the file's
  reference) then take turns on the same batches, ``--iters`` timed runs each per round after a
  warm-up; medians in ms per batch, ratio eager / ONNX Runtime (above 1: ONNX Runtime is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench.common import quietly, write_json
from bench.datasets import photo_folder
from finetune.commands import eval as eval_cmd
from finetune.commands import predict as predict_cmd
from finetune.config import TrainConfig
from finetune.models.build import build_classifier, describe_checkpoint
from finetune.models.checkpoint import save_checkpoint
from finetune.models.export import export
from finetune.models.inference import load_classifier
from finetune.utils.runtime import resolve_precision

MODEL, SIZE = "resnet18", 224


def write_checkpoint(path: Path, classes: list[str]) -> Path:
    torch.manual_seed(0)
    clf = build_classifier(MODEL, "none", classes, image_size=SIZE)
    config = TrainConfig(model=MODEL, weights="none", image_size=SIZE)
    save_checkpoint(path, clf.net.state_dict(), describe_checkpoint(config, clf, classes, {}))
    return path


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def commands(ckpt: Path, folder: Path, out: Path, n_images: int, repeats: int, precision: str) -> dict[str, Any]:
    """predict.py vs eval.py images/s: A/B then B/A each round, the best round of each side."""
    shared = ["--ckpt", str(ckpt), "--batch-size", "64", "--mixed-precision", precision]
    sides = {
        "eval": lambda: quietly(eval_cmd.main, [*shared, "--data", str(folder), "--output-dir", str(out / "eval"),
                                                "--no-plots", "--log-with", "none"]),
        "predict": lambda: quietly(predict_cmd.main, [*shared, str(folder), "--output", str(out / "preds.csv")]),
    }
    seconds: dict[str, list[float]] = {"eval": [], "predict": []}
    for round_ in range(repeats):
        for side in (("eval", "predict") if round_ % 2 == 0 else ("predict", "eval")):
            seconds[side].append(timed(sides[side]))
    ips = {side: n_images / min(times) for side, times in seconds.items()}
    return {"seconds": seconds, "img_per_s": ips, "predict_over_eval": ips["predict"] / ips["eval"]}


def runtimes(ckpt: Path, onnx_path: Path, repeats: int, iters: int) -> dict[str, Any]:
    """ONNX Runtime vs eager PyTorch (fp32, CPU) latency per batch, at batch 1 and 32."""
    import onnxruntime

    clf = load_classifier(ckpt)
    export(clf, "onnx", onnx_path)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same cores for both sides
    session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    model = clf.model.eval()
    result: dict[str, Any] = {}
    for batch in (1, 32):
        x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        feed = {"images": x.numpy()}

        def eager() -> None:
            with torch.inference_mode():
                model(x)

        def ort() -> None:
            session.run(["logits"], feed)

        for fn in (eager, ort):  # warm-up: first calls allocate and pick kernels
            fn(), fn()
        ms: dict[str, list[float]] = {"eager": [], "onnxruntime": []}
        for round_ in range(repeats):
            for side, fn in ((("eager", eager), ("onnxruntime", ort)) if round_ % 2 == 0
                             else (("onnxruntime", ort), ("eager", eager))):
                ms[side] += [timed(fn) * 1000 for _ in range(iters)]
        median = {side: statistics.median(values) for side, values in ms.items()}
        result[f"batch{batch}"] = {"ms_per_batch": median, "eager_over_onnxruntime": median["eager"] / median["onnxruntime"]}
    return result


def run(n_images: int, repeats: int, iters: int) -> dict[str, Any]:
    precision = resolve_precision("auto", on_cpu=not torch.accelerator.is_available())
    with tempfile.TemporaryDirectory() as tmp:
        root = photo_folder(Path(tmp) / "data", 8, n_images)
        folder = root / "test"
        classes = sorted(p.name for p in (root / "train").iterdir())
        ckpt = write_checkpoint(Path(tmp) / "model.safetensors", classes)
        side_by_side = commands(ckpt, folder, Path(tmp), n_images, repeats, precision)
        onnx = runtimes(ckpt, Path(tmp) / "model.onnx", repeats, iters)
    return {"images": n_images, "model": MODEL, "image_size": SIZE, "precision": precision, **side_by_side,
            "runtimes": onnx, "eager_over_onnx_b1": onnx["batch1"]["eager_over_onnxruntime"],
            "eager_over_onnx_b32": onnx["batch32"]["eager_over_onnxruntime"], "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cores": len(os.sched_getaffinity(0))}


def print_table(res: dict[str, Any]) -> None:
    ips = res["img_per_s"]
    print(f"\n{res['images']} images, {res['model']} at {res['image_size']} px, precision {res['precision']}")
    print(f"eval.py     {ips['eval']:8.2f} img/s")
    print(f"predict.py  {ips['predict']:8.2f} img/s   predict/eval {res['predict_over_eval']:.2f}x (target >= 0.9)")
    for batch in ("batch1", "batch32"):
        r = res["runtimes"][batch]
        print(f"{batch:8s} eager {r['ms_per_batch']['eager']:8.2f} ms   onnxruntime {r['ms_per_batch']['onnxruntime']:8.2f} ms"
              f"   eager/onnxruntime {r['eager_over_onnxruntime']:.2f}x")
    print(f"torch {res['torch']}, {res['threads']} threads, {res['cores']} cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="images predicted and evaluated")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of each comparison")
    parser.add_argument("--iters", type=int, default=10, help="timed runtime calls per side per round")
    parser.add_argument("--out", type=Path, default=Path("bench/out/inference_speed.json"))
    args = parser.parse_args()
    res = run(args.images, args.repeats, args.iters)
    print_table(res)
    write_json(args.out, res)


if __name__ == "__main__":
    main()
