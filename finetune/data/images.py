"""Decoding any image file to 8-bit RGB: every mode, EXIF orientation, reduced-scale JPEG decoding.

Two ways in: ``load_rgb`` gives a PIL image (ImageFolder's loader, the reference path), and
``read_header`` + ``decode_rgb`` give a numpy array from a file's bytes, read once: ordinary
JPEGs go to libjpeg-turbo through simplejpeg (no copy into Pillow's 4-byte pixels, DCT scaling
for reduced decodes), everything else through Pillow.

An image is named by its path. A dataset whose images are rows rather than files
(``hfdatasets``) names each row by a path of its own, ``PREFIX[ROW]``, and registers a reader for
its prefix (``register_rows``): ``read_image_bytes``, ``load_rgb`` and ``oriented_size`` then read
that row's bytes, so rows go through the very decoding, crops and checks that files do.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import simplejpeg
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from finetune.errors import UserError


class BadImageError(UserError):
    """An image that cannot be decoded, named by path."""


def why_unreadable(err: Exception) -> str:
    """Pillow's reason as a person reads it: its "cannot identify image file <_io.BytesIO object at
    0x...>" names a buffer, not the file."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image (or a format Pillow cannot read)"
    return str(err)


# prefix -> reader of a row's bytes by row number (see the module docstring). Filled in each process
# that holds the dataset (a loader worker inherits it, or unpickles the dataset's readers).
_ROW_READERS: dict[str, Callable[[int], bytes]] = {}


def register_rows(prefix: str, read: Callable[[int], bytes]) -> None:
    """Let the paths ``{prefix}{row}]`` name rows that ``read(row)`` gives the bytes of.

    Args:
        prefix: the rows' paths up to their number, ending in ``[``.
        read: row number -> the image's bytes; an OSError or ValueError says why there are none.
    """
    _ROW_READERS[prefix] = read


def _row(path: str) -> tuple[Callable[[int], bytes], int] | None:
    """The reader and row number of a registered row's path; None for a file."""
    if not (_ROW_READERS and path.endswith("]")):
        return None
    cut = path.rfind("[")
    read = _ROW_READERS.get(path[:cut + 1])
    number = path[cut + 1:-1]
    return (read, int(number)) if read is not None and number.isdigit() else None


def read_image_bytes(path: str) -> bytes:
    """An image's bytes: a file's, or a registered dataset row's; a BadImageError names ``path``."""
    row = _row(path)
    try:
        return row[0](row[1]) if row is not None else Path(path).read_bytes()
    except (OSError, ValueError) as err:
        raise BadImageError(f"cannot decode image {path}: {err}") from None


def _source(path: str) -> str | BinaryIO:
    """What Pillow opens for ``path``: the file itself (read lazily), or a row's bytes."""
    return path if _row(path) is None else io.BytesIO(read_image_bytes(path))


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
    return _pillow_rgb(_source(path), path, reduce_to)


def _pillow_rgb(source: str | BinaryIO, path: str, reduce_to: tuple[int, int] | None,
                turn: bool = True) -> Image.Image:
    try:
        with Image.open(source) as img:
            if reduce_to is not None and img.format == "JPEG":
                width, height = reduce_to
                if _orientation(img) in (5, 6, 7, 8):  # stored rotated by 90 degrees
                    width, height = height, width
                img.draft(img.mode, (max(1, width), max(1, height)))
            if turn:
                img = ImageOps.exif_transpose(img)
            img.load()  # before the file closes: to_rgb may hand back this very image
            return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImageError(f"cannot decode image {path}: {why_unreadable(err)}") from None


def _header_orientation(img: Image.Image) -> int:
    """The EXIF orientation from what ``Image.open`` parsed: Pillow's PNG reader would decode the
    whole image to look for an eXIf chunk after the pixels, which the PNG spec places before them."""
    if img.format == "PNG":
        exif = img.info.get("exif")
        if not exif:
            return 1
        try:
            parsed = Image.Exif()
            parsed.load(exif)
            return int(parsed.get(0x0112, 1))
        except (ValueError, TypeError, SyntaxError, OSError):
            return 1
    return _orientation(img)


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except (ValueError, TypeError, SyntaxError):
        return 1


def oriented_size(path: str) -> tuple[int, int]:
    """(width, height) of an image as shown (EXIF rotation applied), from its header only."""
    try:
        with Image.open(_source(path)) as img:
            width, height = img.size
            return (height, width) if _orientation(img) in (5, 6, 7, 8) else (width, height)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImageError(f"cannot decode image {path}: {why_unreadable(err)}") from None


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
    return img if img.mode == "RGB" else img.convert("RGB")


