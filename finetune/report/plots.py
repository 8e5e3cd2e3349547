"""The pictures of a run, as PNG bytes: sample images, curves, a confusion matrix, the worst mistakes.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global figure
state), so they render on a headless cluster node. Every function returns PNG bytes; writing
them is ``save_png`` (atomic, like every file of a run).
"""

from __future__ import annotations

import contextlib
import functools
import io
import textwrap
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from finetune.utils.files import atomic_write_bytes

MAX_CONFUSION_CLASSES = 30  # beyond this, the matrix shows the most-confused classes only
# DejaVu ships with matplotlib and covers Latin, Greek, Cyrillic, Armenian, Georgian, Hebrew,
# Arabic and more; the others are used, glyph by glyph, where installed, for CJK scripts: Noto CJK
# and WenQuanYi have Hangul too; Debian's fonts-droid-fallback (7 MB, which scripts/test.sh
# installs) has Chinese and Japanese, and NanumGothic (fonts-nanum) Korean.
CJK_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "WenQuanYi Zen Hei", "Droid Sans Fallback", "NanumGothic")
FONTS = ("DejaVu Sans", *CJK_FONTS, "Noto Sans")


@functools.cache
def font_family() -> tuple[str, ...]:
    """The installed fonts of ``FONTS``, in order: matplotlib draws each glyph with the first that has it.

    matplotlib lists the system's fonts once, in a cache kept across processes; a CJK font
    installed after that (``apt-get install fonts-droid-fallback``) is added here, once a process.
    """
    from matplotlib import font_manager  # matplotlib loads only where a picture is drawn

    manager = font_manager.fontManager
    if not {f.name for f in manager.ttflist} & set(CJK_FONTS):
        known = {f.fname for f in manager.ttflist}
        for path in font_manager.findSystemFonts():
            if path not in known:
                with contextlib.suppress(OSError, RuntimeError, ValueError):  # a broken font file: skip it
                    manager.addfont(path)
    installed = {f.name for f in manager.ttflist}
    return tuple(f for f in FONTS if f in installed) or ("DejaVu Sans",)


def has_cjk_font() -> bool:
    """Whether a font with CJK glyphs is installed (without one they show as boxes)."""
    return bool(set(font_family()) & set(CJK_FONTS))


def _style() -> dict[str, Any]:
    return {"font.family": list(font_family()),
            "text.parse_math": False,  # class names are literal: "$5 bill" is not TeX
            "font.size": 9, "axes.titlesize": 9}


def _figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # only where a picture is drawn
    from matplotlib.figure import Figure

    # Pictures drawn during training get fixed margins: the constrained layout doubles their cost.
    fig = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(fig)  # a canvas that can measure text, and draw
    return fig


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _render(draw: Any, *args: Any) -> bytes:
    import matplotlib  # loads only where a picture is drawn (a run with --no-plots never pays for it)

    with matplotlib.rc_context(_style()), warnings.catch_warnings():
        # A font of the fallback list that lacks a glyph is not news; a glyph no font has shows as a box.
        warnings.filterwarnings("ignore", message="findfont")
        return _png(draw(*args))


def _label(name: str, width: int = 18) -> str:
    """``name`` on up to three lines of ``width`` characters, broken at spaces, hyphens or anywhere;
    what does not fit ends in an ellipsis."""
    lines = textwrap.wrap(name, width, break_long_words=True)
    if len(lines) > 3:
        lines = [*lines[:2], lines[2][:width - 1] + "\u2026"]
    return "\n".join(lines) or " "


def thumbnail(image: np.ndarray, max_side: int = 160) -> np.ndarray:
    """``image`` shrunk to at most ``max_side`` pixels a side: a cell of a picture is about 110
    pixels wide, and large photos would make drawing slow."""
    if max(image.shape[:2]) <= max_side:
        return image
    img = Image.fromarray(image)
    img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(img)


def pick_samples(targets: Sequence[int], num_classes: int, per_class: int = 6, max_classes: int = 8,
                 seed: int = 0) -> list[tuple[int, list[int]]]:
    """Which images ``samples_png`` shows: up to ``max_classes`` classes spread over the class list,
    ``per_class`` images of each, drawn with ``seed``.

    Args:
        targets: the class index of every image of the dataset (or the tuple of its class indices, for
            multi-label data: the image may show under each).
        num_classes: how many classes there are.
        per_class, max_classes: how many to show.
        seed: the draw's seed.

    Returns:
        ``(class index, dataset indices)`` per class shown (classes without images left out).
    """
    members: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        for c in (t if isinstance(t, tuple) else (t,)):
            members.setdefault(int(c), []).append(i)
    present = [c for c in range(num_classes) if c in members]
    if len(present) > max_classes:
        present = [present[round(i * (len(present) - 1) / max(1, max_classes - 1))] for i in range(max_classes)]
    rng = np.random.default_rng(seed)
    return [(c, sorted(rng.choice(members[c], size=min(per_class, len(members[c])), replace=False).tolist()))
            for c in present]


