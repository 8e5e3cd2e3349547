"""Evaluation images/s, side by side: the plain fp32 PyTorch eval loop and this project's eval.py.

    cd /work/main && .venv/bin/python -m bench.eval_speed --images 256 [--out bench/out/eval_speed.json]

Writes a 2-class ImageFolder of photo-sized JPEGs (about 500x375, jittered crops of scikit-image
photos), trains resnet18 from scratch for one epoch with train.py so both sides evaluate the same
checkpoint, then times each side twice (the faster run counts) and reports images/s, the ratio
finetune/plain and how often the two predict the same class for the same file.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file
from torchvision import datasets, models, transforms

from bench.common import peak_rss_mib, quietly, write_json
from bench.datasets import photo_folder as write_dataset
from finetune.commands import eval as eval_cmd
from finetune.commands import train
from finetune.models.checkpoint import read_metadata

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make_checkpoint(data: Path, run: Path) -> Path:
    """One quick epoch from scratch: the weights only need to be shared, not good."""
    argv = ["--data", str(data), "--model", "resnet18", "--weights", "none", "--epochs", "1",
            "--batch-size", "32", "--output-dir", str(run)]
    quietly(train.main, argv)
    return run / "model.safetensors"


def plain(ckpt: Path, test_dir: Path) -> dict[str, str]:
    """(a) What a user writes: fp32, default memory format, fresh workers. Path -> predicted class.
    Building the model is inside the timed region, as it is for eval.py."""
    meta = read_metadata(ckpt)
    tf = transforms.Compose([transforms.Resize(meta["resize_size"]), transforms.CenterCrop(meta["image_size"]),
                             transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = datasets.ImageFolder(str(test_dir), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=2)
    net = models.resnet18(num_classes=len(meta["classes"]))
    net.load_state_dict(load_file(str(ckpt)))
    net.eval()
    preds: list[int] = []
    with torch.no_grad():
        for images, _ in loader:
            preds += net(images).argmax(dim=1).tolist()
    # Output index i is the checkpoint's class i (train.py's list), whatever ImageFolder sorted.
    return {os.path.realpath(p): meta["classes"][k] for (p, _), k in zip(ds.samples, preds)}


def finetune(ckpt: Path, test_dir: Path, out: Path) -> dict[str, str]:
    """(b) eval.py in-process with its defaults. Its time includes building the model and the
    Accelerator and writing metrics.json/predictions.csv: the cost a user pays per invocation."""
    quietly(eval_cmd.main, ["--ckpt", str(ckpt), "--data", str(test_dir), "--output-dir", str(out)])
    with open(out / "predictions.csv", newline="") as f:
        return {os.path.realpath(row["path"]): row["predicted"] for row in csv.DictReader(f)}


def best_of_two(fn: Callable[[], dict[str, str]]) -> tuple[float, dict[str, str]]:
    """The faster of a cold and a warm call (first-call costs: imports, page cache, kernel selection)."""
    times, result = [], {}
    for _ in range(2):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def run(n_images: int, n_train: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = write_dataset(Path(tmp) / "data", n_train, n_images)
        ckpt = make_checkpoint(root, Path(tmp) / "run")
        test_dir = root / "test"
        t_plain, p_plain = best_of_two(lambda: plain(ckpt, test_dir))
        t_ft, p_ft = best_of_two(lambda: finetune(ckpt, test_dir, Path(tmp) / "eval"))
    if p_plain.keys() != p_ft.keys():
        raise SystemExit(f"the two sides saw different files: {len(p_plain)} vs {len(p_ft)}")
    ips = {"plain": n_images / t_plain, "finetune": n_images / t_ft}
    return {"images": n_images, "train_images": n_train, "seconds": {"plain": t_plain, "finetune": t_ft},
            "img_per_s": ips, "finetune_over_plain": ips["finetune"] / ips["plain"],
            "agreement": sum(p_plain[k] == p_ft[k] for k in p_plain) / len(p_plain),
            "peak_rss_mib": peak_rss_mib(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cores": len(os.sched_getaffinity(0))}


def print_table(res: dict[str, Any]) -> None:
    print(f"\n{'side':10s} {'seconds':>8s} {'img/s':>8s}")
    for side in ("plain", "finetune"):
        print(f"{side:10s} {res['seconds'][side]:8.2f} {res['img_per_s'][side]:8.2f}")
    print(f"finetune/plain  {res['finetune_over_plain']:.2f}x")
    print(f"agreement       {res['agreement']:.4f} of {res['images']} images")
    rss = res["peak_rss_mib"]
    print(f"peak RSS MiB: main {rss['main']:.0f}, largest child {rss['largest_child']:.0f}")
    print(f"torch {res['torch']}, {res['threads']} threads, {res['cores']} cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="test-set size")
    parser.add_argument("--train-images", type=int, default=64, help="train-set size for the checkpoint")
    parser.add_argument("--out", type=Path, default=Path("bench/out/eval_speed.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    res = run(args.images, args.train_images)
    print_table(res)
    write_json(args.out, res)


if __name__ == "__main__":
    main()
