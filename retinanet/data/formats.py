"""Pascal VOC and YOLO datasets read into a COCO instances dict, which CocoDetection then checks.

Both readers produce what a COCO json holds: "images" (id, file_name relative to the image folder,
width, height), "annotations" (id, image_id, category_id, bbox as absolute-pixel xywh, area,
iscrowd) and "categories" (id, name). Ids count from 1 in reading order; category k (0-based in the
class list) gets id k + 1. Everything else (missing image files, degenerate boxes, the evaluation
ground truth) is CocoDetection's, so a VOC or YOLO set trains, evaluates and infers like a COCO one.

Pascal VOC (data.<split>.format=voc): img_dir is the VOC root (VOCdevkit/VOC2007) holding
Annotations/<id>.xml, JPEGImages/<id>.jpg and ImageSets/Main/<split>.txt; ann_file is that split
file's path, or a bare split name ("trainval") for ImageSets/Main/<name>.txt under the root.

YOLO (data.<split>.format=yolo): img_dir is an images folder (datasets/x/images/train), whose
labels are the same relative paths with .txt under the folder where the last "images" component
becomes "labels" (datasets/x/labels/train), as Ultralytics lays them out; ann_file is a data.yaml
(its `names:`, a list or an {index: name} dict; `path`/`train`/`val` are not read) or a names
file with one class name per line.
"""

from __future__ import annotations

import logging
import math
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from typing import Any

import yaml
from PIL import Image, UnidentifiedImageError

from ..config import load_yaml

from .image import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

# data.<split>.format values: what the files at ann_file / img_dir are.
DATASET_FORMATS = ("coco", "voc", "yolo")

# The 20 Pascal VOC classes in the devkit's order (VOCcode/VOCinit.m), the order published
# per-class APs use; category id = position + 1.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# The EXIF orientation tag and its values that swap width and height (transposed, rotated 90/270).
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def read_dataset(
    dataset_format: str, ann_file: str | os.PathLike, img_dir: str | os.PathLike,
    class_names: Sequence[str] | None = None,
) -> tuple[dict, str]:
    """A VOC or YOLO dataset as a COCO dict, with the folder its file names are relative to.

    Args:
        dataset_format: "voc" or "yolo" (see the module docstring for ann_file and img_dir).
        class_names: VOC only: the classes in label order (default VOC_CLASSES).
    Returns:
        (the COCO dict, the image folder to pass to CocoDetection as img_dir).
    """
    if dataset_format == "voc":
        return read_voc(img_dir, ann_file, VOC_CLASSES if class_names is None else class_names), voc_image_dir(img_dir)
    if dataset_format == "yolo":
        if class_names is not None:
            raise ValueError("YOLO class names come from the data.yaml or names file (ann_file)")
        return read_yolo(img_dir, ann_file), os.fspath(img_dir)
    raise ValueError(f"unknown dataset format {dataset_format!r}; expected one of {[f for f in DATASET_FORMATS if f != 'coco']}")


def voc_image_dir(root: str | os.PathLike) -> str:
    """The folder a VOC root's images are in, which its COCO dict's file names are relative to."""
    return os.path.join(os.fspath(root), "JPEGImages")


def voc_split_file(root: str | os.PathLike, split: str | os.PathLike) -> str:
    """The split file: `split` itself, or ROOT/ImageSets/Main/<split>.txt for a bare name
    (no folder, no .txt suffix) such as "trainval"."""
    split = os.fspath(split)
    if os.sep not in split and "/" not in split and not split.endswith(".txt"):
        return os.path.join(os.fspath(root), "ImageSets", "Main", f"{split}.txt")
    return split


