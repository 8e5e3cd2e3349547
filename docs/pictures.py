"""Draw the README's pictures: the offline demo trained and evaluated as the README says, its PNGs
copied into docs/ with a 128-colour palette so that they stay small.

    .venv/bin/python -m docs.pictures
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from PIL import Image

from bench.common import quietly
from finetune.commands import eval as eval_cmd
from finetune.commands import train
from finetune.data.demo import demo_dataset

DOCS = Path(__file__).resolve().parent


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="pictures-") as tmp:
        run = Path(tmp) / "run"
        quietly(train.main, ["--output-dir", str(run), "--log-with", "none"])
        quietly(eval_cmd.main, ["--ckpt", str(run / "model.safetensors"), "--data", str(demo_dataset()),
                                "--log-with", "none"])
        for source in (run / "samples.png", run / "curves.png", run / "eval" / "confusion.png",
                       run / "eval" / "mistakes.png"):
            with Image.open(source) as img:
                small = img.convert("RGB").quantize(colors=128)
                small.save(DOCS / source.name, optimize=True)
            print(f"docs/{source.name}: {(DOCS / source.name).stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
