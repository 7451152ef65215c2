"""The one image reader: training, evaluation, the `infer` command and `Detector` all decode files here.

Pixels come out in the frame every viewer shows: the EXIF orientation tag of a phone photo (stored
640x427, tagged "rotate 90 degrees") is applied, so the image is 427 wide and a COCO box drawn in
an annotation tool lands on the right pixels (pycocotools' viewers and detectron2 assume the same
frame). JPEG and PNG go through torchvision's decoders (libjpeg-turbo, libpng); everything else
(WEBP, GIF, BMP, TIFF) and whatever torchvision cannot decode goes through Pillow, which also
words the reason when a file cannot be read at all.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

# File suffixes of the formats read_image decodes (lower case); what a folder scan picks up.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
FORMAT_NAMES = "JPEG, PNG, WEBP, GIF, BMP or TIFF"

# The first bytes of the two formats torchvision decodes with EXIF orientation applied
# (its WEBP decoder ignores the tag, so WEBP goes through Pillow).
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Pillow modes of single-channel images with more than 8 bits (16-bit PNG and TIFF grayscale).
_WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_UINT16_MAX = 65535


class UnreadableImageError(ValueError):
    """An image file that exists but cannot be decoded: empty, not an image, truncated or corrupt.
    The message names the file and says why in words, e.g. "cannot decode photos/a.jpg: the file is
    truncated (it ends before the image data does)"."""


def read_image(path: str | os.PathLike) -> Tensor:
    """uint8 (3, H, W) RGB pixels of an image file, in its displayed frame.

    The EXIF orientation is applied (H, W are the displayed height and width, not the stored ones);
    grayscale, grayscale+alpha, palette, RGBA (alpha dropped, as torchvision does), CMYK and 16-bit
    images become 8-bit RGB. An animated GIF gives its first frame.

    Raises:
        FileNotFoundError: no file at `path`.
        UnreadableImageError (a ValueError) naming the file: a folder, an empty file, not a
            JPEG/PNG/WEBP/GIF/BMP/TIFF image, a truncated or corrupt one.
    """
    path = os.fspath(path)
    data = _read_bytes(path)
    if data.startswith(_JPEG_SIGNATURE) or data.startswith(_PNG_SIGNATURE):
        try:
            return _decode_with_torchvision(data)
        except RuntimeError:
            pass  # Pillow decodes what torchvision refuses (e.g. odd JPEG variants) or words why it fails
    return _decode_with_pillow(data, path)


def pil_to_tensor_rgb(image: Image.Image) -> Tensor:
    """uint8 (3, H, W) RGB pixels of a Pillow image as it stands (no EXIF orientation applied).

    16-bit grayscale keeps its high byte (as torchvision's 16-bit PNG decoding does, so that both
    paths give the same pixels); every other mode goes through Pillow's RGB conversion (alpha dropped).
    """
    if image.mode in _WIDE_GRAY_MODES:
        gray = np.asarray(image).astype(np.int64).clip(0, _UINT16_MAX) >> 8
        return torch.from_numpy(gray.astype(np.uint8)).expand(3, -1, -1).contiguous()
    rgb = np.array(image.convert("RGB"))  # (H, W, 3) uint8, writable: torch.from_numpy keeps it
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def _read_bytes(path: str) -> bytearray:
    """The file's bytes (a bytearray, so that torch can wrap it without a copy)."""
    try:
        with open(path, "rb") as file:
            data = bytearray(file.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except IsADirectoryError:
        raise UnreadableImageError(f"cannot decode {path}: it is a folder, not an image file") from None
    if not data:
        raise UnreadableImageError(f"{path} is an empty file (0 bytes)")
    return data


def _decode_with_torchvision(data: bytearray) -> Tensor:
    """JPEG or PNG bytes -> uint8 (3, H, W) RGB, EXIF orientation applied; RuntimeError if it fails."""
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of torchcodec; they still work.
        warnings.simplefilter("ignore", DeprecationWarning)
        image = decode_image(
            torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB, apply_exif_orientation=True
        )
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = F.to_dtype(image, torch.uint8, scale=True)
    return image


def _decode_with_pillow(data: bytearray, path: str) -> Tensor:
    """Any format Pillow reads -> uint8 (3, H, W) RGB, EXIF orientation applied.

    Raises:
        UnreadableImageError naming `path` and the reason in words.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes now, so that a truncated file fails here and not in exif_transpose
            return pil_to_tensor_rgb(ImageOps.exif_transpose(image))
    except UnidentifiedImageError:
        raise UnreadableImageError(
            f"cannot decode {path}: Unsupported image file (not a {FORMAT_NAMES} image)"
        ) from None
    except Image.DecompressionBombError as err:
        raise UnreadableImageError(f"cannot decode {path}: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:  # Pillow reports broken files with all three
        if "truncated" in str(err).lower():
            reason = "the file is truncated (it ends before the image data does)"
        else:
            reason = f"the image data is corrupt ({err})"
        raise UnreadableImageError(f"cannot decode {path}: {reason}") from None