def read_voc(root: str | os.PathLike, split: str | os.PathLike, class_names: Sequence[str] = VOC_CLASSES) -> dict:
    """The images of a VOC split and their boxes as a COCO dict (file names relative to JPEGImages).

    Boxes: VOC's corners are 1-based inclusive pixel indices, so (xmin, ymin, xmax, ymax) covers
    the pixel edges xmin - 1 .. xmax: bbox = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]
    (detectron2's conversion; a box of the whole W x H image is [0, 0, W, H]). Objects marked
    difficult become iscrowd=1 regions: neither targets nor counted as misses by the evaluation,
    as VOC's own evaluation ignores them. The XML is parsed with xml.etree.ElementTree, which is
    fine for one's own dataset files but not hardened against malicious XML.

    Raises:
        FileNotFoundError: no split file, or no Annotations/<id>.xml for an id in it.
        ValueError: an XML file that does not parse, lacks a field, or names a class not in
            `class_names` (naming the file and the class).
    """
    root = os.fspath(root)
    split_file = voc_split_file(root, split)
    if not os.path.isfile(split_file):
        raise FileNotFoundError(f"VOC split file not found: {split_file} (data.*.ann_file: a split file or a split "
                                f"name under {os.path.join(root, 'ImageSets', 'Main')})")
    with open(split_file, encoding="utf-8") as file:
        # Lines are "<id>" (or "<id> <±1>" in the per-class split files): the first word is the id.
        file_ids = [line.split()[0] for line in file if line.strip()]
    category_of = {name: index + 1 for index, name in enumerate(class_names)}
    images, annotations = [], []
    for image_id, file_id in enumerate(file_ids, start=1):
        xml_path = os.path.join(root, "Annotations", f"{file_id}.xml")
        if not os.path.isfile(xml_path):
            raise FileNotFoundError(f"{split_file}: image '{file_id}': annotation file not found: {xml_path}")
        try:
            tree = ElementTree.parse(xml_path).getroot()
        except ElementTree.ParseError as err:
            raise ValueError(f"{xml_path}: not valid XML: {err}") from None
        file_name = f"{file_id}.jpg"
        width, height = _voc_size(tree, xml_path, os.path.join(voc_image_dir(root), file_name))
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for obj in tree.iter("object"):
            name = _voc_text(obj, "name", xml_path).strip()
            if name not in category_of:
                raise ValueError(f"{xml_path}: unknown class {name!r} (classes: {', '.join(class_names)})")
            xmin, ymin, xmax, ymax = (float(_voc_text(obj, f"bndbox/{key}", xml_path))
                                      for key in ("xmin", "ymin", "xmax", "ymax"))
            bbox = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]
            difficult = obj.findtext("difficult", "0").strip() == "1"
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category_of[name],
                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": int(difficult),
            })
    return _coco_dict(images, annotations, class_names)


def _voc_text(element: ElementTree.Element, path: str, xml_path: str) -> str:
    """The text of `element`'s child at `path`; ValueError naming the file when it is missing."""
    text = element.findtext(path)
    if text is None:
        raise ValueError(f"{xml_path}: an <{element.tag}> has no <{path}>")
    return text


def _voc_size(tree: ElementTree.Element, xml_path: str, image_path: str) -> tuple[int, int]:
    """(width, height) from <size>, or from the image header when the XML gives none or zeros
    (a few VOC2012 files do)."""
    try:
        width, height = int(tree.findtext("size/width", "0")), int(tree.findtext("size/height", "0"))
    except ValueError:
        raise ValueError(f"{xml_path}: <size> is not whole numbers") from None
    if width > 0 and height > 0:
        return width, height
    if not os.path.isfile(image_path):
        raise FileNotFoundError(f"{xml_path}: image not found: {image_path}")
    return image_size(image_path)


def read_yolo(img_dir: str | os.PathLike, names_file: str | os.PathLike) -> dict:
    """The images under `img_dir` (sorted, subfolders included, hidden files left out) and their
    YOLO labels as a COCO dict (file names relative to img_dir).

    A label line "class cx cy w h" holds the box centre and size as fractions of the image's width
    and height, in the displayed frame (EXIF orientation applied), as Ultralytics reads images and
    as retinanet.data.image.read_image decodes them; the image sizes are read the same way from
    the file headers. bbox = [(cx - w/2) * W, (cy - h/2) * H, w * W, h * H]. An image without a
    label file has no objects.

    Raises:
        FileNotFoundError: no img_dir or names file.
        ValueError: no "images" folder component in img_dir, a label line that is not 5 numbers, a
            class index outside the names (naming the file and line), an image that cannot be read.
    """
    img_dir = os.fspath(img_dir)
    class_names = read_yolo_names(names_file)
    if not os.path.isdir(img_dir):
        raise FileNotFoundError(f"YOLO image folder not found: {img_dir}")
    label_dir = yolo_label_dir(img_dir)
    images, annotations = [], []
    for image_id, file_name in enumerate(_image_files(img_dir), start=1):
        width, height = image_size(os.path.join(img_dir, file_name))
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        label_path = os.path.join(label_dir, os.path.splitext(file_name)[0] + ".txt")
        if not os.path.isfile(label_path):
            continue
        for class_index, (cx, cy, w, h) in _read_yolo_labels(label_path, len(class_names)):
            bbox = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": class_index + 1,
                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0,
            })
    return _coco_dict(images, annotations, class_names)


def yolo_label_dir(img_dir: str | os.PathLike) -> str:
    """img_dir with its last "images" component replaced by "labels" (Ultralytics' layout)."""
    parts = os.path.normpath(os.path.abspath(img_dir)).split(os.sep)
    if "images" not in parts:
        raise ValueError(f"YOLO image folder {img_dir} has no 'images' component: its labels are looked up where "
                         "the last 'images' becomes 'labels' (datasets/x/images/train -> datasets/x/labels/train)")
    last = len(parts) - 1 - parts[::-1].index("images")
    parts[last] = "labels"
    return os.sep.join(parts)


