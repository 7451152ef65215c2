"""A built-in synthetic detection dataset (coloured shapes on textured backgrounds), in COCO format.

It lets the whole pipeline (data, training, COCO evaluation) run end to end without downloading
anything, and gives a task a small RetinaNet learns to a high AP in minutes. Files are real JPEGs
and a real instances json, so the same code path as COCO is exercised:

    root/train/000000.jpg ...  root/val/000000.jpg ...
    root/annotations/instances_train.json  root/annotations/instances_val.json

Generation is deterministic given (num_images, image_size, seed): same arguments, same bytes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as nnf
from torch import Tensor
from torchvision.io import encode_jpeg

from retinanet.config import DatasetConfig, SyntheticConfig

logger = logging.getLogger(__name__)

# Category ids are deliberately not contiguous, so the id <-> label mapping is always exercised.
CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 3, "name": "square"}, {"id": 5, "name": "triangle"}]
EMPTY_IMAGE_PROB = 0.08  # images drawn with no object at all
MAX_OBJECTS = 5
OBJECT_SIZE_RANGE = (0.12, 0.60)  # object extent as a fraction of the image's short side
SHORT_SIDE_RANGE = (0.75, 1.0)  # short side as a fraction of the long side (= image_size)
# A new object is rejected (and re-drawn) if it would hide more than 30% of an earlier one, so every
# annotated shape stays mostly visible and its box (tight around the visible pixels) stays meaningful.
MIN_VISIBLE_FRACTION = 0.7
PLACEMENT_TRIES = 10
JPEG_QUALITY = 90
# Backgrounds live in the mid grey range and object colours near the ends of each channel, so every
# object differs from what is behind it by >= 0.2 in every channel (visible, yet not trivial once
# textures and JPEG noise are added).
BACKGROUND_RANGE = (0.35, 0.65)
OBJECT_CHANNEL_MARGIN = 0.15
PIXEL_NOISE_STD = 0.03
SPLITS = ("train", "val")


def make_synthetic(root: str | os.PathLike, num_train: int, num_val: int, image_size: int, seed: int) -> dict:
    """Write the synthetic dataset under `root` (overwriting files of the same names).

    Args:
        root: output folder (created).
        num_train, num_val: images per split.
        image_size: long side of every image, px; the short side is 0.75..1.0 of it and half of the
            images are portrait.
        seed: the train split uses torch.Generator seed 2*seed, the val split 2*seed + 1.
    Returns:
        {"train": {"ann_file", "img_dir", "num_images", "num_annotations"}, "val": {...}}.
    """
    if image_size < 16:
        raise ValueError(f"synthetic image_size must be >= 16 px, got {image_size}")
    # The tensors here are tiny (one 128 px image at a time): intra-op threads only add
    # synchronisation, which costs 50x on a loaded machine. One thread while generating.
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = _write_splits(Path(root), num_train, num_val, image_size, seed)
    finally:
        torch.set_num_threads(num_threads)
    logger.info("wrote synthetic dataset to %s: %d train / %d val images", root, num_train, num_val)
    return summary


def _write_splits(root: Path, num_train: int, num_val: int, image_size: int, seed: int) -> dict:
    summary = {}
    for split_index, (split, num_images) in enumerate(zip(SPLITS, (num_train, num_val))):
        generator = torch.Generator().manual_seed(2 * seed + split_index)
        img_dir = root / split
        ann_file = root / "annotations" / f"instances_{split}.json"
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_file.parent.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for image_index in range(num_images):
            pixels, objects = render_image(generator, image_size)
            image_id = image_index + 1
            file_name = f"{image_index:06d}.jpg"
            with warnings.catch_warnings():
                # torchvision 0.29 deprecates its codecs in favour of torchcodec; they still work.
                warnings.simplefilter("ignore", DeprecationWarning)
                (img_dir / file_name).write_bytes(encode_jpeg(pixels, quality=JPEG_QUALITY).numpy().tobytes())
            images.append({"id": image_id, "file_name": file_name, "width": pixels.shape[2], "height": pixels.shape[1]})
            for category_id, bbox, area in objects:
                annotations.append(
                    {"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                     "bbox": bbox, "area": area, "iscrowd": 0}
                )
        info = {
            "description": "retinanet synthetic shapes",
            "split": split,
            "num_images": num_images,
            "image_size": image_size,
            "seed": seed,
        }
        dataset = {"info": info, "images": images, "annotations": annotations, "categories": CATEGORIES}
        ann_file.write_text(json.dumps(dataset))
        summary[split] = {
            "ann_file": str(ann_file), "img_dir": str(img_dir),
            "num_images": num_images, "num_annotations": len(annotations),
        }
    return summary


def ensure_synthetic(syn_cfg: SyntheticConfig) -> tuple[DatasetConfig, DatasetConfig]:
    """Generate the synthetic dataset at `syn_cfg.root` unless it is already there; return its files.

    Generation goes to a temporary sibling folder renamed to `root` at the end, so a folder at
    `root` is always complete. Several processes (e.g. DDP ranks) may call this at once: each
    generates, the first rename wins and the others discard their identical copies.

    Returns:
        (train, val) DatasetConfig with ann_file and img_dir set.
    Raises:
        FileExistsError: `root` is a file, or a folder holding something else than a complete
            synthetic dataset (it is never written into).
        ValueError: the dataset there was generated with other settings.
    """
    if not syn_cfg.root:
        raise ValueError("data.synthetic.root is empty: nowhere to put the synthetic dataset")
    root = Path(syn_cfg.root)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"data.synthetic.root={root} is a file, not a folder; choose another folder")
    wanted = {"train": syn_cfg.num_train, "val": syn_cfg.num_val}
    splits = {
        split: DatasetConfig(ann_file=str(root / "annotations" / f"instances_{split}.json"), img_dir=str(root / split))
        for split in SPLITS
    }
    if not _is_complete(root):
        if root.exists() and any(root.iterdir()):
            raise FileExistsError(
                f"data.synthetic.root={root} exists but holds no complete synthetic dataset "
                f"(missing {splits['train'].ann_file} or {splits['val'].ann_file}); delete it or choose another folder"
            )
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the dataset from a teammate
        try:
            make_synthetic(tmp, syn_cfg.num_train, syn_cfg.num_val, syn_cfg.image_size, syn_cfg.seed)
            if root.exists():
                root.rmdir()  # empty (checked above); rename cannot replace a directory
            os.rename(tmp, root)
            logger.info("generated the synthetic dataset in %s", root)
        except OSError:
            if not _is_complete(root):
                raise
            logger.info("synthetic dataset at %s was completed by another process", root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for split in SPLITS:
        _check_matches(splits[split].ann_file, wanted[split], syn_cfg)
    return splits["train"], splits["val"]


def _is_complete(root: Path) -> bool:
    return all((root / "annotations" / f"instances_{split}.json").is_file() for split in SPLITS)


def _check_matches(ann_file: str, num_images: int, syn_cfg: SyntheticConfig) -> None:
    """Raise if an existing synthetic json was generated with other settings than the config's."""
    with open(ann_file) as f:
        info = json.load(f).get("info", {})
    wanted = {"num_images": num_images, "image_size": syn_cfg.image_size, "seed": syn_cfg.seed}
    found = {key: info.get(key) for key in wanted}
    if found != wanted:
        raise ValueError(
            f"{ann_file} was generated with {found} but data.synthetic asks for {wanted}; "
            f"delete {syn_cfg.root} to regenerate it or point data.synthetic.root elsewhere"
        )


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def render_image(generator: torch.Generator, image_size: int) -> tuple[Tensor, list[tuple[int, list[float], float]]]:
    """Draw one image.

    Returns:
        pixels: uint8 (3, H, W), max(H, W) = image_size.
        objects: (category_id, bbox [x, y, w, h] tight around the visible pixels, visible area px).
    """
    short_side = round(image_size * _uniform(generator, *SHORT_SIDE_RANGE))
    if torch.rand((), generator=generator).item() < 0.5:
        height, width = short_side, image_size
    else:
        height, width = image_size, short_side
    canvas = _background(generator, height, width)
    # Pixel centres, (H, W) each.
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")

    num_objects = 0
    if torch.rand((), generator=generator).item() >= EMPTY_IMAGE_PROB:
        num_objects = int(torch.randint(1, MAX_OBJECTS + 1, (), generator=generator))
    full_areas: list[float] = []
    visible = torch.zeros((0, height, width), dtype=torch.bool)  # (K, H, W) of the objects so far
    category_ids: list[int] = []
    corners: list[tuple[bool, ...]] = []  # colour corner of each object so far
    for _ in range(num_objects):
        for _ in range(PLACEMENT_TRIES):
            class_index = int(torch.randint(len(CATEGORIES), (), generator=generator))
            mask = _shape_mask(generator, class_index, xs, ys)
            still_visible = (visible & ~mask).sum(dim=(1, 2)).float()
            if mask.any() and bool((still_visible >= MIN_VISIBLE_FRACTION * torch.tensor(full_areas)).all()):
                break
        else:
            continue
        # An object overlapping an earlier one gets a colour from another corner of the RGB cube,
        # so the two stay distinguishable.
        touched = {corners[k] for k in range(len(corners)) if bool((visible[k] & mask).any())}
        for _ in range(PLACEMENT_TRIES):
            color, corner = _object_color(generator)
            if corner not in touched:
                break
        canvas = torch.where(mask, color[:, None, None], canvas)
        corners.append(corner)
        visible = torch.cat([visible & ~mask, mask[None]])
        full_areas.append(float(mask.sum()))
        category_ids.append(CATEGORIES[class_index]["id"])

    canvas = canvas + PIXEL_NOISE_STD * torch.randn(canvas.shape, generator=generator)
    pixels = (canvas.clamp(0, 1) * 255).round().to(torch.uint8)

    objects = []
    for category_id, mask in zip(category_ids, visible):
        rows = mask.any(dim=1).nonzero()[:, 0]
        cols = mask.any(dim=0).nonzero()[:, 0]
        # A pixel at column c covers [c, c + 1): the box's right edge is the last column + 1.
        x1, y1 = int(cols[0]), int(rows[0])
        x2, y2 = int(cols[-1]) + 1, int(rows[-1]) + 1
        objects.append((category_id, [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], float(mask.sum())))
    return pixels, objects


