"""COCO-format detection dataset: annotations checked once at start-up, images decoded on demand.

Everything that can be wrong in an annotation file (unknown or duplicate ids, fields that
pycocotools' evaluation needs, file names leaving the image folder, missing image files, NaN or
degenerate boxes) is found in the constructor, so a bad dataset fails before training starts with
an error naming the file, never hours later inside a DataLoader worker or the final evaluation.
Image *contents* are only decoded on demand; `check_image_files` decodes them all up front.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import torch
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from .image import UnreadableImageError, read_image

logger = logging.getLogger(__name__)

# (image, target) -> (image, target); see retinanet.data.transforms.
Transforms = Callable[[Tensor, dict[str, Any]], tuple[Tensor, dict[str, Any]]]

# What CocoDetection does when a training image cannot be used (data.on_bad_image).
ON_BAD_IMAGE = ("error", "skip")

# torchvision prefixes its decoder errors with the C++ source location:
# "decode_jpeg, /__w/vision/.../decode_jpeg.cpp:171, Image is incomplete or truncated".
_TORCHVISION_LOCATION = re.compile(r"^[\w()]+, \S+\.cpp:\d+, ")


class BadImageError(RuntimeError):
    """An image file that cannot be used: empty, not a decodable image (e.g. truncated), or not of
    the size its json entry says. The message names the annotation file, the image id and the path.

    Attributes:
        image_id: the COCO image id.
        path: the image file.
        reason: what is wrong, naming the path (the message without the annotation file and id).
    """

    def __init__(self, ann_file: str, image_id: int, path: str, reason: str) -> None:
        super().__init__(f"{ann_file}: image {image_id}: {reason}")
        self.image_id = image_id
        self.path = path
        self.reason = reason


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
        img_dir: folder that the images' "file_name" entries are relative to; a file_name that
            leads out of it ("../x.jpg", "/etc/passwd") is refused.
        filter_empty: drop images that have no (non-crowd) box left after sanitizing.
        transforms: applied to (image, target); with a TrainSample key they run under a torch RNG
            seeded from the key, so they are reproducible.
        on_bad_image: "error": an image that cannot be used raises BadImageError. "skip": item i
            is replaced by the first usable item after it (same aspect group first, in index
            order), a function of the files only, so a resumed run replays the same substitutes;
            each bad file is logged once. For training only: evaluation must see every image.

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
        coco: the pycocotools COCO object of the file as written (for COCOeval), except that
            annotations without "id", "area" or "iscrowd" get them (unique ids, the bbox's w*h, 0).
        image_ids: COCO ids of the kept images, item i is image_ids[i].
        category_ids: sorted COCO category ids; label k is category_ids[k].
        class_names: category names, index = label.
        category_id_to_label, label_to_category_id: the two directions of that mapping as dicts.
        aspect_ratios: width / height of each kept image (from the json).
        is_landscape: width >= height of each kept image; the sampler's two aspect groups.
        sanitize_counts: how many annotations were dropped or clipped, by reason.
        num_skipped: items replaced by another because their image was bad (on_bad_image="skip"),
            in this process (each DataLoader worker holds its own copy).
        bad_indices: items whose image is known to be bad.
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        img_dir: str | os.PathLike,
        filter_empty: bool = False,
        transforms: Transforms | None = None,
        on_bad_image: str = "error",
    ) -> None:
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {list(ON_BAD_IMAGE)}, got {on_bad_image!r}")
        self.ann_file = str(ann_file)
        self.img_dir = str(img_dir)
        self.transforms = transforms
        self.on_bad_image = on_bad_image
        self.num_skipped = 0
        self.bad_indices: set[int] = set()

        dataset = _load_json(self.ann_file)
        if not dataset["images"]:
            raise ValueError(
                f"{self.ann_file}: the dataset is empty (its 'images' list has no entry); point "
                "data.train.ann_file / data.val.ann_file at an annotation file that lists images"
            )
        images = _check_images(dataset["images"], self.ann_file)
        paths = _image_paths(images, self.img_dir, self.ann_file)
        _check_annotation_ids(dataset["annotations"], self.ann_file)
        categories = sorted(dataset["categories"], key=lambda c: c["id"])
        self.category_ids: list[int] = [c["id"] for c in categories]
        self.class_names: list[str] = [str(c.get("name", c["id"])) for c in categories]
        self.category_id_to_label = {cat_id: label for label, cat_id in enumerate(self.category_ids)}
        self.label_to_category_id = dict(enumerate(self.category_ids))
        if len(self.category_id_to_label) != len(self.category_ids):
            raise ValueError(f"{self.ann_file}: duplicate category ids in {self.category_ids}")

        boxes_per_image, self.sanitize_counts = self._sanitize(dataset["annotations"], images)
        _fill_area_and_iscrowd(dataset["annotations"], self.ann_file)
        image_ids = sorted(images)
        if filter_empty:
            image_ids = [i for i in image_ids if boxes_per_image[i][0]]
            self.sanitize_counts["empty_images_filtered"] = len(images) - len(image_ids)
            if not image_ids:
                raise ValueError(
                    f"{self.ann_file}: the dataset is empty: none of its {len(images)} images has a box left "
                    "after sanitizing, and data.filter_empty drops such images; check its annotations "
                    "(see the 'dropped' counts above) or set data.filter_empty=false"
                )
        self.image_ids: list[int] = image_ids
        self._file_names = [images[i]["file_name"] for i in image_ids]
        self._paths = [paths[i] for i in image_ids]
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
        for image_id, file_name, path in zip(self.image_ids, self._file_names, self._paths):
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"{self.ann_file}: image {image_id} '{file_name}' not found under {self.img_dir}"
                )

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: int | TrainSample) -> tuple[Tensor, dict[str, Any]]:
        """Decode image `key` (an index, or a TrainSample whose seed fixes the random transforms);
        under on_bad_image="skip" a bad image's item is replaced by its substitute (same seed)."""
        index, seed = (key.index, key.seed) if isinstance(key, TrainSample) else (int(key), None)
        index, image = self._load_usable_image(index)
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

    def _load_usable_image(self, index: int) -> tuple[int, Tensor]:
        """(index, pixels) of item `index`, or under on_bad_image="skip" of its substitute: the first
        item of `_substitutes(index)` whose image is usable. Bad ones are logged once and remembered."""
        if self.on_bad_image == "error":
            return index, self.load_image(index)
        for candidate in self._substitutes(index):
            if candidate in self.bad_indices:
                continue
            try:
                image = self.load_image(candidate)
            except BadImageError as err:
                self.mark_bad(candidate, err.reason)
                continue
            if candidate != index:
                self.num_skipped += 1
            return candidate, image
        raise RuntimeError(f"{self.ann_file}: none of the {len(self)} images can be decoded (see the warnings above)")

    def _substitutes(self, index: int) -> Iterator[int]:
        """`index`, then the other items in index order after it (wrapping around): first those of
        its aspect group, so that a grouped batch stays single-orientation, then the others."""
        num_items, group = len(self), self.is_landscape[index]
        for same_group in (True, False):
            for offset in range(num_items):
                candidate = (index + offset) % num_items
                if (self.is_landscape[candidate] == group) == same_group:
                    yield candidate

    def mark_bad(self, index: int, reason: str) -> None:
        """Remember that item `index`'s image is bad, so that "skip" passes over it without decoding
        it again; logs a warning naming the file, once per item."""
        if index not in self.bad_indices:
            self.bad_indices.add(index)
            logger.warning(
                "%s: image %d: %s; skipped (data.on_bad_image=skip): items drawing it get the next usable image",
                self.ann_file, self.image_ids[index], reason,
            )

    def load_image(self, index: int) -> Tensor:
        """uint8 (3, H, W) RGB pixels of item `index`, read by retinanet.data.image.read_image: in
        the displayed frame (EXIF orientation applied), the frame of the json's width, height and
        boxes, as annotation tools, pycocotools' viewers and detectron2 assume.

        Raises:
            BadImageError: the file is gone, empty, cannot be decoded (truncated, not an image), or
                its (displayed) size differs from the json's.
        """
        path = self._paths[index]
        image_id = self.image_ids[index]
        try:
            image = read_image(path)
        except (UnreadableImageError, FileNotFoundError) as err:  # the message names the file and says why
            raise BadImageError(self.ann_file, image_id, path, str(err)) from err
        height, width = self._json_sizes[index]
        if tuple(image.shape[-2:]) != (height, width):
            rotated = tuple(image.shape[-2:]) == (width, height)
            raise BadImageError(
                self.ann_file, image_id, path,
                f"{path} is {image.shape[-1]}x{image.shape[-2]} (WxH) but the json says {width}x{height}; "
                "the boxes would not match the pixels"
                + ("; width and height swapped: with an EXIF orientation tag, the json's sizes and boxes "
                   "must be in the rotated frame that viewers show" if rotated else ""),
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


def _image_paths(images: dict[int, dict], img_dir: str, ann_file: str) -> dict[int, str]:
    """The file of each image, by id: img_dir joined with its "file_name", normalised.

    A file_name must stay inside img_dir as text: "../val/x.jpg" or "/etc/passwd" would read
    another split's or the system's files, so they raise ValueError. img_dir itself is compared
    both as given and resolved (so an absolute file_name under a symlinked img_dir passes); a file
    inside img_dir that is a symlink to elsewhere is the user's own link and is accepted.
    """
    given_root = os.path.abspath(img_dir)
    roots = {given_root, os.path.realpath(img_dir)}
    paths = {}
    for image_id, image in images.items():
        file_name = image["file_name"]
        if not isinstance(file_name, str) or not file_name.strip():
            raise ValueError(f"{ann_file}: image {image_id}: file_name must be a non-empty string, got {file_name!r}")
        path = os.path.normpath(os.path.join(given_root, file_name))
        if not any(path != root and os.path.commonpath([root, path]) == root for root in roots):
            raise ValueError(
                f"{ann_file}: image {image_id}: file_name {file_name!r} leads outside img_dir {img_dir} "
                f"(to {path}); file names must be paths inside img_dir"
            )
        paths[image_id] = os.path.normpath(os.path.join(img_dir, file_name))  # the path checked above
    return paths


def _check_annotation_ids(annotations: list, ann_file: str) -> None:
    """Give annotations without an "id" unused ones (with a warning); refuse duplicate ids.

    pycocotools keys annotations by id: with duplicates, COCOeval matches detections against the
    wrong boxes and AP comes out silently lower; without an id, it fails with a bare KeyError.
    """
    seen: set = set()
    duplicates: list = []
    without_id = []
    for ann in annotations:
        if not isinstance(ann, dict):
            raise ValueError(f"{ann_file}: annotation entries must be objects, got {ann!r}")
        if "id" not in ann:
            without_id.append(ann)
        elif ann["id"] in seen:
            duplicates.append(ann["id"])
        else:
            seen.add(ann["id"])
    if duplicates:
        shown = ", ".join(repr(ann_id) for ann_id in list(dict.fromkeys(duplicates))[:10])
        raise ValueError(
            f"{ann_file}: {len(duplicates)} annotations reuse an id already taken (first: {shown}); every "
            "annotation needs its own 'id', else COCO evaluation matches detections to the wrong boxes"
        )
    if without_id:
        next_id = max((ann_id for ann_id in seen if isinstance(ann_id, int)), default=0) + 1
        for offset, ann in enumerate(without_id):
            ann["id"] = next_id + offset
        logger.warning(
            "%s: %d annotations had no 'id'; gave them ids %d..%d", ann_file, len(without_id), next_id,
            next_id + len(without_id) - 1,
        )


def _fill_area_and_iscrowd(annotations: list[dict], ann_file: str) -> None:
    """Give annotations without "area" the bbox's w * h (pixels^2) and those without "iscrowd" 0, as
    pycocotools' evaluation reads both (it would fail with a KeyError after training); one warning.
    Runs after `_sanitize`, so every bbox is 4 numbers."""
    num_area = num_iscrowd = 0
    for ann in annotations:
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
            num_area += 1
        if "iscrowd" not in ann:
            ann["iscrowd"] = 0
            num_iscrowd += 1
    if num_area or num_iscrowd:
        logger.warning(
            "%s: %d of %d annotations had no 'area' (set to the bbox's w*h) and %d no 'iscrowd' (set to 0)",
            ann_file, num_area, len(annotations), num_iscrowd,
        )


def find_bad_images(dataset: CocoDetection, num_threads: int | None = None) -> list[BadImageError]:
    """Decode every image of `dataset` once, on `num_threads` threads (default: one per CPU core;
    reading and decoding are C++ work, so threads overlap); the problems found, in item order."""

    def problem(index: int) -> BadImageError | None:
        try:
            dataset.load_image(index)
        except BadImageError as err:
            return err
        return None

    with ThreadPoolExecutor(num_threads or os.cpu_count() or 1) as pool:
        checked = tqdm(pool.map(problem, range(len(dataset))), total=len(dataset), desc="checking images", leave=False)
        return [err for err in checked if err is not None]


def describe_bad_images(dataset: CocoDetection, problems: list[BadImageError]) -> str:
    """One line per bad image (image id and reason), under a header naming the annotation file."""
    lines = [f"{dataset.ann_file}: {len(problems)} of {len(dataset)} images cannot be used:"]
    lines += [f"  image {err.image_id}: {err.reason}" for err in problems]
    return "\n".join(lines)


def check_image_files(dataset: CocoDetection, num_threads: int | None = None) -> None:
    """Decode every image of `dataset` once (see find_bad_images).

    Raises:
        ValueError: listing every bad image (id, file, reason: empty, cannot decode, size differing
            from the json), so they can all be fixed at once.
    """
    problems = find_bad_images(dataset, num_threads)
    if problems:
        raise ValueError(describe_bad_images(dataset, problems))


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
