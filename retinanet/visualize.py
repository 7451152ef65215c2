"""Drawings people can read: boxes, and one label per box (classes and scores) sized to the image.

Used by the `infer` command and by the training's TensorBoard pictures; depends on nothing of ours.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .data.image import pil_to_tensor_rgb

# Detections above this score are drawn for people (infer's default, TensorBoard's val images); the
# config's model.inference.score_thresh (0.05) is for COCO evaluation, where low-scoring detections
# still raise AP, and would cover a photo in boxes.
DISPLAY_SCORE_THRESH = 0.3

# Label text size as a fraction of the image's short side: 1.8% reads like a caption at any size
# (48 px on a 4000x2667 photo); never under 12 px, below which text on a screen is hard to read.
FONT_FRACTION = 0.018
MIN_FONT_PX = 12
# Detections whose boxes agree to this many pixels on every side are one box with several classes:
# one label lists them all instead of printing them on top of each other.
SAME_BOX_PX = 1.0


class DrawStyle(NamedTuple):
    """Sizes of a drawing, in pixels of the image drawn on."""

    font_size: int  # label text size (em)
    line_width: int  # box outline
    padding: int  # between the label text and the edge of its background


def draw_style(height: int, width: int) -> DrawStyle:
    """Sizes that scale with the image: text 1.8% of the short side (>= 12 px), lines 1/6 of that."""
    font_size = max(MIN_FONT_PX, round(FONT_FRACTION * min(height, width)))
    return DrawStyle(font_size, max(1, round(font_size / 6)), max(2, round(font_size / 5)))


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's built-in TrueType font (scalable since Pillow 10.1) at `size` px."""
    return ImageFont.load_default(size=size)


def class_color(label: int) -> tuple[int, int, int]:
    """A distinct, stable RGB colour per class (golden-ratio hue steps)."""
    hue = (label * 0.618033988749895) % 1.0
    sector, fraction = int(hue * 6), hue * 6 % 1.0
    high, low, rising, falling = 230, 40, int(40 + 190 * fraction), int(230 - 190 * fraction)
    return [(high, rising, low), (falling, high, low), (low, high, rising),
            (low, falling, high), (rising, low, high), (high, low, falling)][sector]


def text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with `background` (WCAG 2 contrast ratio)."""
    luminance = relative_luminance(background)
    black_contrast, white_contrast = (luminance + 0.05) / 0.05, 1.05 / (luminance + 0.05)
    return (0, 0, 0) if black_contrast >= white_contrast else (255, 255, 255)


def relative_luminance(color: tuple[int, int, int]) -> float:
    """WCAG 2 relative luminance of an sRGB colour (0..255 channels): 0 black .. 1 white."""
    linear = [value / 255 / 12.92 if value <= 10 else ((value / 255 + 0.055) / 1.055) ** 2.4 for value in color]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def group_same_boxes(boxes: Tensor, tolerance: float = SAME_BOX_PX) -> list[list[int]]:
    """Detections that share a box (every coordinate within `tolerance` px of the group's first).

    Args:
        boxes: (D, 4) xyxy pixels, best detection first.
    Returns:
        lists of detection indices; groups ordered by their first (best) member, members ascending.
    """
    boxes = boxes.float()
    close = (boxes[:, None, :] - boxes[None, :, :]).abs().amax(dim=-1) <= tolerance  # (D, D)
    grouped = [False] * len(boxes)
    groups = []
    for first in range(len(boxes)):
        if grouped[first]:
            continue
        members = [index for index in close[first].nonzero().flatten().tolist() if not grouped[index]]
        for index in members:
            grouped[index] = True
        groups.append(members)
    return groups


def draw_detections(image: Tensor, detections: dict[str, Any]) -> Tensor:
    """uint8 (3, H, W) copy of `image` with the detections drawn on it (see draw_detections_on).

    Args:
        image: uint8 (3, H, W) RGB.
        detections: a Detector.predict result of this image ("boxes" xyxy pixels of it, "scores",
            "labels", "class_names").
    """
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"draw_detections: expected a uint8 (3, H, W) image, got {image.dtype} {tuple(image.shape)}")
    if not len(detections["boxes"]):
        return image.clone()
    picture = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    draw_detections_on(picture, detections)
    return pil_to_tensor_rgb(picture)


def draw_detections_on(picture: Image.Image, detections: dict[str, Any]) -> None:
    """Draw boxes and labels on an RGB PIL image, in place, at sizes scaled to it (draw_style).

    A box is outlined in its class colour; its label ("cat 0.91") sits above it, or inside at its top
    when there is no room above, on a filled background of that colour with black or white text. A
    box found for several classes gets one label listing them, best first, each on its own colour.
    The best detection is drawn last, on top.
    """
    boxes = detections["boxes"].detach().float().cpu()
    labels, scores, names = detections["labels"].tolist(), detections["scores"].tolist(), detections["class_names"]
    style = draw_style(picture.height, picture.width)
    draw = ImageDraw.Draw(picture)
    groups = group_same_boxes(boxes)
    for members in reversed(groups):
        x1, y1, x2, y2 = (round(value) for value in boxes[members[0]].tolist())
        # PIL's rectangle includes its right and bottom edges; a box's x2, y2 are the pixel past it.
        outline = (x1, y1, max(x1, x2 - 1), max(y1, y2 - 1))
        draw.rectangle(outline, outline=class_color(labels[members[0]]), width=style.line_width)
    for members in reversed(groups):
        parts = [(f"{names[index]} {scores[index]:.2f}", class_color(labels[index])) for index in members]
        _draw_label(draw, style, boxes[members[0]].tolist(), parts, picture.size)


def _draw_label(
    draw: ImageDraw.ImageDraw, style: DrawStyle, box: list[float], parts: list[tuple[str, tuple[int, int, int]]],
    image_size: tuple[int, int],
) -> None:
    """One row of (text, background colour) parts at the box's top-left corner: above the box when
    there is room, else inside at its top; shifted to stay within the image."""
    font = _font(style.font_size)
    ascent, descent = font.getmetrics()
    height = ascent + descent + 2 * style.padding
    widths = [round(font.getlength(text)) + 2 * style.padding for text, _ in parts]
    image_width, image_height = image_size
    top = round(box[1])
    y = top - height if top >= height else top
    y = max(0, min(y, image_height - height))
    x = max(0, min(round(box[0]), image_width - sum(widths)))
    for (text, background), width in zip(parts, widths):
        draw.rectangle((x, y, x + width - 1, y + height - 1), fill=background)
        draw.text((x + style.padding, y + style.padding), text, fill=text_color(background), font=font)
        x += width
