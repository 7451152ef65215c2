"""Pascal VOC and YOLO datasets read into COCO form: boxes to the pixel, difficult objects as crowd
regions, named errors, training and evaluation on each format, and `retinanet convert-dataset`."""

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.io import write_jpeg, write_png

from retinanet.cli import main
from retinanet.config import ConfigError, DatasetConfig, load_config
from retinanet.data import VOC_CLASSES, CocoDetection, open_dataset
from retinanet.engine.trainer import train

from conftest import train_overrides


def _write_image(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    (write_png if path.suffix == ".png" else write_jpeg)(pixels, str(path))


def _voc_object(name: str, xmin: int, ymin: int, xmax: int, ymax: int, difficult: int = 0) -> str:
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin>"
            f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")


def _write_voc_xml(root: Path, file_id: str, width: int, height: int, objects: list[str]) -> None:
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / f"{file_id}.xml").write_text(
        f"<annotation><filename>{file_id}.jpg</filename><size><width>{width}</width><height>{height}</height>"
        f"<depth>3</depth></size>{''.join(objects)}</annotation>"
    )


@pytest.fixture
def voc_root(tmp_path):
    """Three images: 000001 (64x48 WxH) with a whole-image dog and a difficult cat, 000002 (48x64)
    with a person, 000003 (64x64) without objects; split "train" lists all three."""
    root = tmp_path / "VOC2007"
    for file_id, width, height, objects in [
        ("000001", 64, 48, [_voc_object("dog", 1, 1, 64, 48), _voc_object("cat", 11, 21, 30, 40, difficult=1)]),
        ("000002", 48, 64, [_voc_object("person", 5, 6, 20, 30)]),
        ("000003", 64, 64, []),
    ]:
        _write_image(root / "JPEGImages" / f"{file_id}.jpg", height, width)
        _write_voc_xml(root, file_id, width, height, objects)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("000001\n000002\n000003\n")
    return root


@pytest.fixture
def yolo_root(tmp_path):
    """images/train: a.jpg (64x48 WxH, two boxes), b.png (32x64, one box), c.jpg (no label file);
    data.yaml names {0: cat, 1: dog}."""
    root = tmp_path / "yolo"
    _write_image(root / "images" / "train" / "a.jpg", 48, 64)
    _write_image(root / "images" / "train" / "b.png", 64, 32)
    _write_image(root / "images" / "train" / "c.jpg", 32, 32)
    labels = root / "labels" / "train"
    labels.mkdir(parents=True)
    (labels / "a.txt").write_text("0 0.5 0.5 0.25 0.5\n\n1 0.25 0.75 0.5 0.5\n")
    (labels / "b.txt").write_text("1 0.5 0.25 1.0 0.5\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nnames:\n  0: cat\n  1: dog\n")
    return root


def _voc(root: Path, split: str = "train") -> CocoDetection:
    return open_dataset(DatasetConfig(ann_file=split, img_dir=str(root), format="voc"))


def _yolo(root: Path, names: str = "data.yaml") -> CocoDetection:
    return open_dataset(DatasetConfig(ann_file=str(root / names), img_dir=str(root / "images" / "train"), format="yolo"))


def _targets(dataset: CocoDetection) -> list[dict]:
    return [dataset.load_target(index) for index in range(len(dataset))]


def test_voc_boxes_to_the_pixel_and_difficult_objects_become_crowd_regions(voc_root):
    dataset = _voc(voc_root)
    assert dataset.class_names == list(VOC_CLASSES)
    assert len(dataset) == 3
    first, second, third = _targets(dataset)
    # 1-based inclusive corners: (1, 1, 64, 48) is the whole 64x48 image, (5, 6, 20, 30) covers
    # the pixel edges 4..20 x 5..30.
    assert first["boxes"].tolist() == [[0.0, 0.0, 64.0, 48.0]]
    assert first["labels"].tolist() == [VOC_CLASSES.index("dog")]
    assert first["crowd_boxes"].tolist() == [[10.0, 20.0, 30.0, 40.0]]
    assert second["boxes"].tolist() == [[4.0, 5.0, 20.0, 30.0]]
    assert second["labels"].tolist() == [VOC_CLASSES.index("person")]
    assert third["boxes"].shape == (0, 4)
    assert dataset[1][0].shape == (3, 64, 48)
    # The evaluation ground truth is built from the dict: the difficult cat is a crowd region.
    crowd = [ann["iscrowd"] for ann in dataset.coco.dataset["annotations"]]
    assert crowd == [0, 1, 0]
    # A split file's path reads the same as its name.
    by_path = _voc(voc_root, str(voc_root / "ImageSets" / "Main" / "train.txt"))
    assert [t["boxes"].tolist() for t in _targets(by_path)] == [t["boxes"].tolist() for t in (first, second, third)]


