"""Write a COCO-format dataset of small, thin bars: the case the default anchors miss.

Every object is a 4:1 (horizontal) or 1:4 (vertical) rectangle whose long side is 12-28 px, on a
128 x 128 px textured background; two classes by colour (light and dark bars). docs/anchors.md uses
it to show what `retinanet analyze-data --fit-anchors` gains:

    python tools/make_elongated_dataset.py datasets/elongated --num-train 512 --num-val 128

    root/train/000000.jpg ...  root/val/000000.jpg ...
    root/annotations/instances_train.json  root/annotations/instances_val.json

Same arguments, same files.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as nnf
from torchvision.io import encode_jpeg

CATEGORIES = [{"id": 1, "name": "light_bar"}, {"id": 2, "name": "dark_bar"}]
IMAGE_SIZE = 128  # px, square images
LONG_SIDE_RANGE = (12, 28)  # px, the short side is a quarter of it (rounded, at least 3)
ELONGATION = 4
OBJECTS_PER_IMAGE = (1, 6)
PLACEMENT_TRIES = 20
GAP = 2  # px kept free between bars, so that every box holds one bar
JPEG_QUALITY = 92


def render_image(generator: torch.Generator) -> tuple[torch.Tensor, list[tuple[int, list[float]]]]:
    """One image: uint8 (3, H, W) pixels and (category_id, [x, y, w, h]) per bar."""
    coarse = torch.rand(1, 3, 4, 4, generator=generator)
    canvas = 0.35 + 0.3 * nnf.interpolate(coarse, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic",
                                          align_corners=False)[0].clamp(0, 1)
    objects: list[tuple[int, list[float]]] = []
    taken = torch.zeros(IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    num_objects = int(torch.randint(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1, (), generator=generator))
    for _ in range(num_objects):
        for _ in range(PLACEMENT_TRIES):
            long_side = int(torch.randint(LONG_SIDE_RANGE[0], LONG_SIDE_RANGE[1] + 1, (), generator=generator))
            short_side = max(3, round(long_side / ELONGATION))
            horizontal = bool(torch.rand((), generator=generator) < 0.5)
            width, height = (long_side, short_side) if horizontal else (short_side, long_side)
            x = int(torch.randint(0, IMAGE_SIZE - width + 1, (), generator=generator))
            y = int(torch.randint(0, IMAGE_SIZE - height + 1, (), generator=generator))
            region = (slice(max(0, y - GAP), y + height + GAP), slice(max(0, x - GAP), x + width + GAP))
            if not taken[region].any():
                break
        else:
            continue
        taken[region] = True
        category = int(torch.randint(len(CATEGORIES), (), generator=generator))
        # Light bars near white, dark bars near black, each channel jittered: always >= 0.2 from the background.
        level = 0.92 if category == 0 else 0.08
        color = level + 0.06 * (torch.rand(3, generator=generator) - 0.5)
        canvas[:, y : y + height, x : x + width] = color[:, None, None]
        objects.append((CATEGORIES[category]["id"], [float(x), float(y), float(width), float(height)]))
    canvas = canvas + 0.03 * torch.randn(canvas.shape, generator=generator)
    return (canvas.clamp(0, 1) * 255).round().to(torch.uint8), objects


def make_elongated_dataset(root: Path, num_train: int, num_val: int, seed: int = 0) -> None:
    for split_index, (split, num_images) in enumerate((("train", num_train), ("val", num_val))):
        generator = torch.Generator().manual_seed(2 * seed + split_index)
        img_dir = root / split
        img_dir.mkdir(parents=True, exist_ok=True)
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index in range(num_images):
            pixels, objects = render_image(generator)
            file_name = f"{index:06d}.jpg"
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs; they still work
                warnings.simplefilter("ignore", DeprecationWarning)
                (img_dir / file_name).write_bytes(encode_jpeg(pixels, quality=JPEG_QUALITY).numpy().tobytes())
            images.append({"id": index + 1, "file_name": file_name, "width": IMAGE_SIZE, "height": IMAGE_SIZE})
            for category_id, bbox in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": category_id,
                                    "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
        dataset = {"images": images, "annotations": annotations, "categories": CATEGORIES}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(dataset))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--num-train", type=int, default=512)
    parser.add_argument("--num-val", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one small image at a time: threads only add synchronisation
    make_elongated_dataset(args.root, args.num_train, args.num_val, args.seed)
    print(f"wrote {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
