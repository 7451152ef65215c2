"""COCO-format detection dataset: annotations checked once at start-up, images decoded on demand.

Everything that can be wrong in an annotation file (unknown ids, missing image files, NaN or
degenerate boxes) is found in the constructor, so a bad dataset fails before training starts with
an error naming the file, never hours later inside a DataLoader worker.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as F

logger = logging.getLogger(__name__)

# (image, target) -> (image, target); see retinanet.data.transforms.
Transforms = Callable[[Tensor, dict[str, Any]], tuple[Tensor, dict[str, Any]]]


class TrainSample(NamedTuple):
    """One dataset key drawn by InfiniteGroupedBatchSampler.

    The sampler yields these instead of bare indices so that a sample's random augmentation is a
    function of its place in the training stream (`seed`) and not of which worker decoded it or
    how the run was interrupted: `CocoDetection.__getitem__` seeds the transforms with it.
    """

    index: int  # position in the dataset, 0..len-1
    epoch: int  # pass over the dataset this draw belongs to
    seed: int  # seed of this draw's random transforms, 0 <= seed < 2**62


class CocoDetection(Dataset):
    """Images and boxes of a COCO instances json.

    Args:
        ann_file: COCO-format json ("images", "annotations", "categories").
        img_dir: folder that the images' "file_name" entries are relative to.
        filter_empty: drop images that have no (non-crowd) box left after sanitizing.
        transforms: applied to (image, target); with a TrainSample key they run under a torch RNG
            seeded from the key, so they are reproducible.

    Item `i` is `(image, target)`:
        image: uint8 (3, H, W) RGB, at the file's resolution (grayscale and RGBA become RGB).
        target: dict with
            "boxes": float32 (N, 4) xyxy, absolute pixels of this image;
            "labels": int64 (N,) contiguous labels 0..K-1 (see `category_ids`);
            "crowd_boxes": float32 (M, 4) xyxy, the iscrowd=1 regions (not targets; the matcher
                may ignore anchors inside them);
            "image_id": int, the COCO image id;
            "orig_size": (H, W) ints of the decoded file.

    Attributes:
        coco: the pycocotools COCO object of the unmodified file (for COCOeval).
        image_ids: COCO ids of the kept images, item i is image_ids[i].
        category_ids: sorted COCO category ids; label k is category_ids[k].
        class_names: category names, index = label.
        category_id_to_label, label_to_category_id: the two directions of that mapping as dicts.
        aspect_ratios: width / height of each kept image (from the json).
        is_landscape: width >= height of each kept image; the sampler's two aspect groups.
        sanitize_counts: how many annotations were dropped or clipped, by reason.
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        img_dir: str | os.PathLike,
        filter_empty: bool = False,
        transforms: Transforms | None = None,
    ) -> None:
        self.ann_file = str(ann_file)
        self.img_dir = str(img_dir)
        self.transforms = transforms

        dataset = _load_json(self.ann_file)
        images = _check_images(dataset["images"], self.ann_file)
        categories = sorted(dataset["categories"], key=lambda c: c["id"])
        self.category_ids: list[int] = [c["id"] for c in categories]
        self.class_names: list[str] = [str(c.get("name", c["id"])) for c in categories]
        self.category_id_to_label = {cat_id: label for label, cat_id in enumerate(self.category_ids)}
        self.label_to_category_id = dict(enumerate(self.category_ids))
        if len(self.category_id_to_label) != len(self.category_ids):
            raise ValueError(f"{self.ann_file}: duplicate category ids in {self.category_ids}")

        boxes_per_image, self.sanitize_counts = self._sanitize(dataset["annotations"], images)
        image_ids = sorted(images)
        if filter_empty:
            image_ids = [i for i in image_ids if boxes_per_image[i][0]]
            self.sanitize_counts["empty_images_filtered"] = len(images) - len(image_ids)
        self.image_ids: list[int] = image_ids
        self._file_names = [images[i]["file_name"] for i in image_ids]
        self._json_sizes = [(images[i]["height"], images[i]["width"]) for i in image_ids]
        self.aspect_ratios = [w / h for h, w in self._json_sizes]
        self.is_landscape = [w >= h for h, w in self._json_sizes]
        self._check_files_exist()

        # Targets of all images packed into a few flat tensors (offsets per image): cheap to send to
        # workers, unlike hundreds of thousands of small tensors.
        self._boxes, self._labels, self._box_offsets = _pack(
            [boxes_per_image[i][0] for i in image_ids], [boxes_per_image[i][1] for i in image_ids]
        )
        self._crowd_boxes, _, self._crowd_offsets = _pack(
            [boxes_per_image[i][2] for i in image_ids], [[0] * len(boxes_per_image[i][2]) for i in image_ids]
        )

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO()
            self.coco.dataset = dataset
            self.coco.createIndex()
        logger.info(
            "%s: %d images, %d boxes, %d crowd regions, %d categories",
            self.ann_file, len(self.image_ids), len(self._labels), len(self._crowd_boxes), len(self.category_ids),
        )

    def _sanitize(
        self, annotations: list[dict], images: dict[int, dict]
    ) -> tuple[dict[int, tuple[list, list, list]], dict[str, int]]:
        """Check every annotation's ids, drop unusable boxes and clip the rest to their image.

        Returns:
            per image id: (boxes xyxy, labels, crowd boxes xyxy) as lists, absolute pixels.
            counts: {"non_finite", "degenerate", "outside", "clipped"} numbers of annotations.
        """
        per_image: dict[int, tuple[list, list, list]] = {i: ([], [], []) for i in images}
        counts = {"non_finite": 0, "degenerate": 0, "outside": 0, "clipped": 0}
        for ann in annotations:
            ann_id = ann.get("id", "?")
            for key in ("image_id", "category_id", "bbox"):
                if key not in ann:
                    raise ValueError(f"{self.ann_file}: annotation {ann_id} has no '{key}'")
            if ann["image_id"] not in images:
                raise ValueError(f"{self.ann_file}: annotation {ann_id} names unknown image_id {ann['image_id']!r}")
            if ann["category_id"] not in self.category_id_to_label:
                raise ValueError(
                    f"{self.ann_file}: annotation {ann_id} names unknown category_id {ann['category_id']!r} "
                    f"(categories: {self.category_ids})"
                )
            bbox = ann["bbox"]
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                raise ValueError(f"{self.ann_file}: annotation {ann_id}: bbox must be [x, y, w, h], got {bbox!r}")
            try:
                x, y, w, h = (float(v) for v in bbox)
            except (TypeError, ValueError):
                raise ValueError(f"{self.ann_file}: annotation {ann_id}: bbox has non-numbers: {bbox!r}") from None
            if not all(math.isfinite(v) for v in (x, y, w, h)):
                counts["non_finite"] += 1
                continue
            if w <= 0 or h <= 0:
                counts["degenerate"] += 1
                continue
            image = images[ann["image_id"]]
            x1, y1 = min(max(x, 0.0), image["width"]), min(max(y, 0.0), image["height"])
            x2, y2 = min(max(x + w, 0.0), image["width"]), min(max(y + h, 0.0), image["height"])
            if x2 <= x1 or y2 <= y1:
                counts["outside"] += 1
                continue
            if (x1, y1, x2, y2) != (x, y, x + w, y + h):
                counts["clipped"] += 1
            boxes, labels, crowd_boxes = per_image[ann["image_id"]]
            if ann.get("iscrowd", 0):
                crowd_boxes.append((x1, y1, x2, y2))
            else:
                boxes.append((x1, y1, x2, y2))
                labels.append(self.category_id_to_label[ann["category_id"]])
        dropped = counts["non_finite"] + counts["degenerate"] + counts["outside"]
        log = logger.warning if dropped else logger.info
        log(
            "%s: dropped %d of %d annotations (%d non-finite, %d zero/negative size, %d outside the image), "
            "clipped %d to their image",
            self.ann_file, dropped, len(annotations), counts["non_finite"], counts["degenerate"],
            counts["outside"], counts["clipped"],
        )
        return per_image, counts

    def _check_files_exist(self) -> None:
        """Raise FileNotFoundError for the first image file that is missing (existence only)."""
        for image_id, file_name in zip(self.image_ids, self._file_names):
            if not os.path.exists(os.path.join(self.img_dir, file_name)):
                raise FileNotFoundError(
                    f"{self.ann_file}: image {image_id} '{file_name}' not found under {self.img_dir}"
                )

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: int | TrainSample) -> tuple[Tensor, dict[str, Any]]:
        """Decode image `key` (an index, or a TrainSample whose seed fixes the random transforms)."""
        index, seed = (key.index, key.seed) if isinstance(key, TrainSample) else (int(key), None)
        image = self.load_image(index)
        target = self.load_target(index)
        if self.transforms is not None:
            if seed is None:
                image, target = self.transforms(image, target)
            else:
                # Fork so the worker's own RNG stream is left as it was; CPU only (no CUDA here).
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(seed)
                    image, target = self.transforms(image, target)
        return image, target

    def load_image(self, index: int) -> Tensor:
        """uint8 (3, H, W) RGB pixels of item `index`; raises naming the file if it cannot be decoded."""
        path = os.path.join(self.img_dir, self._file_names[index])
        image_id = self.image_ids[index]
        try:
            with warnings.catch_warnings():
                # torchvision 0.29 deprecates its decoders in favour of torchcodec; they still work.
                warnings.simplefilter("ignore", DeprecationWarning)
                image = decode_image(read_file(path), mode=ImageReadMode.RGB)
        except (RuntimeError, OSError, ValueError) as err:
            raise RuntimeError(f"{self.ann_file}: image {image_id}: cannot decode {path}: {err}") from err
        if image.dtype != torch.uint8:  # 16-bit PNG
            image = F.to_dtype(image, torch.uint8, scale=True)
        if tuple(image.shape[-2:]) != self._json_sizes[index]:
            height, width = self._json_sizes[index]
            raise ValueError(
                f"{self.ann_file}: image {image_id}: {path} is {image.shape[-1]}x{image.shape[-2]} (WxH) but the "
                f"json says {width}x{height}; the boxes would not match the pixels"
            )
        return image

    def load_target(self, index: int) -> dict[str, Any]:
        """The target dict of item `index` (see the class docstring), original image coordinates."""
        start, end = self._box_offsets[index], self._box_offsets[index + 1]
        crowd_start, crowd_end = self._crowd_offsets[index], self._crowd_offsets[index + 1]
        return {
            "boxes": self._boxes[start:end].clone(),
            "labels": self._labels[start:end].clone(),
            "crowd_boxes": self._crowd_boxes[crowd_start:crowd_end].clone(),
            "image_id": self.image_ids[index],
            "orig_size": self._json_sizes[index],
        }


