"""The pictures: they decode with Pillow at the sizes drawn, class names of any script render,
and the confusion matrix stays readable up to 100 classes."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.report import plots
from finetune.errors import UserError

# Latin with accents, Cyrillic, Greek, a TeX-looking dollar sign and rich-looking brackets.
NAMES = ["café crème", "собака", "Ζώο", "$5 bill", "hot dog [x]"]


def decoded(png: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(png))
    img.load()
    return img


def rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(autouse=True)
def no_missing_glyphs():
    """A glyph missing from every font is drawn as a box, with a warning: make it fail the test."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*[Gg]lyph.*missing")
        yield


def test_samples_grid_shows_each_class_as_loaded_and_augmented():
    loaded = [[rgb(25 + i, 40, i) for i in range(4)] for _ in NAMES]
    augmented = [[np.full((224, 224, 3), 20 + 40 * i, np.uint8) for i in range(3)] for _ in NAMES]  # a row may be shorter
    img = decoded(plots.samples_png(NAMES, loaded, augmented))
    assert img.format == "PNG"
    assert img.size == (160 + 4 * 110, 40 + 2 * len(NAMES) * 115 + 10)
    pixels = np.asarray(img.convert("RGB"))
    cell = pixels[40 + 115 + 8:40 + 2 * 115 - 8, 160 + 8:160 + 110 - 8]  # the first class, augmented, first image
    assert (cell == 20).all()  # the image fills its cell, its colour as drawn
    assert (pixels[40 + 115 + 5:40 + 2 * 115 - 5, 160 + 3 * 110 + 5:160 + 4 * 110 - 5] == 255).all()  # no 4th image


def test_curves_redrawn_each_epoch_are_the_picture_drawn_afresh():
    history = [{"epoch": e, "train_loss": 3 / e, "train_acc": 0.2 + e / 20, "test_acc": 0.1 + e / 20,
                "test_loss": 2.5 / e} for e in range(1, 6)]
    curves = plots.Curves()
    for n in range(1, 6):  # the run's own figure, updated epoch by epoch, against a fresh one
        redrawn = np.asarray(decoded(curves.png(history[:n])).convert("RGB")).astype(int)
        fresh = np.asarray(decoded(plots.Curves().png(history[:n])).convert("RGB")).astype(int)
        assert (np.abs(redrawn - fresh).max(axis=-1) > 8).mean() < 0.002, n  # the same axes, ticks and lines


def test_curves_have_one_point_per_epoch_and_a_fixed_size():
    history = [{"epoch": e, "train_loss": 1 / e, "train_acc": 0.5 + e / 20, "test_acc": 0.4 + e / 20,
                "test_loss": 1.2 / e} for e in range(1, 4)]
    for rows in (history[:1], history):  # one epoch too: a single point must draw
        assert decoded(plots.Curves().png(rows)).size == (750, 300)


@pytest.mark.parametrize("n", [2, 5, 30, 100])
def test_confusion_matrix_renders_from_2_to_100_classes(n: int):
    rng = np.random.default_rng(n)
    matrix = rng.integers(0, 3, (n, n)) + np.diag(rng.integers(5, 20, n))
    classes = [f"{NAMES[i % len(NAMES)]} {i}" for i in range(n)]
    img = decoded(plots.confusion_png(classes, matrix.tolist()))
    shown = min(n, plots.MAX_CONFUSION_CLASSES)
    side = min(14.0, max(3.5, 0.32 * shown + 2.2))
    assert img.size == (round((side + 1) * 100), round(side * 100))


def test_beyond_30_classes_the_most_confused_are_shown():
    n = 100
    matrix = np.diag(np.full(n, 10))
    matrix[17, 17], matrix[17, 63] = 2, 8  # class 17 is mostly predicted as 63
    matrix[88, 88], matrix[88, 5] = 5, 5
    picked = plots.most_confused(matrix, 30)
    assert len(picked) == 30 and picked == sorted(picked)
    assert {17, 63, 88, 5} <= set(picked)


def test_mistakes_grid_and_the_no_mistakes_picture():
    images = [rgb(64, 64, i) for i in range(6)]
    img = decoded(plots.mistakes_png(images, NAMES[:3] * 2, NAMES[2:] + NAMES[:1], [0.99, 0.9, 0.8, 0.7, 0.6, 0.55],
                                     total_images=60))
    assert img.size == (round(2.1 * 4 * 100), round((2.45 * 2 + 0.3) * 100))
    assert decoded(plots.mistakes_png([], [], [], [], total_images=60)).size == (400, 120)


def test_pick_samples_spreads_over_classes_and_is_seeded():
    targets = [i % 20 for i in range(200)]
    picked = plots.pick_samples(targets, 20, per_class=3, max_classes=5, seed=1)
    assert [c for c, _ in picked] == [0, 5, 10, 14, 19]
    assert all(len(idx) == 3 and all(targets[i] == c for i in idx) for c, idx in picked)
    assert picked == plots.pick_samples(targets, 20, per_class=3, max_classes=5, seed=1)
    assert plots.pick_samples([0, 0, 2], 3, per_class=5) == [(0, [0, 1]), (2, [2])]  # class 1 has no image


def test_large_photos_are_shrunk_before_drawing():
    assert plots.thumbnail(rgb(2000, 3000)).shape == (107, 160, 3)
    small = rgb(25, 25)
    assert plots.thumbnail(small) is small


def test_save_png_is_atomic_and_reports_an_unwritable_folder(tmp_path: Path):
    target = tmp_path / "curves.png"
    png = plots.Curves().png([{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "test_acc": 0.5}])
    plots.save_png(target, png)
    assert target.read_bytes() == png and [p.name for p in tmp_path.iterdir()] == ["curves.png"]
    with pytest.raises(UserError, match="cannot save"):
        plots.save_png(tmp_path / "missing" / "curves.png", png)
    with Image.open(io.BytesIO(png)) as img:
        assert img.size == plots.png_size(png) == (750, 300)


@pytest.mark.parametrize("mode, transparency, channels", [("L", None, 1), ("LA", None, 2), ("RGB", None, 3),
                                                          ("RGBA", None, 4), ("P", None, 3), ("P", 0, 4)])
def test_png_channels_are_read_from_the_header(mode: str, transparency, channels: int):
    buffer = io.BytesIO()
    extra = {} if transparency is None else {"transparency": transparency}
    Image.new(mode, (5, 3)).save(buffer, format="PNG", **extra)
    png = buffer.getvalue()
    assert plots.png_size(png) == (5, 3) and plots.png_channels(png) == channels
    with pytest.raises(ValueError, match="not PNG"):
        plots.png_size(b"GIF89a" + png[6:])
