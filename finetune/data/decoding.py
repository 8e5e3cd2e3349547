"""Decoding as a stage of its own: a crop plan, the CPU decoder, and bytes handed over instead of pixels.

A preset draws its random crop from the header alone (``presets``) and describes it as a
``Crop``; decoding then turns a file's bytes and that ``Crop`` into pixels in one pass: decode
(reduced by libjpeg's DCT scaling where the crop allows), cut, flip, resample. Loader workers
normally run both stages. With ``decode_in_workers=False`` (``data.make_train_loader``) they
hand the main process ``Encoded`` items instead, and ``presets.ModelInput`` decodes the batch
with a decoder where the model runs: the CPU one here, or a GPU decoder with the same call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from finetune.data.images import ROTATED, Header, decode_stored, jpeg_reduction, orient_tensor, stored_region


@dataclass(frozen=True)
class Crop:
    """What to make of an image: a region of the shown image (EXIF orientation applied), the size
    it is resampled to, optionally a window cut from that, and a flip.

    Attributes:
        top, left, height, width: the region, in the shown image's pixels.
        out_height, out_width: the size the region is resampled to (antialiased bilinear).
        cut: (top, left, height, width) of a window of the resampled region to keep (zero-padded
            where it reaches outside, as torchvision's crop); None keeps all of it.
        flip: mirror the result left to right.
        pillow: resample with Pillow and this interpolation (``bilinear``, ``bicubic``, ``nearest``),
            bit for bit as torchvision does on PIL images; such a crop's region is the whole image.
            None: torch's uint8 antialiased bilinear resize, several times faster.
    """

    top: int
    left: int
    height: int
    width: int
    out_height: int
    out_width: int
    cut: tuple[int, int, int, int] | None = None
    flip: bool = False
    pillow: str | None = None


@dataclass(frozen=True)
class Encoded:
    """What a worker hands over when decoding happens elsewhere: a file's bytes, its header, the crop."""

    data: bytes
    header: Header
    crop: Crop
    path: str


class EncodedBatch:
    """A batch of ``Encoded`` items as the loader yields it (Accelerate passes it through untouched)."""

    def __init__(self, items: Sequence[Encoded]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)


def decode_crop(item: Encoded) -> torch.Tensor:
    """The CPU decoder for one image: a uint8 (3, H, W) tensor, channels-last in memory.

    The file is decoded once (a JPEG at 1/2, 1/4 or 1/8 scale where the region still has the
    output's pixels), the region cut as a view and copied, resampled once, then cut and flipped.
    """
    crop, header = item.crop, item.header
    reduction = jpeg_reduction(header, (crop.height, crop.width), (crop.out_height, crop.out_width))
    arr, orientation = decode_stored(item.data, header, item.path, reduction)
    return resample(arr, orientation, (header.height, header.width), crop)


def resample(arr: np.ndarray, orientation: int, shown: tuple[int, int], crop: Crop) -> torch.Tensor:
    """A ``Crop`` of decoded pixels: a uint8 (3, H, W) tensor, channels-last in memory.

    Args:
        arr: (height, width, 3) uint8 pixels as stored, possibly decoded at reduced scale.
        orientation: the EXIF orientation still to apply to them (1: none).
        shown: (height, width) of the image as shown, at full scale: the crop's coordinates.
        crop: what to make of it.
    """
    if crop.pillow is not None:
        img = Image.fromarray(arr)
        return resample_pillow(img if orientation == 1 else img.transpose(_TRANSPOSE[orientation]), crop)
    # Work on the stored pixels, whose region rows are contiguous (numpy copies a rotated or
    # mirrored view a hundred times slower), and orient the small output at the end.
    out = (crop.out_height, crop.out_width)
    top, left, height, width = stored_region(orientation, shown, crop.top, crop.left, crop.height, crop.width)
    if orientation in ROTATED:
        out, shown = out[::-1], shown[::-1]
    if arr.shape[:2] != tuple(shown):
        # Decoded at reduced scale: the region's corners snap to the reduced image's pixel grid, a
        # shift of at most half an output pixel.
        fy, fx = arr.shape[0] / shown[0], arr.shape[1] / shown[1]
        top, left = round(top * fy), round(left * fx)
        height, width = max(1, round(height * fy)), max(1, round(width * fx))
    region = arr[top:top + height, left:left + width]
    if not (region.flags.c_contiguous and region.flags.writeable):
        region = region.copy()  # the region only; as (H, W, C) memory it is what torch's fast
        # uint8 antialiased resize reads and writes (channels-last)
    image = torch.from_numpy(region).permute(2, 0, 1)
    if tuple(image.shape[1:]) != out:
        image = F.resize(image, list(out), antialias=True)
    image = orient_tensor(image, orientation)
    if crop.cut is not None:
        image = F.crop(image, *crop.cut)
    if crop.flip:
        image = F.horizontal_flip(image)  # on the small output: numpy copies a mirrored view 100x slower
    return image


# Pillow's turn of each EXIF orientation (as ImageOps.exif_transpose).
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


_PILLOW_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def resample_pillow(img: Image.Image, crop: Crop) -> torch.Tensor:
    """A ``Crop`` whose region is the whole of ``img`` (RGB, as shown), resampled by Pillow as
    torchvision's transforms do on PIL images: a uint8 (3, H, W) tensor."""
    resample = _PILLOW_FILTERS[crop.pillow]
    if crop.cut is None:
        img = img.resize((crop.out_width, crop.out_height), resample)
    else:
        # Resample only the cut: the source box that the resize maps onto it, at the same scale and
        # filter positions as resizing the whole image and then cutting (Pillow's ``box``), in
        # 0.6x the time for a centre crop of a photo; the box's float corners move a pixel by 1
        # level in about 1 of 1,000.
        top, left, height, width = crop.cut
        sx, sy = img.width / crop.out_width, img.height / crop.out_height
        img = img.resize((width, height), resample, box=(left * sx, top * sy, (left + width) * sx, (top + height) * sy))
    if crop.flip:
        img = F.horizontal_flip(img)
    return F.pil_to_tensor(img)


class CpuDecoder:
    """Decodes a batch of ``Encoded`` items on the CPU into one (N, 3, H, W) uint8 channels-last tensor."""

    def __call__(self, items: Sequence[Encoded]) -> torch.Tensor:
        return stack_channels_last([decode_crop(item) for item in items])


def stack_channels_last(images: Sequence[torch.Tensor], shared: bool = False) -> torch.Tensor:
    """Stack (3, H, W) images into an (N, 3, H, W) batch laid out channels-last, so that nothing is
    transposed on the device.

    Args:
        images: uint8 (or any) tensors of one shape.
        shared: allocate the batch in shared memory (in a loader worker, as torch's default
            collate does, so the batch crosses to the main process without another copy).
    """
    c, h, w = images[0].shape
    shape = (len(images), h, w, c)
    if shared:
        numel = len(images) * h * w * c
        storage = images[0]._typed_storage()._new_shared(numel, device=images[0].device)
        out = images[0].new(storage).view(shape)
    else:
        out = images[0].new_empty(shape)
    torch.stack([im.permute(1, 2, 0) for im in images], out=out)
    return out.permute(0, 3, 1, 2)
