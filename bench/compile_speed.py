"""torch.compile on or off: compile time against steady-state speed, side by side.

    .venv/bin/python -m bench.compile_speed [--images 256] [--epochs 3] [--image-size 224]

Trains resnet18 (random init) on photo-sized JPEGs with the project's defaults, once eager and
once with --compile, and reports the first epoch's seconds (compilation included), the last
epoch's images/s, and how many images a run must see before compiling pays for itself.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.common import quietly, write_json
from bench.datasets import photo_folder as write_dataset
from finetune.commands import train


def run(data: Path, out: Path, epochs: int, size: int, *extra: str) -> list[dict]:
    argv = ["--data", str(data), "--model", "resnet18", "--weights", "none", "--image-size", str(size),
            "--epochs", str(epochs), "--output-dir", str(out), *extra]
    return quietly(train.main, argv).history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", default="bench/out/compile_speed.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="compile-") as tmp:
        data = write_dataset(Path(tmp) / "data", args.images, 32)
        eager = run(data, Path(tmp) / "eager", args.epochs, args.image_size)
        compiled = run(data, Path(tmp) / "compiled", args.epochs, args.image_size, "--compile")
    res = {name: {"first_epoch_s": h[0]["seconds"], "last_epoch_img_per_s": h[-1]["images_per_s"]}
           for name, h in (("eager", eager), ("compiled", compiled))}
    extra_s = res["compiled"]["first_epoch_s"] - res["eager"]["first_epoch_s"]
    saved_per_image = 1 / res["eager"]["last_epoch_img_per_s"] - 1 / res["compiled"]["last_epoch_img_per_s"]
    res["compile_overhead_s"] = extra_s
    res["speedup"] = res["compiled"]["last_epoch_img_per_s"] / res["eager"]["last_epoch_img_per_s"]
    res["break_even_images"] = extra_s / saved_per_image if saved_per_image > 0 else None
    for name in ("eager", "compiled"):
        print(f"{name:9s} first epoch {res[name]['first_epoch_s']:7.1f} s   last epoch "
              f"{res[name]['last_epoch_img_per_s']:7.1f} img/s")
    print(f"compiling costs {extra_s:.0f} s and runs {res['speedup']:.2f}x as fast afterwards; "
          + (f"it pays off after {res['break_even_images']:.0f} training images"
             if res["break_even_images"] else "it never pays off"))
    write_json(args.out, res)


if __name__ == "__main__":
    main()