def _show(ax: Any, image: np.ndarray) -> None:
    image = thumbnail(image)
    ax.imshow(image, interpolation="bilinear" if max(image.shape[:2]) > 64 else "nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


SAMPLE_CELL = (115, 110)  # (height, width) in pixels of one image's cell in samples.png, gap included
SAMPLE_GAP = 6


def _fit(image: np.ndarray, box: tuple[int, int]) -> np.ndarray:
    """``image`` scaled to fit ``box`` (height, width), its aspect kept: small images with sharp
    pixels (nearest), larger ones smoothly."""
    h, w = image.shape[:2]
    scale = min(box[0] / h, box[1] / w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.Resampling.NEAREST if max(h, w) <= 64 else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(np.ascontiguousarray(image[..., :3])).resize(size, resample))


def samples_png(names: Sequence[str], loaded: Sequence[Sequence[np.ndarray]],
                augmented: Sequence[Sequence[np.ndarray]]) -> bytes:
    """The classic chapter's ``show_images``: training images of each class as loaded, and the same
    images as the model sees them after augmentation.

    The images are laid out in one array shown by one Axes: a grid of Axes, one an image, cost
    a run 0.26 s to draw, most of it in their unused tick machinery.

    Args:
        names: the classes shown, one per row pair.
        loaded: for each class, RGB uint8 arrays (H, W, 3) as decoded from disk.
        augmented: for each class, the same images after the training transform.
    """
    (cell_h, cell_w), gap = SAMPLE_CELL, SAMPLE_GAP
    columns, rows = max(len(row) for row in loaded), 2 * len(names)
    grid = np.full((rows * cell_h, columns * cell_w, 3), 255, dtype=np.uint8)
    for r, images in enumerate(row for pair in zip(loaded, augmented) for row in pair):
        for c, image in enumerate(images):
            fitted = _fit(image, (cell_h - gap, cell_w - gap))
            top = r * cell_h + (cell_h - fitted.shape[0]) // 2
            left = c * cell_w + (cell_w - fitted.shape[1]) // 2
            grid[top:top + fitted.shape[0], left:left + fitted.shape[1]] = fitted

    def draw():
        left, top, bottom = 160, 40, 10  # pixels around the grid: labels, title
        width, height = left + grid.shape[1], top + grid.shape[0] + bottom
        fig = _figure(width / 100, height / 100, layout=None)
        ax = fig.add_axes((left / width, bottom / height, grid.shape[1] / width, grid.shape[0] / height))
        ax.imshow(grid, interpolation="nearest", aspect="auto")
        ax.set_axis_off()
        for i, name in enumerate(names):
            for kind in (0, 1):
                y = 1 - ((2 * i + kind) * cell_h + cell_h / 2 + top) / height
                fig.text((left - 8) / width, y, f"{_label(name)}\n{'augmented' if kind else 'as loaded'}",
                         ha="right", va="center")
        fig.suptitle("training images: as loaded, and as the model sees them", y=1 - 12 / height, va="top")
        return fig
    return _render(draw)


def training_samples(samples: Sequence[tuple[str, int]], classes: Sequence[str], model_view: Callable[[int], Any],
                     seed: int = 0) -> tuple[list[str], list[list[np.ndarray]], list[list[np.ndarray]]]:
    """What ``samples_png`` shows of a training set: the classes drawn, a few of their images from
    disk, and the same images as the model sees them.

    Args:
        samples: the dataset's ``(path, class index)`` pairs (an ImageFolder's ``samples``).
        classes: class names.
        model_view: dataset index -> the image the model trains on (a uint8 tensor, C x H x W).
        seed: which images are drawn.
    """
    from finetune.data.images import load_rgb  # torch: not where only pictures are drawn (``painter``)

    picks = pick_samples([t for _, t in samples], len(classes), seed=seed)
    loaded = [[np.asarray(load_rgb(samples[i][0], reduce_to=(160, 160))) for i in idx] for _, idx in picks]
    seen = [[np.asarray(model_view(i).permute(1, 2, 0)) for i in idx] for _, idx in picks]
    return [classes[c] for c, _ in picks], loaded, seen


class Curves:
    """``curves.png`` of a training run, redrawn after each epoch: loss and accuracy per epoch from
    the run's history rows (``epoch``, ``train_loss``, ``train_acc``, ``test_acc``, and
    ``test_loss`` and a multi-label run's ``test_map`` where present).

    The figure is built once and its lines updated: a fresh figure each epoch cost twice the time
    (its axes, ticks and legend made again), most of the pictures' share of an epoch.
    """

    KEYS = (("loss", "train_loss", "train loss"), ("loss", "test_loss", "test loss"),
            ("accuracy", "train_acc", "train accuracy"), ("accuracy", "test_acc", "test accuracy"),
            ("accuracy", "test_map", "test mAP"))

    def __init__(self) -> None:
        self._fig: Any = None
        self._axes: dict[str, Any] = {}
        self._lines: dict[str, Any] = {}

    def png(self, history: Sequence[dict[str, Any]]) -> bytes:
        """The picture of ``history`` (all epochs so far), as PNG bytes."""
        return _render(self._update, history)

    def _update(self, history: Sequence[dict[str, Any]]) -> Any:
        if self._fig is None:
            self._build({key for _, key, _ in self.KEYS if all(key in row for row in history)})
        epochs = [row["epoch"] for row in history]
        for key, line in self._lines.items():
            line.set_data(epochs, [row[key] for row in history])
            line.set_marker("o" if len(epochs) < 30 else "None")
        for ax in self._axes.values():
            ax.relim()
            ax.autoscale_view()
        self._axes["accuracy"].set_ylim(-0.02, 1.02)
        return self._fig

    def _build(self, keys: set[str]) -> None:
        fig = _figure(7.5, 3.0, layout=None)
        fig.subplots_adjust(left=0.07, right=0.98, bottom=0.15, top=0.91, wspace=0.2)
        loss_ax, acc_ax = fig.subplots(1, 2)
        self._axes = {"loss": loss_ax, "accuracy": acc_ax}
        for panel, key, label in self.KEYS:
            if key in keys:
                self._lines[key] = self._axes[panel].plot([], [], label=label)[0]
        for title, ax in self._axes.items():
            ax.set_xlabel("epoch")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend()
            ax.xaxis.get_major_locator().set_params(integer=True, min_n_ticks=1)  # 1 epoch: tick 1, not 0.96
        self._fig = fig


STUDY_STYLES = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--"), ("X", "-."), ("*", ":")]


def study_curves_png(histories: dict[str, Sequence[dict[str, Any]]]) -> bytes:
    """Test accuracy and train loss per epoch, one line per strategy of a study (``study.py``).

    Strategies often reach the same points (accuracy 1.0 from the second epoch on): each has its
    own marker and line style, and its points are shifted a little sideways, so that none hides another.
    """
    spread = 0.25  # of an epoch, over all the strategies

    def draw():
        fig = _figure(8.0, 3.2, layout=None)
        fig.subplots_adjust(left=0.07, right=0.78, bottom=0.15, top=0.91, wspace=0.25)
        acc_ax, loss_ax = fig.subplots(1, 2)
        for i, (name, history) in enumerate(histories.items()):
            shift = spread * (i / max(1, len(histories) - 1) - 0.5) if len(histories) > 1 else 0.0
            epochs = [row["epoch"] + shift for row in history]
            marker, line = STUDY_STYLES[i % len(STUDY_STYLES)]
            style = {"marker": marker if len(epochs) < 30 else None, "linestyle": line, "label": name,
                     "markersize": 5, "color": f"C{i % 10}"}
            acc_ax.plot(epochs, [row["test_acc"] for row in history], **style)
            loss_ax.plot(epochs, [row["train_loss"] for row in history], **style)
        acc_ax.set_ylim(-0.03, 1.05)  # markers at 1.0 whole, below the frame
        for ax, title in ((acc_ax, "test accuracy"), (loss_ax, "train loss")):
            ax.set_xlabel("epoch")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True, min_n_ticks=1)  # 1 epoch: tick 1, not 0.96
        loss_ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
        return fig
    return _render(draw)


