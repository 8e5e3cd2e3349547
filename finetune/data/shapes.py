"""A synthetic multi-label dataset: images of 1 to 3 coloured shapes, labelled by a CSV file.

    python -c "from pathlib import Path; from finetune.data.shapes import shapes; print(shapes(Path('shapes')))"
    python train.py --data shapes/labels.csv          # multi-label: several labels in a row

For trying multi-label classification without data of one's own; the tests and benchmarks use it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPE_KINDS = ("circle", "square", "triangle", "cross", "bar")  # each drawn in its own colour


def _draw_shape(draw, kind: str, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    elif kind == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)
    elif kind == "cross":
        w = max(1, (x1 - x0) // 4)
        draw.rectangle(((x0 + x1) // 2 - w, y0, (x0 + x1) // 2 + w, y1), fill=colour)
        draw.rectangle((x0, (y0 + y1) // 2 - w, x1, (y0 + y1) // 2 + w), fill=colour)
    else:  # a horizontal bar
        draw.rectangle((x0, (y0 + y1) // 2 - (y1 - y0) // 6, x1, (y0 + y1) // 2 + (y1 - y0) // 6), fill=colour)


def shapes(root: Path, n: int = 200, size: int = 48, seed: int = 0, kinds: tuple[str, ...] = SHAPE_KINDS,
           onehot: bool = False, split: bool = False) -> Path:
    """A multi-label set: ``n`` images of 1 to 3 shapes of different kinds, each kind its own colour,
    in three of the four quadrants (the quadrant chosen at random) on a noisy grey ground, labelled
    by ``root/labels.csv``: ``image,labels`` with the kinds joined by ``;`` or, ``onehot``, one 0/1
    column per kind; ``split``: a split column (train 60%, val 20%, test 20%).

    Returns:
        The label file.
    """
    rng = np.random.default_rng(seed)
    colours = [tuple(int(v) for v in (np.array([(i * 97) % 256, (i * 181 + 60) % 256, (i * 53 + 120) % 256])))
               for i in range(len(kinds))]
    (root / "images").mkdir(parents=True, exist_ok=True)
    half = size // 2
    lines = ["image," + (",".join(kinds) if onehot else "labels") + (",split" if split else "")]
    for i in range(n):
        present = sorted(rng.choice(len(kinds), size=int(rng.integers(1, 4)), replace=False).tolist())
        ground = np.clip(rng.normal(128, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(ground)
        draw = ImageDraw.Draw(img)
        for kind, quadrant in zip(present, rng.permutation(4)):
            left, top = (quadrant % 2) * half, (quadrant // 2) * half
            margin = int(rng.integers(1, max(2, half // 6)))
            _draw_shape(draw, kinds[kind], (left + margin, top + margin, left + half - margin, top + half - margin),
                        colours[kind])
        name = f"images/{i:04d}.png"
        img.save(root / name)
        labels = ",".join(str(int(k in present)) for k in range(len(kinds))) if onehot else \
            ";".join(kinds[k] for k in present)
        part = ("," + ("test" if i % 5 == 4 else "val" if i % 5 == 3 else "train")) if split else ""
        lines.append(f"{name},{labels}{part}")
    file = root / "labels.csv"
    file.write_text("\n".join(lines) + "\n")
    return file
