"""Draw the README's pictures: the offline demo trained and evaluated as the README says, its PNGs
copied into docs/ with a 128-colour palette so that they stay small.

    .venv/bin/python docs/pictures.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from PIL import Image

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))

import eval as eval_cmd  # noqa: E402
import train  # noqa: E402
from bench.common import quietly  # noqa: E402
from finetune.demo import demo_dataset  # noqa: E402


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
