"""Decoding any image file to 8-bit RGB: every mode, EXIF orientation, reduced-scale JPEG decoding."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from finetune.errors import UserError


class BadImageError(UserError):
    """An image that cannot be decoded, named by path."""


def load_rgb(path: str, reduce_to: tuple[int, int] | None = None) -> Image.Image:
    """Open any image as 8-bit RGB, whatever its mode (L, LA, P, RGBA, CMYK, 16-bit, float).

    EXIF orientation is applied; transparency is composited on white rather than dropped,
    which would expose whatever colour hides under transparent pixels.

    Args:
        path: the image file.
        reduce_to: (width, height), in the oriented image's pixels, that the caller needs at
            least: a JPEG is then decoded at 1/2, 1/4 or 1/8 scale where that still covers it
            (Pillow's draft mode), which makes large photos several times cheaper to decode.
    """
    try:
        with Image.open(path) as img:
            if reduce_to is not None and img.format == "JPEG":
                width, height = reduce_to
                if _orientation(img) in (5, 6, 7, 8):  # stored rotated by 90 degrees
                    width, height = height, width
                img.draft(img.mode, (max(1, width), max(1, height)))
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImageError(f"cannot decode image {path}: {err}") from None


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except (ValueError, TypeError, SyntaxError):
        return 1


def oriented_size(path: str) -> tuple[int, int]:
    """(width, height) of an image as shown (EXIF rotation applied), from its header only."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            return (height, width) if _orientation(img) in (5, 6, 7, 8) else (width, height)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImageError(f"cannot decode image {path}: {err}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to 8-bit RGB."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")