# The DCT scalings libjpeg-turbo decodes fast (its SIMD code covers 1/2, 1/4 and 1/8; the 3/4,
# 5/8... scalings in between are slower than a full decode).
JPEG_REDUCTIONS = (8, 4, 2)
ROTATED = (5, 6, 7, 8)  # EXIF orientations stored rotated by 90 degrees


@dataclass(frozen=True)
class Header:
    """What an image's header says: its size as shown (EXIF orientation applied), and how to decode it.

    Attributes:
        width, height: the shown image's size in pixels.
        orientation: the EXIF orientation tag, 1 (none) to 8.
        libjpeg_rgb: an ordinary JPEG (YCbCr, RGB or grayscale) that libjpeg-turbo turns into RGB
            itself; other images (PNG, CMYK JPEG, ...) go through Pillow and ``to_rgb``.
        jpeg: a JPEG of any kind, so a reduced (DCT-scaled) decode is possible.
    """

    width: int
    height: int
    orientation: int = 1
    libjpeg_rgb: bool = False
    jpeg: bool = False


def read_header(data: bytes, path: str) -> Header:
    """Parse an image's header from its bytes (no pixel is decoded); a BadImageError names ``path``."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            orientation = _header_orientation(img)
            jpeg = img.format == "JPEG"
            libjpeg_rgb = jpeg and img.mode in ("RGB", "L")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImageError(f"cannot decode image {path}: {why_unreadable(err)}") from None
    if orientation in ROTATED:
        width, height = height, width
    return Header(width, height, orientation if 1 <= orientation <= 8 else 1, libjpeg_rgb, jpeg)


def jpeg_reduction(header: Header, region: tuple[int, int], out: tuple[int, int]) -> int:
    """The largest of 8, 4, 2 (else 1) by which a JPEG can be decoded smaller while a ``region``
    of (height, width) shown pixels still has at least ``out`` (height, width) pixels."""
    if not header.jpeg:
        return 1
    for r in JPEG_REDUCTIONS:
        if region[0] / r >= out[0] and region[1] / r >= out[1]:
            return r
    return 1


def decode_stored(data: bytes, header: Header, path: str, reduction: int = 1) -> tuple[np.ndarray, int]:
    """Decode an image to an (height, width, 3) uint8 array as stored, and the EXIF orientation
    to apply to it (``orient``).

    Args:
        data: the file's bytes.
        header: ``read_header(data, path)``.
        path: named in a BadImageError.
        reduction: 1, 2, 4 or 8: decode a JPEG at that fraction of its size (ceil of each side),
            by libjpeg's DCT scaling; ignored for other formats.
    """
    if not header.libjpeg_rgb:
        reduce_to = None
        if reduction > 1:
            reduce_to = (math.ceil(header.width / reduction), math.ceil(header.height / reduction))
        # Pillow leaves the pixels as stored; the header's orientation is the one to apply.
        return np.asarray(_pillow_rgb(io.BytesIO(data), path, reduce_to, turn=False)), header.orientation
    stored_w, stored_h = header.width, header.height
    if header.orientation in ROTATED:
        stored_w, stored_h = stored_h, stored_w
    try:
        # min_width/min_height select the DCT scaling: exactly 1/reduction (libjpeg rounds sizes up).
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=math.ceil(stored_w / reduction),
                                     min_height=math.ceil(stored_h / reduction))
    except (ValueError, RuntimeError):
        # simplejpeg stops at libjpeg's warnings too ("extraneous bytes before marker"), which
        # Pillow decodes through, as the pipeline always did; a file Pillow cannot decode either
        # is a BadImageError from Pillow.
        reduce_to = None
        if reduction > 1:
            reduce_to = (math.ceil(header.width / reduction), math.ceil(header.height / reduction))
        arr = np.asarray(_pillow_rgb(io.BytesIO(data), path, reduce_to, turn=False))
    return arr, header.orientation


def stored_region(orientation: int, shown: tuple[int, int], top: int, left: int, height: int,
                  width: int) -> tuple[int, int, int, int]:
    """The (top, left, height, width) region of the stored pixels that ``orient`` shows as the given
    region of the shown image, whose size is ``shown`` (height, width) (``orient_tensor`` turns it)."""
    if orientation in (3, 4, 7, 8):  # undo the row flip
        top = shown[0] - top - height
    if orientation in (2, 3, 6, 7):  # undo the column flip
        left = shown[1] - left - width
    if orientation in ROTATED:
        return left, top, width, height
    return top, left, height, width


def orient_tensor(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A stored (C, height, width) image as shown under EXIF ``orientation``, as Pillow's
    ``ImageOps.exif_transpose`` would turn it (torch flips copy: meant for small outputs)."""
    if orientation in ROTATED:
        image = image.transpose(1, 2)
    if orientation in (2, 3, 6, 7):
        image = image.flip(2)
    if orientation in (3, 4, 7, 8):
        image = image.flip(1)
    return image