def _load_json(ann_file: str) -> dict:
    """Read a COCO json and check its top-level structure; errors name the file."""
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    try:
        with open(ann_file) as f:
            dataset = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{ann_file}: not valid JSON: {err}") from None
    if not isinstance(dataset, dict):
        raise ValueError(f"{ann_file}: expected a JSON object at the top level, got {type(dataset).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise ValueError(f"{ann_file}: needs a list '{key}' (COCO instances format)")
    for category in dataset["categories"]:
        if not isinstance(category, dict) or "id" not in category:
            raise ValueError(f"{ann_file}: category without an 'id': {category!r}")
    return dataset


def _check_images(images: list[dict], ann_file: str) -> dict[int, dict]:
    """Image entries by id, each checked for an id, a file name and a positive size."""
    by_id: dict[int, dict] = {}
    for image in images:
        image_id = image.get("id", "?") if isinstance(image, dict) else "?"
        for key in ("id", "file_name", "width", "height"):
            if not isinstance(image, dict) or key not in image:
                raise ValueError(f"{ann_file}: image {image_id} has no '{key}'")
        if not (image["width"] > 0 and image["height"] > 0):
            raise ValueError(f"{ann_file}: image {image_id} has size {image['width']}x{image['height']}")
        if image["id"] in by_id:
            raise ValueError(f"{ann_file}: image id {image['id']} appears twice")
        by_id[image["id"]] = image
    return by_id


def _pack(boxes_per_image: list[list], labels_per_image: list[list]) -> tuple[Tensor, Tensor, list[int]]:
    """Concatenate per-image lists into (sum N, 4) float32 boxes, (sum N,) int64 labels and offsets."""
    offsets = [0]
    for boxes in boxes_per_image:
        offsets.append(offsets[-1] + len(boxes))
    flat_boxes = [box for boxes in boxes_per_image for box in boxes]
    flat_labels = [label for labels in labels_per_image for label in labels]
    boxes = torch.tensor(flat_boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor(flat_labels, dtype=torch.int64)
    return boxes, labels, offsets