def _background(generator: torch.Generator, height: int, width: int) -> Tensor:
    """float (3, H, W) texture in BACKGROUND_RANGE: smooth noise, a gradient or stripes."""
    low, high = BACKGROUND_RANGE
    kind = int(torch.randint(3, (), generator=generator))
    if kind == 0:
        coarse = torch.rand((1, 3, 4, 4), generator=generator)
        texture = nnf.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]
        return low + (high - low) * texture.clamp(0, 1)
    color_a = low + (high - low) * torch.rand(3, generator=generator)
    color_b = low + (high - low) * torch.rand(3, generator=generator)
    angle = _uniform(generator, 0, math.pi)
    ys, xs = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    along = xs * math.cos(angle) + ys * math.sin(angle)  # (H, W) px along the texture's direction
    if kind == 1:
        t = (along - along.min()) / (along.max() - along.min()).clamp(min=1e-6)
    else:
        period = _uniform(generator, 6, 24)  # px
        t = 0.5 + 0.5 * torch.sin(2 * math.pi * along / period)
    return color_a[:, None, None] * (1 - t) + color_b[:, None, None] * t


def _object_color(generator: torch.Generator) -> tuple[Tensor, tuple[bool, ...]]:
    """A float (3,) colour whose every channel is within OBJECT_CHANNEL_MARGIN of 0 or of 1, and
    which of the RGB cube's corners it is near (True = channel near 1)."""
    offset = OBJECT_CHANNEL_MARGIN * torch.rand(3, generator=generator)
    high = torch.rand(3, generator=generator) < 0.5
    return torch.where(high, 1 - offset, offset), tuple(high.tolist())


