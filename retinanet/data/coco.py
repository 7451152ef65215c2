"""COCO-format detection dataset: annotations checked once at start-up, images decoded on demand.

Everything that can be wrong in an annotation file (unknown or duplicate ids, fields that
pycocotools' evaluation needs, file names leaving the image folder, missing image files, NaN or
degenerate boxes) is found in the constructor, so a bad dataset fails before training starts with
an error naming the file, never hours later inside a DataLoader worker or the final evaluation.
Image *contents* are only decoded on demand; `check_image_files` decodes them all up front.

Built for COCO's size (118k images, 860k boxes): the json is read once, without the segmentation
masks the detector never uses, and what the dataset keeps per image and per box lives in a few flat
arrays. It pickles to a few tens of MB, so a spawned DataLoader worker receives it quickly, and a
forked worker, touching no Python object per sample, does not copy the parent's memory page by page
(reference counts) as it reads samples. The pycocotools ground truth that evaluation needs is only
kept by an evaluation dataset and only built when first used (`coco`).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import operator
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from .image import UnreadableImageError, read_image

logger = logging.getLogger(__name__)

# (image, target) -> (image, target); see retinanet.data.transforms.
Transforms = Callable[[Tensor, dict[str, Any]], tuple[Tensor, dict[str, Any]]]

# What CocoDetection does when a training image cannot be used (data.on_bad_image).
ON_BAD_IMAGE = ("error", "skip")

# The annotation and image keys the evaluation ground truth keeps: what pycocotools' bbox COCOeval
# and loadRes read (annotations: also "ignore", which COCOeval honours when present).
GROUND_TRUTH_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox", "area", "iscrowd", "ignore")
GROUND_TRUTH_IMAGE_KEYS = ("id", "file_name", "width", "height")

# The value of an annotation's "segmentation" key as it is written in the file: polygons (a list of
# lists of numbers) or an RLE mask (a brace group of escape-free strings and other characters, no
# nested braces). Matched in the raw bytes so that the parser never builds the ~24 floats a box of
# the polygons; a value of another form does not match and is parsed (and dropped) as usual.
_MASK_VALUE = re.compile(rb'"segmentation"\s*:\s*(?:\[[-+0-9.eE,\s\[\]]*\]|\{(?:[^{}"]|"[^"\\]*")*\})')


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
        keep_ground_truth: keep the annotations for `coco`, the evaluation ground truth. A training
            set passes False: it never evaluates, and COCO train2017's annotations as Python dicts
            take hundreds of MB. Such a set must hold a box (not only crowd regions, not only
            annotations that sanitizing drops): ValueError otherwise, nothing to learn from.
        dataset: an in-memory COCO dict (retinanet.data.formats reads VOC and YOLO into one) used
            instead of reading ann_file, which then only names the source in messages; it goes
            through the same checks as a file's contents, and is completed in place (ids, area).

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
        coco: pycocotools COCO ground truth for COCOeval, built on first use from the annotations
            kept at start-up (keep_ground_truth): the file as written, less the segmentation masks
            and keys COCOeval does not read, with unique ids, the bbox's w*h as area and 0 as
            iscrowd given to annotations without them.
        image_ids: (N,) int64 numpy array, COCO ids of the kept images, item i is image_ids[i].
        category_ids: sorted COCO category ids; label k is category_ids[k].
        class_names: category names, index = label.
        category_id_to_label, label_to_category_id: the two directions of that mapping as dicts.
        aspect_ratios: (N,) float64 numpy array, width / height of each kept image (from the json).
        is_landscape: (N,) bool numpy array, width >= height; the sampler's two aspect groups.
        sanitize_counts: how many annotations were dropped or clipped, by reason.
        num_skipped: items replaced by another because their image was bad (on_bad_image="skip"),
            in this process (each DataLoader worker holds its own copy).
        bad_indices: items whose image is known to be bad.

    Pickling (a spawned DataLoader worker receives a pickled copy) leaves the ground truth out: a
    copy's `coco` raises. Everything else is a few flat arrays, ~25 MB for COCO train2017.
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        img_dir: str | os.PathLike,
        filter_empty: bool = False,
        transforms: Transforms | None = None,
        on_bad_image: str = "error",
        keep_ground_truth: bool = True,
        dataset: dict | None = None,
    ) -> None:
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {list(ON_BAD_IMAGE)}, got {on_bad_image!r}")
        start_time = time.perf_counter()
        self.ann_file = str(ann_file)
        self.img_dir = str(img_dir)
        self.transforms = transforms
        self.on_bad_image = on_bad_image
        self.num_skipped = 0
        self.bad_indices: set[int] = set()
        with _gc_paused():  # the parsed json is millions of containers without reference cycles
            self._read_annotations(filter_empty, keep_ground_truth, dataset)
        logger.info(
            "%s: %d images, %d boxes, %d crowd regions, %d categories (read in %.1f s)",
            self.ann_file, len(self.image_ids), len(self._labels), len(self._crowd_boxes), len(self.category_ids),
            time.perf_counter() - start_time,
        )

    def _read_annotations(self, filter_empty: bool, keep_ground_truth: bool, dataset: dict | None) -> None:
        """Read and check ann_file (or `dataset`); set every attribute but those of __init__'s arguments."""
        if dataset is None:
            dataset = _load_json(self.ann_file)
        else:
            _check_top_level(dataset, self.ann_file)
        if not dataset["images"]:
            raise ValueError(
                f"{self.ann_file}: the dataset is empty (its 'images' list has no entry); point "
                "data.train.ann_file / data.val.ann_file at an annotation file that lists images"
            )
        images = _check_images(dataset["images"], self.ann_file)
        _check_file_names(images, self.img_dir, self.ann_file)
        _check_annotation_ids(dataset["annotations"], self.ann_file)
        self._set_categories(dataset["categories"])

        # Every image, in id order: position p of these arrays is image all_ids[p].
        all_ids = sorted(images)
        all_sizes = np.array([(images[i]["height"], images[i]["width"]) for i in all_ids], dtype=np.int64)
        columns = _annotation_columns(
            dataset["annotations"], {image_id: p for p, image_id in enumerate(all_ids)}, self.category_id_to_label,
            self.category_ids, self.ann_file,
        )
        xyxy, usable, self.sanitize_counts = _sanitize_boxes(columns.xywh, all_sizes[columns.image_index])
        self._log_sanitized(len(columns.xywh))
        self._ground_truth: dict | None = None
        self._coco: COCO | None = None
        if keep_ground_truth:
            _fill_area_and_iscrowd(dataset["annotations"], self.ann_file)
            self._ground_truth = _ground_truth(dataset)
        del dataset  # for a training set, the bulk of the start-up memory

        is_box, is_crowd_box = usable & ~columns.crowd, usable & columns.crowd
        kept = np.arange(len(all_ids))
        if filter_empty:
            kept = np.flatnonzero(np.bincount(columns.image_index[is_box], minlength=len(all_ids)))
            self.sanitize_counts["empty_images_filtered"] = len(all_ids) - len(kept)
            if not len(kept):
                raise ValueError(
                    f"{self.ann_file}: the dataset is empty: none of its {len(images)} images has a box left "
                    "after sanitizing, and data.filter_empty drops such images; check its annotations "
                    "(see the 'dropped' counts above) or set data.filter_empty=false"
                )
        self.image_ids: np.ndarray = np.array(all_ids, dtype=np.int64)[kept]
        self._sizes = all_sizes[kept].astype(np.int32)  # (N, 2) (H, W) of the json
        self.is_landscape: np.ndarray = self._sizes[:, 1] >= self._sizes[:, 0]
        self._file_names = PackedStrings(images[image_id]["file_name"] for image_id in self.image_ids.tolist())
        del images
        self._check_files_exist()

        item_of = _items_of_images(kept, len(all_ids))
        self._boxes, self._labels, self._box_offsets = _pack_by_item(
            item_of[columns.image_index[is_box]], len(kept), xyxy[is_box], columns.labels[is_box]
        )
        self._crowd_boxes, _, self._crowd_offsets = _pack_by_item(
            item_of[columns.image_index[is_crowd_box]], len(kept), xyxy[is_crowd_box], None
        )
        if not keep_ground_truth and not len(self._labels):
            _refuse_box_free_training_set(self.ann_file, len(kept), len(columns.xywh), int(is_crowd_box.sum()))

    def _set_categories(self, categories: list[dict]) -> None:
        """category_ids (sorted), class_names and the label <-> category id dicts; duplicate ids raise."""
        categories = sorted(categories, key=lambda c: c["id"])  # ids and names checked by _check_categories
        self.category_ids: list[int] = [c["id"] for c in categories]
        self.class_names: list[str] = [c["name"] for c in categories]
        self.category_id_to_label = {cat_id: label for label, cat_id in enumerate(self.category_ids)}
        self.label_to_category_id = dict(enumerate(self.category_ids))
        if len(self.category_id_to_label) != len(self.category_ids):
            raise ValueError(f"{self.ann_file}: duplicate category ids in {self.category_ids}")

    def _log_sanitized(self, num_annotations: int) -> None:
        """One line on what sanitizing dropped and clipped (a warning when it dropped any)."""
        counts = self.sanitize_counts
        dropped = counts["non_finite"] + counts["degenerate"] + counts["outside"]
        log = logger.warning if dropped else logger.info
        log(
            "%s: dropped %d of %d annotations (%d non-finite, %d zero/negative size, %d outside the image), "
            "clipped %d to their image",
            self.ann_file, dropped, num_annotations, counts["non_finite"], counts["degenerate"],
            counts["outside"], counts["clipped"],
        )

    @property
    def coco(self) -> COCO:
        """The pycocotools ground truth (see the class docstring), indexed on first use."""
        if self._coco is None:
            if self._ground_truth is None:
                raise RuntimeError(
                    f"{self.ann_file}: this dataset holds no evaluation ground truth: it was built with "
                    "keep_ground_truth=False (a training set), or it is a pickled copy (a DataLoader worker's); "
                    "evaluate with a CocoDetection built with keep_ground_truth=True in this process"
                )
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                coco = COCO()
                coco.dataset = self._ground_truth
                coco.createIndex()
            self._coco = coco
        return self._coco

    def __getstate__(self) -> dict[str, Any]:
        """The pickled state: all but the evaluation ground truth, which no DataLoader worker needs."""
        state = self.__dict__.copy()
        state["_ground_truth"] = state["_coco"] = None
        return state

    @property
    def aspect_ratios(self) -> np.ndarray:
        """(N,) float64 width / height of each kept image (from the json), computed on each access."""
        return self._sizes[:, 1] / self._sizes[:, 0]

    def image_path(self, index: int) -> str:
        """The file of item `index`: img_dir joined with its json "file_name", normalised."""
        return os.path.normpath(os.path.join(self.img_dir, self._file_names[index]))

    def image_size(self, index: int) -> tuple[int, int]:
        """(H, W) of item `index` as the json says, pixels."""
        height, width = self._sizes[index].tolist()
        return height, width

    @property
    def _paths(self) -> Sequence[str]:
        """image_path of every item, computed when indexed (load_image reads it)."""
        return _IndexedView(len(self), self.image_path)

    @property
    def _json_sizes(self) -> Sequence[tuple[int, int]]:
        """image_size of every item, computed when indexed (load_image reads it)."""
        return _IndexedView(len(self), self.image_size)

    def _check_files_exist(self) -> None:
        """Raise FileNotFoundError for the first image file that is missing (existence only)."""
        for index in range(len(self)):
            if not os.path.exists(self.image_path(index)):
                raise FileNotFoundError(
                    f"{self.ann_file}: image {self.image_ids[index]} '{self._file_names[index]}' not found under "
                    f"{self.img_dir}"
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
        start, end = self._box_offsets[index : index + 2].tolist()
        crowd_start, crowd_end = self._crowd_offsets[index : index + 2].tolist()
        return {
            "boxes": self._boxes[start:end].clone(),
            "labels": self._labels[start:end].to(torch.int64),
            "crowd_boxes": self._crowd_boxes[crowd_start:crowd_end].clone(),
            "image_id": int(self.image_ids[index]),
            "orig_size": self.image_size(index),
        }


def _refuse_box_free_training_set(ann_file: str, num_images: int, num_annotations: int, num_crowd: int) -> None:
    """Raise ValueError: a training set without one box (crowd regions and annotations dropped by
    sanitizing are none) would train to the end on background alone."""
    if not num_annotations:
        held = "no annotation"
    else:
        held = (f"{num_annotations} annotations, none a box: {num_crowd} crowd regions (iscrowd=1) and "
                f"{num_annotations - num_crowd} dropped by sanitizing (see the 'dropped' line above)")
    raise ValueError(
        f"{ann_file}: no boxes to learn from: its {num_images} images hold {held}; a training set needs "
        "annotated boxes (is this the right annotation file for data.train?)"
    )


def _load_json(ann_file: str) -> dict:
    """Read a COCO json without its segmentation masks (see `_parse_without_masks`) and check its
    top-level structure; errors name the file."""
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    try:
        dataset = _parse_without_masks(ann_file)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{ann_file}: not valid JSON: {err}") from None
    _check_top_level(dataset, ann_file)
    return dataset


def _check_top_level(dataset: Any, ann_file: str) -> None:
    """Raise ValueError naming ann_file unless `dataset` is a dict with the lists "images",
    "annotations" and "categories" (see `_check_categories`)."""
    if not isinstance(dataset, dict):
        raise ValueError(f"{ann_file}: expected a JSON object at the top level, got {type(dataset).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise ValueError(f"{ann_file}: needs a list '{key}' (COCO instances format)")
    _check_categories(dataset["categories"], ann_file)


def _check_categories(categories: list, ann_file: str) -> None:
    """Raise ValueError naming ann_file and the category unless every category has an integer
    "id" and a non-empty string "name", and no two share a name.

    The names become the model's class names: a checkpoint's, `infer`'s labels, the keys of the
    per-class AP, and what `eval` maps a model's classes to a dataset's categories by; two
    categories of one name would be told apart by none of them.
    """
    id_of_name: dict[str, Any] = {}
    for category in categories:
        if not isinstance(category, dict) or "id" not in category:
            raise ValueError(f"{ann_file}: category without an 'id': {category!r}")
        if not _is_integer(category["id"]):
            raise ValueError(f"{ann_file}: category {category!r}: 'id' must be an integer, got {category['id']!r}")
        name = category.get("name")
        if not isinstance(name, str) or not name.strip():
            what = f"got {name!r}" if "name" in category else "it has none"
            raise ValueError(f"{ann_file}: category {category['id']}: 'name' must be a non-empty string, {what}")
        if name in id_of_name:
            raise ValueError(
                f"{ann_file}: categories {id_of_name[name]} and {category['id']} are both named {name!r}; category "
                "names must be unique: they are the model's class names, which evaluation and inference go by"
            )
        id_of_name[name] = category["id"]


def _is_integer(value: Any) -> bool:
    """A JSON integer: an int, not a bool (Python's True == 1) and not a float such as 1.0."""
    return type(value) is int


def _parse_without_masks(path: str) -> Any:
    """The json file `path`, parsed, with every "segmentation" value written as polygons or an RLE
    mask read as None (see _MASK_VALUE).

    The detector never reads the masks, and the polygons are most of a COCO json (~24 numbers per
    box): cutting them out of the text first, then parsing with the cyclic garbage collector
    paused, reads COCO train2017 several times faster and with half the peak memory of a plain
    json.load (docs/benchmarks.md, "COCO-scale data loading"). Should the cut text not parse, the
    text as written is parsed, so the cut never refuses a valid file.

    Raises:
        json.JSONDecodeError, UnicodeDecodeError: the file is not JSON.
    """
    with open(path, "rb") as f:
        text = _MASK_VALUE.sub(b'"segmentation": null', f.read())
    try:
        with _gc_paused():
            return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        del text
    with open(path, "rb") as f, _gc_paused():
        return json.loads(f.read())


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Run the block without the cyclic garbage collector. Parsing allocates millions of dicts and
    lists, each allocation burst triggering collections that traverse all of them again (40% of
    json.loads' time on COCO train2017), and every generation traverses them once more after it;
    the parsed json holds no reference cycles to collect, and is freed by reference counting."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _check_images(images: list[dict], ann_file: str) -> dict[int, dict]:
    """Image entries by id, each checked for an integer id, a file name and a positive size in
    whole pixels (640.0 passes as 640)."""
    by_id: dict[int, dict] = {}
    for image in images:
        image_id = image.get("id", "?") if isinstance(image, dict) else "?"
        for key in ("id", "file_name", "width", "height"):
            if not isinstance(image, dict) or key not in image:
                raise ValueError(f"{ann_file}: image {image_id} has no '{key}'")
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise ValueError(f"{ann_file}: image id {image_id!r} is not an integer")
        if not (_is_whole_number(image["width"]) and _is_whole_number(image["height"])
                and image["width"] > 0 and image["height"] > 0):
            raise ValueError(f"{ann_file}: image {image_id} has size {image['width']!r}x{image['height']!r}")
        if image["id"] in by_id:
            raise ValueError(f"{ann_file}: image id {image['id']} appears twice")
        by_id[image["id"]] = image
    return by_id


def _is_whole_number(value: Any) -> bool:
    """An int, or a float without a fractional part (not a bool, not NaN or infinite)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _check_file_names(images: dict[int, dict], img_dir: str, ann_file: str) -> None:
    """Check that every image's "file_name" is a non-empty string leading to a path inside img_dir.

    A file_name must stay inside img_dir as text: "../val/x.jpg" or "/etc/passwd" would read
    another split's or the system's files, so they raise ValueError. img_dir itself is compared
    both as given and resolved (so an absolute file_name under a symlinked img_dir passes); a file
    inside img_dir that is a symlink to elsewhere is the user's own link and is accepted.
    """
    given_root = os.path.abspath(img_dir)
    roots = {given_root, os.path.realpath(img_dir)}
    for image_id, image in images.items():
        file_name = image["file_name"]
        if not isinstance(file_name, str) or not file_name.strip():
            raise ValueError(f"{ann_file}: image {image_id}: file_name must be a non-empty string, got {file_name!r}")
        if _is_plain_relative(file_name):
            continue
        path = os.path.normpath(os.path.join(given_root, file_name))
        if not any(path != root and os.path.commonpath([root, path]) == root for root in roots):
            raise ValueError(
                f"{ann_file}: image {image_id}: file_name {file_name!r} leads outside img_dir {img_dir} "
                f"(to {path}); file names must be paths inside img_dir"
            )


def _is_plain_relative(file_name: str) -> bool:
    """A relative path without a drive that normalises to something below "." ("a.jpg",
    "sub/../b.jpg"; not ".", "..", "../x.jpg"): joined to any folder it stays inside it. The cheap
    test that spares the commonpath comparison (2 s for COCO's 118k names) to almost every name."""
    normalized = os.path.normpath(file_name)
    return (
        not os.path.isabs(normalized)
        and not os.path.splitdrive(normalized)[0]
        and normalized != os.curdir
        and normalized.split(os.sep, 1)[0] != os.pardir
    )


def _check_annotation_ids(annotations: list, ann_file: str) -> None:
    """Give annotations without an "id" unused ones (with a warning); refuse ids that are not
    integers (naming the first in file order by its place in the list) and duplicate ids.

    pycocotools keys annotations by id: with duplicates, COCOeval matches detections against the
    wrong boxes and AP comes out silently lower; without an id, it fails with a bare KeyError; a
    string id fails it after training, as it writes ids into a float array.
    """
    seen: set = set()
    duplicates: list = []
    without_id = []
    try:
        for ann in annotations:
            if not isinstance(ann, dict):
                raise ValueError(f"{ann_file}: annotation entries must be objects, got {ann!r}")
            if "id" not in ann:
                without_id.append(ann)
            elif ann["id"] in seen:
                duplicates.append(ann["id"])
            else:
                seen.add(ann["id"])
    except TypeError:  # an unhashable id (a list, an object): found and named below
        seen = {None}
    # The types of the distinct ids (True and 1.0 count as duplicates of 1), not every annotation's.
    id_types = set(map(type, seen))
    id_types.update(map(type, duplicates))
    if not id_types <= {int}:
        for index, ann in enumerate(annotations):
            if "id" in ann and not _is_integer(ann["id"]):
                raise ValueError(f"{ann_file}: annotations[{index}]: 'id' must be an integer, got {ann['id']!r}")
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
    Refuse, naming the first such annotation in file order, an area that is not a number and an
    iscrowd that is not 0 or 1: evaluation would fail on them after training (null, a string) or
    give a silently wrong AP (a NaN area falls in every area range). A negative area is left as
    written (COCOeval ignores such a box in every area range). Runs after `_annotation_columns`, so
    every bbox is 4 numbers. A training set skips this: only the evaluation reads area."""
    num_area = num_iscrowd = 0
    for ann in annotations:
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
            num_area += 1
        elif type(ann["area"]) not in (int, float) or ann["area"] != ann["area"]:  # not a number, or NaN
            raise ValueError(
                f"{ann_file}: annotation {ann.get('id', '?')}: 'area' must be a number (pixels^2), got {ann['area']!r}"
            )
        if "iscrowd" not in ann:
            ann["iscrowd"] = 0
            num_iscrowd += 1
        elif ann["iscrowd"] not in (0, 1):
            raise ValueError(_crowd_flag_error(ann, ann_file))
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


class _AnnotationColumns(NamedTuple):
    """The annotations of a file as arrays, row a = annotation a in file order."""

    image_index: np.ndarray  # (A,) int64, position of the annotation's image among the sorted image ids
    labels: np.ndarray  # (A,) int64, contiguous label of its category
    xywh: np.ndarray  # (A, 4) float64, its bbox as written: x, y, width, height, absolute pixels
    crowd: np.ndarray  # (A,) bool, iscrowd is set


def _annotation_columns(
    annotations: list[dict], image_index_of: dict, label_of: dict, category_ids: list, ann_file: str
) -> _AnnotationColumns:
    """Every annotation's image, label, bbox and crowd flag, checked (see `_check_annotation`).

    Args:
        image_index_of: image id -> position among the sorted image ids.
        label_of: category id -> contiguous label.
        category_ids: sorted category ids, for the error message.
    Raises:
        ValueError: naming the first bad annotation in file order.
    """
    count = len(annotations)
    try:
        image_ids = [ann["image_id"] for ann in annotations]
        annotation_category_ids = [ann["category_id"] for ann in annotations]
        crowd_flags = [ann.get("iscrowd", 0) for ann in annotations]
        # Dict lookups alone would take True and 1.0 for id 1; the set of types is C work, ~10 ns a value.
        if not (set(map(type, image_ids)) <= {int} and set(map(type, annotation_category_ids)) <= {int}
                and set(crowd_flags) <= {0, 1}):
            raise ValueError("an id that is not an integer, or an iscrowd that is not 0 or 1")
        image_index = np.fromiter(map(image_index_of.__getitem__, image_ids), np.int64, count)
        labels = np.fromiter(map(label_of.__getitem__, annotation_category_ids), np.int64, count)
        # No dtype: numpy then finds strings and nulls (a str or object array) where a float64 one
        # would parse "12" as 12.0 and read null as NaN.
        xywh = np.array([ann["bbox"] for ann in annotations]) if count else np.zeros((0, 4))
        if xywh.shape != (count, 4) or xywh.dtype.kind not in "biuf":
            raise ValueError("a bbox is not 4 numbers")
        crowd = np.array(crowd_flags, dtype=bool)
    except (KeyError, TypeError, ValueError):
        for ann in annotations:  # the first bad one raises, named
            _check_annotation(ann, image_index_of, label_of, category_ids, ann_file)
        raise
    return _AnnotationColumns(image_index, labels, xywh.astype(np.float64, copy=False), crowd)


def _check_annotation(ann: dict, image_index_of: dict, label_of: dict, category_ids: list, ann_file: str) -> None:
    """Raise ValueError naming the annotation if it lacks image_id, category_id or bbox, has ids that
    are not integers or name an unknown image or category, has a bbox that is not 4 numbers, or an
    iscrowd other than 0 or 1."""
    ann_id = ann.get("id", "?")
    for key in ("image_id", "category_id", "bbox"):
        if key not in ann:
            raise ValueError(f"{ann_file}: annotation {ann_id} has no '{key}'")
    for key in ("image_id", "category_id"):
        if not _is_integer(ann[key]):
            raise ValueError(f"{ann_file}: annotation {ann_id}: '{key}' must be an integer, got {ann[key]!r}")
    if ann["image_id"] not in image_index_of:
        raise ValueError(f"{ann_file}: annotation {ann_id} names unknown image_id {ann['image_id']!r}")
    if ann["category_id"] not in label_of:
        raise ValueError(
            f"{ann_file}: annotation {ann_id} names unknown category_id {ann['category_id']!r} (categories: {category_ids})"
        )
    bbox = ann["bbox"]
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise ValueError(f"{ann_file}: annotation {ann_id}: bbox must be [x, y, w, h], got {bbox!r}")
    if not all(isinstance(value, (int, float)) for value in bbox):
        raise ValueError(f"{ann_file}: annotation {ann_id}: bbox has non-numbers: {bbox!r}")
    if "iscrowd" in ann and not _is_crowd_flag(ann["iscrowd"]):
        raise ValueError(_crowd_flag_error(ann, ann_file))


def _is_crowd_flag(value: Any) -> bool:
    """0 or 1, also written false / true or 0.0 / 1.0, which pycocotools reads the same (no string,
    null or list equals 0 or 1)."""
    return value in (0, 1)


def _crowd_flag_error(ann: dict, ann_file: str) -> str:
    return f"{ann_file}: annotation {ann.get('id', '?')}: 'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}"


def _sanitize_boxes(xywh: np.ndarray, image_sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Drop unusable boxes and clip the rest to their image.

    Args:
        xywh: (A, 4) float64 boxes as written: x, y, width, height, absolute pixels.
        image_sizes: (A, 2) (H, W) of each box's image, pixels.
    Returns:
        xyxy: (A, 4) float64 boxes clipped to their image, absolute pixels (meaningless where not usable).
        usable: (A,) bool: finite, of positive width and height, and not wholly outside the image.
        counts: {"non_finite", "degenerate" (width or height <= 0), "outside", "clipped"} numbers of boxes.
    """
    x, y, width, height = xywh.T
    corners = np.stack([x, y, x + width, y + height], axis=1)
    limits = image_sizes[:, [1, 0, 1, 0]].astype(np.float64)
    finite = np.isfinite(xywh).all(axis=1)
    with np.errstate(invalid="ignore"):  # NaN and inf - inf in rows that are dropped as non-finite
        positive = (width > 0) & (height > 0)
        # min(max(v, 0), limit) with Python's tie rule (the first argument wins, also for -0.0 vs 0.0),
        # which np.maximum / np.minimum do not promise.
        xyxy = np.where(corners < 0.0, 0.0, corners)
        xyxy = np.where(limits < xyxy, limits, xyxy)
        inside = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        changed = (xyxy != corners).any(axis=1)
    usable = finite & positive & inside
    counts = {
        "non_finite": int((~finite).sum()),
        "degenerate": int((finite & ~positive).sum()),
        "outside": int((finite & positive & ~inside).sum()),
        "clipped": int((usable & changed).sum()),
    }
    return xyxy, usable, counts


def _items_of_images(kept: np.ndarray, num_images: int) -> np.ndarray:
    """(num_images,) int64: the item each image became, -1 for an image not kept.

    Args:
        kept: (N,) int64 positions of the kept images among all, ascending; item i is image kept[i].
    """
    item_of = np.full(num_images, -1, dtype=np.int64)
    item_of[kept] = np.arange(len(kept))
    return item_of


def _pack_by_item(
    item: np.ndarray, num_items: int, xyxy: np.ndarray, labels: np.ndarray | None
) -> tuple[Tensor, Tensor | None, np.ndarray]:
    """Boxes (and labels) of all items in flat arrays, grouped by item, file order within one.

    Args:
        item: (R,) int64 item of each row's image, -1 for rows of an image not kept (left out).
        xyxy: (R, 4) float64 boxes, absolute pixels.
        labels: (R,) int64 contiguous labels, or None.
    Returns:
        boxes: (B, 4) float32; labels: (B,) int32 (load_target widens it to int64: half the bytes
        of the largest array after the boxes), or None; offsets: (num_items + 1,) int64, item i's
        rows are [offsets[i], offsets[i + 1]).
    """
    rows = np.flatnonzero(item >= 0)
    order = rows[np.argsort(item[rows], kind="stable")]
    offsets = np.zeros(num_items + 1, dtype=np.int64)
    np.cumsum(np.bincount(item[rows], minlength=num_items), out=offsets[1:])
    boxes = torch.from_numpy(xyxy[order].astype(np.float32))
    return boxes, None if labels is None else torch.from_numpy(labels[order].astype(np.int32)), offsets


def _ground_truth(dataset: dict) -> dict:
    """What pycocotools' bbox evaluation reads of a parsed COCO json: the images and annotations
    with only GROUND_TRUTH_*_KEYS, and the categories."""
    return {
        "images": [{key: image[key] for key in GROUND_TRUTH_IMAGE_KEYS} for image in dataset["images"]],
        "annotations": [
            {key: ann[key] for key in GROUND_TRUTH_ANNOTATION_KEYS if key in ann} for ann in dataset["annotations"]
        ],
        "categories": dataset["categories"],
    }


class PackedStrings(Sequence[str]):
    """A read-only sequence of strings stored as one UTF-8 byte buffer and offsets (numpy arrays).

    118k file names as a list are 118k Python objects: pickled one by one into every spawned
    DataLoader worker, and, in a forked one, their reference counts copy the pages they sit on as
    they are read. Here they are two arrays, ~25 bytes per COCO file name.
    """

    def __init__(self, strings: Iterable[str]) -> None:
        # surrogatepass: a json "\ud800" escape decodes to a lone surrogate, which must round-trip.
        encoded = [string.encode("utf-8", "surrogatepass") for string in strings]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(data) for data in encoded], out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        position = _checked_index(index, len(self))
        start, end = self._offsets[position : position + 2].tolist()
        return self._buffer[start:end].tobytes().decode("utf-8", "surrogatepass")


_Item = TypeVar("_Item")


class _IndexedView(Sequence[_Item]):
    """A read-only sequence of `length` items, item i computed by `item(i)` when it is read."""

    def __init__(self, length: int, item: Callable[[int], _Item]) -> None:
        self._length = length
        self._item = item

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> _Item:  # type: ignore[override]
        return self._item(_checked_index(index, self._length))


def _checked_index(index: int, length: int) -> int:
    """`index` (negative counts from the end) as a position in 0..length-1; IndexError outside."""
    position = operator.index(index)
    if position < 0:
        position += length
    if not 0 <= position < length:
        raise IndexError(f"index {index} out of range for {length} items")
    return position
