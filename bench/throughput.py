"""Training images/s, side by side: the textbook PyTorch loop, this project's train.py, and pure compute.

    cd /work/main && .venv/bin/python -m bench.throughput --images 64 --epochs 2 [--out bench/out/throughput.json]

Writes a 2-class ImageFolder of photo-sized JPEGs (about 500x375, jittered crops of scikit-image
photos), trains resnet18 from scratch on it both ways, and reports the last epoch's images/s
(so worker start-up and first-step warm-up are left out) next to a compute-only ceiling.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import datasets, models, transforms

from bench.common import peak_rss_mib, quietly, write_json
from bench.datasets import PHOTO_CLASSES as CLASSES
from bench.datasets import photo_folder as write_dataset
from finetune.commands import train
from finetune.utils.runtime import num_workers, resolve_precision

BATCH = 32  # the CPU figure; the GPU check also runs the chapter's 128
# The GPU when there is one (train.py picks it by itself), else the CPU.
DEVICE = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else torch.device("cpu")
# The loader workers train.py picks on this machine (2 on the 2-core CPU box, 15 on a 16-core GPU host).
WORKERS = num_workers(-1, on_gpu=DEVICE.type == "cuda")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def classic(data: Path, epochs: int, batch: int, lr: float = 5e-4) -> tuple[list[float], float]:
    """(a) The d2l.ai fine-tuning chapter's loop, as a plain user writes it: fp32, default memory
    format and thread settings, non-persistent workers, loss.item() every step. Images/s per epoch.
    It gets as many loader workers as the project would (``runtime.num_workers``), so that the
    ratio compares pipelines, not worker counts."""
    augs = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    train_ds = datasets.ImageFolder(str(data / "train"), transform=augs)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=batch, shuffle=True, num_workers=WORKERS)
    net = models.resnet18(weights=None)  # d2l loads ImageNet weights; no downloads here
    net.fc = nn.Linear(512, len(train_ds.classes))
    net = net.to(DEVICE)  # the chapter trains on its GPUs when there are any
    params_1x = [p for name, p in net.named_parameters() if name not in ("fc.weight", "fc.bias")]
    optimizer = torch.optim.SGD([{"params": params_1x}, {"params": net.fc.parameters(), "lr": lr * 10}],
                                lr=lr, weight_decay=0.001)
    loss_fn = nn.CrossEntropyLoss()
    rates = []
    for _ in range(epochs):
        net.train()
        seen, start = 0, time.perf_counter()
        for images, targets in loader:
            images, targets = images.to(DEVICE), targets.to(DEVICE)
            optimizer.zero_grad()
            loss = loss_fn(net(images), targets)
            loss.backward()
            optimizer.step()
            loss.item()  # the classic loop reads the loss back every step
            seen += targets.shape[0]
        rates.append(seen / (time.perf_counter() - start))
    return rates, test_accuracy(net, data / "test", batch)


def test_accuracy(net: nn.Module, folder: Path, batch: int) -> float:
    """The classic chapter's evaluation: Resize(256) + CenterCrop(224), fp32."""
    augs = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(folder), transform=augs), batch_size=batch,
                                         num_workers=WORKERS)
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for images, targets in loader:
            correct += (net(images.to(DEVICE)).argmax(dim=1).cpu() == targets).sum().item()
            total += targets.shape[0]
    return correct / total


def finetune(data: Path, epochs: int, batch: int, out_dir: Path) -> list[dict[str, Any]]:
    """(b) This project's train.py with its defaults (bf16 + channels_last where the CPU runs bf16 fast,
    persistent seeded workers, SGD + warmup/cosine), in-process. Its per-epoch history."""
    argv = ["--data", str(data), "--model", "resnet18", "--weights", "none", "--batch-size", str(batch),
            "--epochs", str(epochs), "--output-dir", str(out_dir)]
    return quietly(train.main, argv).history