def most_confused(matrix: np.ndarray, keep: int) -> list[int]:
    """Indices of the ``keep`` classes with the largest share of errors, as true or as predicted
    class, in their original order.

    Args:
        matrix: counts, rows true classes, columns predicted.
        keep: how many classes to keep.
    """
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    off = rates - np.diag(np.diag(rates))
    score = off.sum(axis=1) + off.sum(axis=0)
    return sorted(np.argsort(-score, kind="stable")[:keep].tolist())


MAX_LABEL = 40  # characters of a class name on the matrix's axes


def short_name(name: str, limit: int = MAX_LABEL) -> str:
    """``name`` whole up to ``limit`` characters; a longer one keeps its start and end around an
    ellipsis (class names often differ at their end: ``Tomato___Tomato_mosaic_virus``)."""
    if len(name) <= limit:
        return name
    tail = (limit - 1) // 3
    return name[:limit - 1 - tail] + "\u2026" + name[-tail:]


def _widest(fig: Any, texts: Sequence[Any]) -> float:
    """The width in inches of the widest of ``texts`` (matplotlib Text objects), as drawn."""
    renderer = fig.canvas.get_renderer()
    return max((t.get_window_extent(renderer).width for t in texts), default=0.0) / fig.dpi


def confusion_png(classes: Sequence[str], matrix: Sequence[Sequence[int]],
                  max_classes: int = MAX_CONFUSION_CLASSES) -> bytes:
    """A row-normalised confusion matrix (rows: true class, columns: predicted), class names on
    both axes; beyond ``max_classes`` classes, the rows and columns of the most-confused ones.

    The figure is sized from the names as drawn: the matrix keeps its size, the names get the
    room they need, and the column names turn where they are wider than a column.

    Args:
        classes: class names, in the matrix's order.
        matrix: counts, rows true classes, columns predicted.
        max_classes: how many classes fit.
    """
    counts = np.asarray(matrix, dtype=np.float64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    shown = list(range(len(classes))) if len(classes) <= max_classes else most_confused(counts, max_classes)
    sub = rates[np.ix_(shown, shown)]
    names = [short_name(classes[i]) for i in shown]
    k = len(shown)

    def draw():
        side = float(np.clip(0.32 * k, 2.4, 10.0))  # the matrix, inches
        fig = _figure(side + 2.0, side + 2.0)
        ax = fig.subplots()
        im = ax.imshow(sub, cmap="Blues", vmin=0, vmax=1)
        font = 9 if k <= 12 else 8
        ax.set_xticks(range(k), names, fontsize=font)
        ax.set_yticks(range(k), names, fontsize=font)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if k <= 15:  # numbers in the cells while they still fit
            for i in range(k):
                for j in range(k):
                    if sub[i, j] >= 0.005:
                        ax.text(j, i, f"{sub[i, j]:.2f}", ha="center", va="center", fontsize=font,
                                color="white" if sub[i, j] > 0.5 else "black")
        title = "confusion matrix, rows sum to 1"
        if k < len(classes):
            title += f": the {k} most-confused of {len(classes)} classes"
        ax.set_title(title)
        fig.colorbar(im, ax=ax, shrink=0.8)
        # Room for the names as drawn: their width beside the rows; below the columns, one line
        # if each fits its column, else turned (45 degrees for a few columns, upright for many).
        widest = _widest(fig, ax.get_yticklabels())
        below = 2 * font / 72
        if widest > 0.9 * side / k:
            angle = 45 if k <= 12 else 90
            ax.tick_params(axis="x", labelrotation=angle)
            if angle == 45:
                for label in ax.get_xticklabels():
                    label.set(ha="right", rotation_mode="anchor")
            below = widest * (0.72 if angle == 45 else 1.0) + font / 72
        title_width = _widest(fig, [ax.title])
        fig.set_size_inches(max(widest + side, title_width) + 1.9, side + below + 1.1)
        return fig
    return _render(draw)


def mistakes_png(images: Sequence[np.ndarray], true: Sequence[str], predicted: Sequence[str],
                 probability: Sequence[float], total_images: int, total_mistakes: int | None = None) -> bytes:
    """The most confidently wrong images, each titled with its true class, the predicted one and
    the predicted class's probability.

    Args:
        images: RGB uint8 arrays (H, W, 3), most confident mistake first.
        true, predicted: class names per image.
        probability: softmax probability of the predicted class per image.
        total_images: how many images were evaluated (for the title).
        total_mistakes: how many of them were wrong (default: as many as shown).
    """
    def draw():
        if not images:
            fig = _figure(4.0, 1.2)
            fig.text(0.5, 0.5, f"no mistakes among {total_images} images", ha="center", va="center")
            return fig
        columns = min(4, len(images))
        rows = -(-len(images) // columns)
        fig = _figure(2.1 * columns, 2.45 * rows + 0.4)
        fig.get_layout_engine().set(h_pad=6 / 72)  # 6 points between the title and the captions, and the rows
        axes = fig.subplots(rows, columns, squeeze=False).ravel()
        for ax, image, t, p, prob in zip(axes, images, true, predicted, probability):
            _show(ax, image)
            ax.set_title(f"true: {_label(t, 22)}\npredicted: {_label(p, 22)}\nprobability {prob:.2f}", fontsize=8)
        for ax in axes[len(images):]:
            ax.set_axis_off()
        wrong = len(images) if total_mistakes is None else total_mistakes
        fig.suptitle(f"the most confident mistakes: {len(images)} shown of {wrong} wrong among {total_images} images")
        return fig
    return _render(draw)


def suspects_png(images: Sequence[np.ndarray], given: Sequence[str], suggested: Sequence[str],
                 score: Sequence[float], total: int, images_audited: int) -> bytes:
    """The most likely mislabeled images (audit.py), each titled with its given label, the
    suggested one and its suspicion score.

    Args:
        images: RGB uint8 arrays (H, W, 3), most suspicious first.
        given, suggested: class names per image.
        score: per image, 1 - the probability of its given label over that label's threshold
            (``audit.findings``: the ranking's key; negative for an image surer than its class's average).
        total: how many images were flagged; images_audited: how many were audited (for the title).
    """
    def draw():
        if not images:
            fig = _figure(4.0, 1.2)
            fig.text(0.5, 0.5, f"no likely mislabeled images among {images_audited}", ha="center", va="center")
            return fig
        columns = min(4, len(images))
        rows = -(-len(images) // columns)
        fig = _figure(2.1 * columns, 2.45 * rows + 0.4)
        fig.get_layout_engine().set(h_pad=6 / 72)
        axes = fig.subplots(rows, columns, squeeze=False).ravel()
        for ax, image, g, s, p in zip(axes, images, given, suggested, score):
            _show(ax, image)
            ax.set_title(f"given: {_label(g, 22)}\nsuggested: {_label(s, 22)}\nscore {p:.2f}", fontsize=8)
        for ax in axes[len(images):]:
            ax.set_axis_off()
        fig.suptitle(f"likely mislabeled: {len(images)} shown of {total} among {images_audited} images")
        return fig
    return _render(draw)


def duplicates_png(pairs: Sequence[tuple[np.ndarray, np.ndarray]], captions: Sequence[tuple[str, str]],
                   similarity: Sequence[float | None], total: int) -> bytes:
    """Duplicate pairs side by side (audit.py), one pair a row, each image captioned (its split and
    label) and the pair titled with its similarity, or as an exact copy (similarity None)."""
    def draw():
        if not pairs:
            fig = _figure(4.0, 1.2)
            fig.text(0.5, 0.5, "no duplicates found", ha="center", va="center")
            return fig
        fig = _figure(4.4, 2.3 * len(pairs) + 0.4)
        fig.get_layout_engine().set(h_pad=6 / 72)
        axes = fig.subplots(len(pairs), 2, squeeze=False)
        for (left, right), (first, second), (a, b), sim in zip(axes, pairs, captions, similarity):
            kind = "exact copy" if sim is None else f"similarity {sim:.3f}"
            _show(left, first)
            _show(right, second)
            left.set_title(f"{_label(a, 26)}\n{kind}", fontsize=8)
            right.set_title(f"{_label(b, 26)}\n{kind}", fontsize=8)
        fig.suptitle(f"duplicates: {len(pairs)} shown of {total} pairs")
        return fig
    return _render(draw)


RELIABILITY_SIZE = (5.0, 4.4)  # inches at 100 dpi: 500 x 440 pixels


def reliability_png(curves: dict[str, dict[str, Sequence[float]]], title: str) -> bytes:
    """A reliability diagram: per confidence bin, the accuracy against the mean confidence, for
    each curve (e.g. ``before`` and ``after`` calibration); a perfectly calibrated model lies on
    the diagonal. Empty bins are left out; a point's size follows its bin's image count.

    Args:
        curves: name (with its ECE, say) -> ``{"confidence": [...], "accuracy": [...], "count": [...]}``
            per bin (``models.calibration.reliability``).
        title: the figure's title.
    """
    def draw():
        fig = _figure(*RELIABILITY_SIZE)
        ax = fig.subplots()
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfectly calibrated")
        total = max(1.0, max((sum(c["count"]) for c in curves.values()), default=1.0))
        for name, c in curves.items():
            kept = [(x, y, n) for x, y, n in zip(c["confidence"], c["accuracy"], c["count"]) if n > 0]
            if not kept:
                continue
            xs, ys, ns = zip(*kept)
            line, = ax.plot(xs, ys, marker=None, linewidth=1.5, label=name)
            ax.scatter(xs, ys, s=[12 + 200 * n / total for n in ns], color=line.get_color(), zorder=3)
        ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="confidence (top-class probability)",
               ylabel="accuracy", title=title)
        ax.legend(loc="upper left", fontsize=8)
        return fig
    return _render(draw)


def save_png(path: str | Path, png: bytes) -> None:
    """Write PNG bytes to ``path`` atomically."""
    atomic_write_bytes(path, png)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) of PNG bytes, from their header."""
    if png[:8] != PNG_SIGNATURE or png[12:16] != b"IHDR":
        raise ValueError("not PNG bytes")
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def png_channels(png: bytes) -> int:
    """The channels PNG bytes decode to: 1 grey, 2 grey and alpha, 3 RGB, 4 RGBA (a palette with a
    transparency chunk counts as RGBA), as TensorBoard's image colorspace numbers them."""
    png_size(png)  # checks the header
    colour_type = png[25]
    if colour_type == 3:
        return 4 if b"tRNS" in png[:png.find(b"IDAT")] else 3
    return {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]


def average_precision_png(classes: Sequence[str], aps: Sequence[float | None], map_value: float) -> bytes:
    """A multi-label evaluation's per-class average precision, one bar a class (best at the top);
    a class without a positive image has none and is marked so.

    Args:
        classes: class names.
        aps: each class's AP (None: undefined, no positive image).
        map_value: their mean over the defined ones (the title's mAP).
    """
    order = sorted(range(len(classes)), key=lambda i: (aps[i] is not None, aps[i] or 0.0))

    def draw():
        fig = _figure(6.0, 0.8 + 0.28 * len(classes))
        ax = fig.add_subplot()
        y = np.arange(len(order))
        values = [aps[i] if aps[i] is not None else 0.0 for i in order]
        ax.barh(y, values, color="tab:blue")
        ax.set_yticks(y, [_label(classes[i], 30).replace("\n", " ") for i in order])
        for row, i in zip(y, order):
            text = f"{aps[i]:.3f}" if aps[i] is not None else "no positive image"
            ax.text(min(values[row], 0.98) + 0.01, row, text, va="center", fontsize=7)
        ax.set_xlim(0, 1.15)
        ax.set_xlabel("average precision")
        ax.set_title(f"average precision per class (mAP {map_value:.3f})")
        ax.grid(axis="x", alpha=0.3)
        return fig
    return _render(draw)


def false_decisions_png(images: Sequence[np.ndarray], true: Sequence[str], label: Sequence[str],
                        probability: Sequence[float], kind: str, total: int, total_images: int) -> bytes:
    """A multi-label evaluation's most confident false positives (a label given that the image lacks:
    the highest probabilities) or false negatives (a label missed: the lowest), each titled with the
    image's labels, the label in question and its probability.

    Args:
        images: RGB uint8 arrays (H, W, 3), most confident first.
        true: each image's labels, joined.
        label: the label falsely given (or missed).
        probability: its probability.
        kind: ``false positives`` or ``false negatives``.
        total: how many there are in all.
        total_images: how many images were evaluated.
    """
    verb = "given" if kind == "false positives" else "missed"

    def draw():
        if not images:
            fig = _figure(4.0, 1.2)
            fig.text(0.5, 0.5, f"no {kind} among {total_images} images", ha="center", va="center")
            return fig
        columns = min(4, len(images))
        rows = -(-len(images) // columns)
        fig = _figure(2.1 * columns, 2.45 * rows + 0.4)
        axes = fig.subplots(rows, columns, squeeze=False).ravel()
        for ax, image, t, name, prob in zip(axes, images, true, label, probability):
            _show(ax, image)
            ax.set_title(f"labels: {_label(t or 'none', 22)}\n{verb}: {_label(name, 22)}\nprobability {prob:.2f}",
                         fontsize=8)
        for ax in axes[len(images):]:
            ax.set_axis_off()
        fig.suptitle(f"the most confident {kind}: {len(images)} shown of {total} among {total_images} images")
        return fig
    return _render(draw)