def test_voc_errors_name_the_file(voc_root):
    _write_voc_xml(voc_root, "000003", 64, 64, [_voc_object("unicorn", 1, 1, 10, 10)])
    with pytest.raises(ValueError, match=r"000003\.xml: unknown class 'unicorn'"):
        _voc(voc_root)
    _write_voc_xml(voc_root, "000003", 64, 64, [])
    (voc_root / "JPEGImages" / "000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"image 2 '000002\.jpg' not found under .*JPEGImages"):
        _voc(voc_root)
    (voc_root / "ImageSets" / "Main" / "val.txt").write_text("000009\n")
    with pytest.raises(FileNotFoundError, match=r"val\.txt: image '000009': annotation file not found"):
        _voc(voc_root, "val")
    with pytest.raises(FileNotFoundError, match=r"VOC split file not found: .*test\.txt"):
        _voc(voc_root, "test")


def test_yolo_boxes_to_the_pixel_and_unlabelled_images(yolo_root):
    dataset = _yolo(yolo_root)
    assert dataset.class_names == ["cat", "dog"]
    assert [dataset.image_path(i).rsplit("/", 1)[-1] for i in range(3)] == ["a.jpg", "b.png", "c.jpg"]
    a, b, c = _targets(dataset)
    # a is 64x48: centre (32, 24), size 16x24 -> 24..40 x 12..36; centre (16, 36), 32x24 -> 0..32 x 24..48.
    assert a["boxes"].tolist() == [[24.0, 12.0, 40.0, 36.0], [0.0, 24.0, 32.0, 48.0]]
    assert a["labels"].tolist() == [0, 1]
    # b is 32x64: centre (16, 16), size 32x32.
    assert b["boxes"].tolist() == [[0.0, 0.0, 32.0, 32.0]]
    assert c["boxes"].shape == (0, 4) and c["crowd_boxes"].shape == (0, 4)
    assert dataset[1][0].shape == (3, 64, 32)
    # A names file reads as the data.yaml.
    (yolo_root / "classes.names").write_text("cat\ndog\n\n")
    assert [t["boxes"].tolist() for t in _targets(_yolo(yolo_root, "classes.names"))] == [
        t["boxes"].tolist() for t in (a, b, c)
    ]


def test_yolo_errors_name_the_file_and_line(yolo_root):
    (yolo_root / "labels" / "train" / "b.txt").write_text("1 0.5 0.5 0.2 0.2\n2 0.5 0.25 1.0 0.5\n")
    with pytest.raises(ValueError, match=r"b\.txt, line 2: class 2 is not an index 0\.\.1"):
        _yolo(yolo_root)
    (yolo_root / "labels" / "train" / "b.txt").write_text("1 0.5 0.5 0.2\n")
    with pytest.raises(ValueError, match=r"b\.txt, line 1: expected 'class cx cy w h'"):
        _yolo(yolo_root)
    with pytest.raises(FileNotFoundError, match="YOLO class names file not found"):
        _yolo(yolo_root, "missing.yaml")


def test_yolo_size_is_read_in_the_displayed_frame_of_an_exif_rotated_photo(yolo_root):
    """Stored 64x48 and tagged "rotate 90" (orientation 6): shown 48x64, the frame read_image
    decodes and YOLO labels refer to; the box is the left half of the shown image."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 48), (90, 120, 150)).save(yolo_root / "images" / "train" / "c.jpg", exif=exif)
    (yolo_root / "labels" / "train" / "c.txt").write_text("0 0.25 0.5 0.5 1.0\n")
    dataset = _yolo(yolo_root)
    assert dataset.image_size(2) == (64, 48)
    assert dataset.load_target(2)["boxes"].tolist() == [[0.0, 0.0, 24.0, 64.0]]
    assert dataset[2][0].shape == (3, 64, 48)  # decodes without a size mismatch


def test_format_is_checked_by_the_config():
    with pytest.raises(ConfigError, match="data.val.format"):
        load_config(None, ["data.val.format=kitti"])


@pytest.mark.parametrize("dataset_format", ["voc", "yolo"])
def test_each_format_trains_and_evaluates(dataset_format, voc_root, yolo_root, tmp_path):
    if dataset_format == "voc":
        paths, num_classes = {"ann_file": "train", "img_dir": voc_root}, len(VOC_CLASSES)
    else:
        paths, num_classes = {"ann_file": yolo_root / "data.yaml", "img_dir": yolo_root / "images" / "train"}, 2
    overrides = [o for o in train_overrides(tmp_path, tmp_path / "out", max_iter=2) if not o.startswith("data.")]
    overrides += [f"model.num_classes={num_classes}", "data.num_workers=0"] + [
        f"data.{split}.{key}={value}" for split in ("train", "val") for key, value in paths.items()
    ] + [f"data.{split}.format={dataset_format}" for split in ("train", "val")]
    metrics = train(load_config(None, overrides))
    assert "AP" in metrics


def test_convert_dataset_writes_a_json_read_to_the_same_samples(voc_root, yolo_root, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="retinanet")
    voc_json, yolo_json = tmp_path / "voc.json", tmp_path / "yolo.json"
    assert main(["convert-dataset", "--from", "voc", str(voc_root), str(voc_json), "--split", "train"]) == 0
    assert f"img_dir={voc_root / 'JPEGImages'}" in caplog.text
    assert main(["convert-dataset", "--from", "yolo", str(yolo_root / "images" / "train"), str(yolo_json),
                 "--names", str(yolo_root / "data.yaml")]) == 0
    for converted, direct in [
        (CocoDetection(voc_json, voc_root / "JPEGImages"), _voc(voc_root)),
        (CocoDetection(yolo_json, yolo_root / "images" / "train"), _yolo(yolo_root)),
    ]:
        assert converted.class_names == direct.class_names
        for got, want in zip(_targets(converted), _targets(direct), strict=True):
            assert {key: str(value) for key, value in got.items()} == {key: str(value) for key, value in want.items()}
    assert main(["convert-dataset", "--from", "yolo", str(yolo_root / "images" / "train"), str(yolo_json)]) == 2