def compute_only(steps: int, precision: str, batch: int, warmup: int = 2) -> float:
    """(c) The ceiling: resnet18 training steps on a batch already in memory, in the project's precision
    and memory format (no decoding, augmentation or loader). Images/s."""
    net = models.resnet18(weights=None, num_classes=len(CLASSES)).to(DEVICE, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(batch, 3, 224, 224, device=DEVICE).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, len(CLASSES), (batch,), device=DEVICE)
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()  # let the warm-up steps finish on the device before the clock starts
            start = time.perf_counter()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(net(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loss.item()  # wait for the device to finish before reading the clock
    return steps * batch / (time.perf_counter() - start)


def settings(precision: str, batch: int) -> dict[str, Any]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "cores": len(os.sched_getaffinity(0)),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "project_precision": precision,
            "batch": batch, "device": str(DEVICE), "loader_workers": WORKERS}


def print_table(res: dict[str, Any]) -> None:
    ips = res["img_per_s"]
    print(f"\n{'side':14s} {'img/s':>8s}")
    for side in ("classic", "finetune", "compute_only"):
        print(f"{side:14s} {ips[side]:8.2f}")
    if "finetune_3000x2000" in ips:
        print(f"{'finetune 3000x2000':14s} {ips['finetune_3000x2000']:8.2f}")
    print(f"finetune/classic      {res['finetune_over_classic']:.2f}x")
    print(f"finetune/compute-only {res['finetune_over_compute']:.2f}")
    if res["large_over_photo"] is not None:
        print(f"3000x2000 / 500x375   {res['large_over_photo']:.2f}")
    acc = res["test_accuracy"]
    print(f"test accuracy after {res['epochs']} epochs: classic {acc['classic']:.3f}, finetune {acc['finetune']:.3f}")
    print("finetune RSS MiB per epoch: " + ", ".join(f"{r:.0f}" for r in res["rss_mib_per_epoch"] if r))
    print(f"peak RSS MiB: main {res['peak_rss_mib']['main']:.0f}, "
          f"largest child {res['peak_rss_mib']['largest_child']:.0f}")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in res["settings"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="training images (test: a quarter, at least 32)")
    parser.add_argument("--epochs", type=int, default=2, help="the last epoch's images/s is reported")
    parser.add_argument("--out", default="bench/out/throughput.json")
    parser.add_argument("--large", action="store_true", help="also train on 3000x2000 photos")
    parser.add_argument("--batch", type=int, default=BATCH, help="images per step, both sides")
    args = parser.parse_args()
    precision = resolve_precision("auto", on_cpu=DEVICE.type == "cpu")
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        data = write_dataset(Path(tmp) / "data", args.images, max(args.batch, args.images // 4))
        thread_settings = settings(precision, args.batch)  # as a plain user gets them, before any side runs
        classic_rates, classic_acc = classic(data, args.epochs, args.batch)
        history = finetune(data, args.epochs, args.batch, Path(tmp) / "run")
        compute = compute_only(max(3, args.images // args.batch), precision, args.batch)
        large = None
        if args.large:  # the same run on 3000x2000 photos: reduced-scale JPEG decoding should hide the size
            big = write_dataset(Path(tmp) / "big", args.images, max(args.batch, args.images // 4), size=(3000, 2000))
            large = finetune(big, args.epochs, args.batch, Path(tmp) / "run-big")
    ips = {"classic": classic_rates[-1], "finetune": history[-1]["images_per_s"], "compute_only": compute}
    if large:
        ips["finetune_3000x2000"] = large[-1]["images_per_s"]
    res = {"images": args.images, "epochs": args.epochs, "img_per_s": ips,
           "finetune_over_classic": ips["finetune"] / ips["classic"],
           "finetune_over_compute": ips["finetune"] / ips["compute_only"],
           "large_over_photo": ips["finetune_3000x2000"] / ips["finetune"] if large else None,
           "test_accuracy": {"classic": classic_acc, "finetune": history[-1]["test_acc"]},
           "rss_mib_per_epoch": [row.get("rss_mib") for row in history],
           "classic_per_epoch": classic_rates, "finetune_history": history,
           "peak_rss_mib": peak_rss_mib(), "settings": thread_settings}
    print_table(res)
    write_json(args.out, res)


if __name__ == "__main__":
    main()