def _shape_mask(generator: torch.Generator, class_index: int, xs: Tensor, ys: Tensor) -> Tensor:
    """bool (H, W) mask of a random circle (0), square (1) or triangle (2) lying inside the image.

    Args:
        xs, ys: (H, W) pixel-centre coordinates.
    """
    height, width = xs.shape
    radius = 0.5 * min(height, width) * _uniform(generator, *OBJECT_SIZE_RANGE)  # half the extent, px
    cx = _uniform(generator, radius, width - radius)
    cy = _uniform(generator, radius, height - radius)
    dx, dy = xs - cx, ys - cy
    name = CATEGORIES[class_index]["name"]
    if name == "circle":
        return dx * dx + dy * dy <= radius * radius
    if name == "square":
        return (dx.abs() <= radius) & (dy.abs() <= radius)
    # Equilateral triangle inscribed in the circle of this radius, randomly rotated. Its corners go
    # round in one direction, so a point is inside when it is on the same side of all three edges.
    angle = _uniform(generator, 0, 2 * math.pi)
    corner_angles = [angle + k * 2 * math.pi / 3 for k in range(3)]
    corners = [(radius * math.cos(a), radius * math.sin(a)) for a in corner_angles]
    inside = torch.ones_like(xs, dtype=torch.bool)
    for (ax, ay), (bx, by) in zip(corners, corners[1:] + corners[:1]):
        inside &= (bx - ax) * (dy - ay) - (by - ay) * (dx - ax) >= 0
    return inside