def read_yolo_names(path: str | os.PathLike) -> list[str]:
    """Class names in label order from a data.yaml (`names:` list or {index: name} dict, as
    Ultralytics writes it; .yaml or .yml) or from a names file (one name per line, trailing blank
    lines ignored). Either may start with a UTF-8 byte order mark (Windows Notepad).

    The YAML is read as YAML 1.2, as the config files are: `no`, `off`, `yes`, `on` are names, not
    the booleans YAML 1.1 makes of them. A number is a name (`names: [1, 2]` gives '1', '2').

    Raises:
        ValueError: naming the file: no names, a name that is not text or a number (null, true /
            false, a list), a blank name, a name listed twice, or an nc that disagrees.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"YOLO class names file not found: {path} (data.*.ann_file: a data.yaml or names file)")
    with open(path, encoding="utf-8-sig") as file:
        text = file.read()
    if not path.endswith((".yaml", ".yml")):
        lines = [line.strip() for line in text.rstrip().splitlines()]
        if not lines or not all(lines):
            raise ValueError(f"{path}: needs one class name per line, without blank lines between them")
        return _checked_names(lines, path)
    try:
        data = load_yaml(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):
        if any(type(key) is not int for key in names) or set(names) != set(range(len(names))):
            raise ValueError(f"{path}: 'names' keys must be the class indices 0..{len(names) - 1}, got {list(names)}")
        names = [names[index] for index in range(len(names))]
    if not isinstance(names, list) or not names:
        raise ValueError(f"{path}: needs a non-empty 'names:' list or {{index: name}} dict")
    if "nc" in data and data["nc"] != len(names):
        raise ValueError(f"{path}: nc is {data['nc']} but 'names' lists {len(names)} classes")
    for index, name in enumerate(names):
        if name is None or isinstance(name, bool):  # an empty item, ~, null; true, false
            raise ValueError(f"{path}: class {index}: YAML reads this name as {name!r}, not text; quote it")
        if not isinstance(name, (str, int, float)):
            raise ValueError(f"{path}: class {index}: the name must be text, got {name!r}")
    return _checked_names([str(name) for name in names], path)


def _checked_names(names: list[str], path: str) -> list[str]:
    """`names`, unless one is blank or listed twice (ValueError naming the file and the name): the
    class names become the dataset's category names, which must be unique."""
    index_of: dict[str, int] = {}
    for index, name in enumerate(names):
        if not name.strip():
            raise ValueError(f"{path}: class {index} has a blank name")
        if name in index_of:
            raise ValueError(f"{path}: the name {name!r} is listed twice (classes {index_of[name]} and {index})")
        index_of[name] = index
    return names


def _read_yolo_labels(label_path: str, num_classes: int) -> list[tuple[int, tuple[float, float, float, float]]]:
    """(class index, (cx, cy, w, h)) of each non-blank line of a YOLO label file."""
    labels = []
    with open(label_path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{label_path}, line {line_number}"
            try:
                values = [float(field) for field in fields]
            except ValueError:
                raise ValueError(f"{where}: not numbers: {line.strip()!r}") from None
            if len(values) != 5:
                raise ValueError(f"{where}: expected 'class cx cy w h' (5 numbers; segment polygons are not read), "
                                 f"got {len(values)}")
            if not values[0].is_integer() or not 0 <= values[0] < num_classes:
                raise ValueError(f"{where}: class {fields[0]} is not an index 0..{num_classes - 1} of the "
                                 f"{num_classes} class names")
            if not all(math.isfinite(value) for value in values[1:]):
                raise ValueError(f"{where}: non-finite box {line.strip()!r}")
            labels.append((int(values[0]), (values[1], values[2], values[3], values[4])))
    return labels


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of an image file in its displayed frame (EXIF orientation applied), read
    from the header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
                width, height = height, width
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read the size of {path}: {err}") from None
    return width, height


def _image_files(img_dir: str) -> list[str]:
    """Image files (IMAGE_SUFFIXES) under img_dir, relative to it, sorted; hidden ones left out."""
    found = []
    for folder, subfolders, files in os.walk(img_dir):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                found.append(os.path.relpath(os.path.join(folder, name), img_dir))
    return sorted(found)


def _coco_dict(images: list[dict], annotations: list[dict], class_names: Sequence[str]) -> dict[str, Any]:
    categories = [{"id": index + 1, "name": name} for index, name in enumerate(class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}
