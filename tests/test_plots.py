"""The pictures: they decode with Pillow at the sizes drawn, class names of any script render,
and the confusion matrix stays readable up to 100 classes."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.errors import UserError
from finetune.report import plots

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


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures the pictures were drawn from, laid out as in their PNG."""
    drawn = []
    encode = plots._png

    def keep(fig):
        drawn.append(fig)
        return encode(fig)
    monkeypatch.setattr(plots, "_png", keep)
    return drawn


def confusion_matrix(n: int) -> list[list[int]]:
    rng = np.random.default_rng(n)
    return (rng.integers(0, 3, (n, n)) + np.diag(rng.integers(5, 20, n))).tolist()


@pytest.mark.parametrize("n", [2, 5, 30, 100])
def test_confusion_matrix_renders_from_2_to_100_classes(n: int):
    classes = [f"{NAMES[i % len(NAMES)]} {i}" for i in range(n)]
    img = decoded(plots.confusion_png(classes, confusion_matrix(n)))
    shown = min(n, plots.MAX_CONFUSION_CLASSES)
    assert 0.32 * shown * 100 < img.size[1] < 0.32 * shown * 100 + 400  # the matrix, with room for the names


def overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


TOMATO = ["Tomato___Septoria_leaf_spot", "Tomato___Tomato_Yellow_Leaf_Curl_Virus", "Tomato___healthy"]
LAYOUTS = {
    "2 long": ["Pepper,_bell___Bacterial_spot", "Pepper,_bell___healthy"],
    "3 long": TOMATO,
    "4 long": ["Apple___Cedar_apple_rust", "Apple___Black_rot", "Corn_(maize)___Northern_Leaf_Blight",
               "Grape___Esca_(Black_Measles)"],
    "one of 41 characters": ["Tomato___Spider_mites Two-spotted_spider_mite"[:41], "ok", "fine"],
    "longer than the limit": ["x" * 30 + "_the_middle_goes_" + "y" * 20, "Tomato___Tomato_mosaic_virus"],
    "CJK": ["猫", "狗狗", "鳥類の写真", "café"],  # Chinese and Japanese: Korean needs a larger font package
    "40 classes": [f"Species_{i:02d}_{'long_name_' * (i % 3)}" for i in range(40)],
    "2 short": ["cat", "dog"],
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_confusion_matrix_keeps_names_whole_and_the_matrix_large(case: str, figures: list):
    """Long names, few or many classes, CJK: the layout engine fits everything without a warning,
    the matrix keeps a fair part of the picture, and every name shows as it is, nowhere overlapping."""
    classes = LAYOUTS[case]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        png = plots.confusion_png(classes, confusion_matrix(len(classes)))
    messages = [str(w.message) for w in caught]
    if not plots.has_cjk_font():  # boxes for CJK glyphs then, with a warning; nothing else
        messages = [m for m in messages if not ("Glyph" in m and "missing" in m)]
    assert messages == []
    fig = figures[-1]
    assert np.abs(np.subtract(decoded(png).size, fig.get_size_inches() * fig.dpi)).max() <= 1  # the figure drawn
    renderer = fig.canvas.get_renderer()
    ax, colorbar = fig.axes
    matrix = ax.get_window_extent(renderer)
    figure_box = fig.bbox
    assert min(matrix.width, matrix.height) >= 2.3 * fig.dpi  # inches a side
    assert matrix.width * matrix.height >= 0.12 * figure_box.width * figure_box.height
    shown = classes if len(classes) <= plots.MAX_CONFUSION_CLASSES else [
        classes[i] for i in plots.most_confused(np.asarray(confusion_matrix(len(classes))), 30)]
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        assert [t.get_text() for t in labels] == [plots.short_name(c) for c in shown]
        angle = labels[0].get_rotation()
        if angle == 0:
            boxes = [t.get_window_extent(renderer) for t in labels]
            assert not any(overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
        else:  # parallel lines of text, a column apart: apart by at least a line's height
            line = 1.2 * labels[0].get_fontsize() / 72 * fig.dpi
            assert angle in (45, 90) and matrix.width / len(shown) * np.sin(np.radians(angle)) >= line
    texts = [*ax.get_xticklabels(), *ax.get_yticklabels(), ax.title, ax.xaxis.label, ax.yaxis.label,
             *colorbar.get_yticklabels()]
    for text in texts:
        box = text.get_window_extent(renderer)
        assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= figure_box.x1 + 1 and box.y1 <= figure_box.y1 + 1, text
    title = ax.title.get_window_extent(renderer)
    assert title.y0 >= matrix.y1 and not overlap(title, colorbar.get_tightbbox(renderer))


def test_long_names_are_shortened_with_an_ellipsis_never_a_space():
    assert plots.short_name(TOMATO[1]) == TOMATO[1]  # 38 characters: whole
    name = "a" * 30 + "_middle_" + "z" * 20
    short = plots.short_name(name)
    assert len(short) == plots.MAX_LABEL and " " not in short
    assert short.startswith("a" * 26) and short.endswith("z" * 13) and "\u2026" in short
    # The captions of samples.png and mistakes.png: three lines at most, and an ellipsis where cut.
    assert plots._label(TOMATO[1], 22) == "Tomato___Tomato_Yellow\n_Leaf_Curl_Virus"
    assert plots._label("a" * 100, 22).split("\n") == ["a" * 22, "a" * 22, "a" * 21 + "\u2026"]


def test_one_epoch_of_curves_has_the_integer_tick_1(figures: list):
    plots.Curves().png([{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "test_acc": 0.6, "test_loss": 0.9}])
    plots.study_curves_png({"finetune": [{"epoch": 1, "train_loss": 1.0, "test_acc": 0.6}]})
    for fig in figures:
        for ax in fig.axes:
            lo, hi = ax.get_xlim()
            assert [t for t in ax.get_xticks() if lo <= t <= hi] == [1.0]


def pixels_of(png: bytes, fig, ax, colour: str) -> int:
    """How many pixels inside ``ax`` are near ``colour``."""
    from matplotlib.colors import to_rgb

    box = ax.get_window_extent(fig.canvas.get_renderer())
    image = np.asarray(decoded(png).convert("RGB")).astype(int)
    height = image.shape[0]
    inside = image[round(height - box.y1):round(height - box.y0), round(box.x0):round(box.x1)]
    target = np.array(to_rgb(colour)) * 255
    return int((np.abs(inside - target).max(axis=-1) < 30).sum())


def test_study_curves_show_every_strategy_where_their_points_are_equal(figures: list):
    strategies = ["finetune", "scratch", "linear-probe", "lp-ft", "freeze-half", "classic"]
    same = [{"epoch": e, "train_loss": 1 / e, "test_acc": 1.0} for e in (1, 2, 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        png = plots.study_curves_png({name: same for name in strategies})
    fig = figures[-1]
    for ax in fig.axes:
        lines = ax.get_lines()
        assert len({(line.get_marker(), line.get_linestyle(), tuple(line.get_xdata())) for line in lines}) == 6
        for i in range(len(strategies)):  # each strategy's colour shows in the panel itself, not only its legend
            assert pixels_of(png, fig, ax, f"C{i}") > 20, (ax.get_title(), strategies[i])


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
    assert img.size == (round(2.1 * 4 * 100), round((2.45 * 2 + 0.4) * 100))
    assert decoded(plots.mistakes_png([], [], [], [], total_images=60)).size == (400, 120)


def test_the_mistakes_title_stands_clear_of_the_captions(figures: list):
    images = [rgb(64, 64, i) for i in range(6)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.mistakes_png(images, TOMATO * 2, ["cat"] * 6, [0.9] * 6, total_images=60)
    fig = figures[-1]
    renderer = fig.canvas.get_renderer()
    captions = max(ax.title.get_window_extent(renderer).y1 for ax in fig.axes if ax.get_title())
    assert fig.get_suptitle() and fig._suptitle.get_window_extent(renderer).y0 - captions >= 10  # pixels


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


def test_pictures_are_drawn_and_written_in_the_painter_process(tmp_path: Path):
    import os

    from finetune.report import painter

    assert painter.submit(os.getpid).result() != os.getpid()
    rows = [{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "test_acc": 0.6, "test_loss": 0.9}]
    png = painter.submit(painter.draw_curves, "test-run", tmp_path / "curves.png", rows).result()
    assert (tmp_path / "curves.png").read_bytes() == png
    assert decoded(png).size == (750, 300)
    painter.submit(painter.forget, "test-run").result()
    # a failure there (here: no such folder) raises where the result is read, with its one-line message
    with pytest.raises(UserError, match="cannot save"):
        painter.submit(painter.draw_curves, "test-run", tmp_path / "missing" / "curves.png", rows).result()


def test_processes_after_the_first_of_a_launch_draw_in_their_own(monkeypatch):
    import os

    from finetune.report import painter

    monkeypatch.setattr(painter, "_POOL", None)
    monkeypatch.setenv("RANK", "1")
    assert painter.submit(os.getpid).result() == os.getpid()


def test_the_painter_ends_when_its_parent_is_killed(tmp_path: Path):
    """A training process killed outright cannot end its painter: the painter sees its parent gone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = ("import os, sys, time\nfrom finetune.report import painter\n"
              "print(painter.submit(os.getpid).result(), flush=True)\ntime.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        child = int(parent.stdout.readline())
        assert child != parent.pid
        os.kill(child, 0)  # it is alive
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        try:  # reaped by init; a zombie of ours would still answer
            if open(f"/proc/{child}/stat").read().split()[2] == "Z":
                return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    raise AssertionError(f"the painter {child} outlived its killed parent by a minute")


def test_a_killed_painter_is_replaced_by_the_next_picture(monkeypatch):
    """Pictures are not worth a run: a painter ended from outside (the OOM killer) fails the picture
    it was drawing, and the next one starts a new painter."""
    import concurrent.futures
    import os
    import signal

    from finetune.report import painter

    monkeypatch.setattr(painter, "_POOL", None)  # a painter of this test's own
    first = painter.submit(os.getpid).result()
    doomed = painter.submit(__import__("time").sleep, 30)
    os.kill(first, signal.SIGKILL)
    with pytest.raises(concurrent.futures.process.BrokenProcessPool):
        doomed.result(timeout=60)
    try:
        second = painter.submit(os.getpid).result(timeout=60)
        assert second not in (first, os.getpid())
    finally:
        painter._POOL.shutdown()


def test_the_painter_starts_and_its_pictures_import_without_torch():
    """train.py starts the painter before torch loads, so that matplotlib loads beside torch's import."""
    import subprocess
    import sys

    probe = ("import os, sys\nfrom finetune.report import painter\n"
             "assert painter.submit(os.getpid).result() != os.getpid()\n"
             "print('torch imported:', 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert "torch imported: False" in proc.stdout, proc.stdout + proc.stderr
