"""CocoDetection: category mapping, crowd routing, sanitizing, start-up errors, decoding."""

import json
import logging
import math
import warnings

import pytest
import torch
from PIL import Image
from torchvision.io import encode_jpeg, encode_png

from retinanet.data.coco import BadImageError, CocoDetection, TrainSample
from retinanet.data.transforms import build_train_transforms


def write_image(path, height, width, channels=3, value=100):
    """A tiny image file: PNG (1 or 3 channels) or JPEG by suffix; RGBA through PIL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = torch.full((channels, height, width), value, dtype=torch.uint8)
    if channels == 4:
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(path)  # (H, W, 4) uint8 -> RGBA
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        data = encode_jpeg(pixels, quality=95) if path.suffix == ".jpg" else encode_png(pixels)
    path.write_bytes(data.numpy().tobytes())


def write_coco(tmp_path, images, annotations, categories, write_files=True, name="ann.json"):
    """Write a COCO json (images as (id, file_name, width, height)) and tiny images; return paths."""
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    entries = [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in images]
    if write_files:
        for _, file_name, width, height in images:
            write_image(img_dir / file_name, height, width)
    anns = []
    for ann_id, (image_id, category_id, bbox, *crowd) in enumerate(annotations, start=1):
        anns.append({"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
                     "area": 1.0, "iscrowd": crowd[0] if crowd else 0})
    cats = [{"id": cat_id, "name": name_} for cat_id, name_ in categories]
    ann_file = tmp_path / name
    ann_file.write_text(json.dumps({"images": entries, "annotations": anns, "categories": cats}))
    return ann_file, img_dir


CATS = [(90, "zebra"), (2, "bicycle"), (7, "train")]  # sparse and unsorted on purpose


def test_category_mapping_round_trip(tmp_path):
    ann_file, img_dir = write_coco(
        tmp_path,
        [(5, "a.png", 20, 10)],
        [(5, 90, [1, 1, 4, 4]), (5, 2, [2, 2, 3, 3]), (5, 7, [0, 0, 5, 5])],
        CATS,
    )
    ds = CocoDetection(ann_file, img_dir)
    assert ds.category_ids == [2, 7, 90]
    assert ds.class_names == ["bicycle", "train", "zebra"]
    assert ds.category_id_to_label == {2: 0, 7: 1, 90: 2}
    _, target = ds[0]
    assert target["labels"].tolist() == [2, 0, 1]
    assert target["labels"].dtype == torch.int64
    back = [ds.label_to_category_id[label] for label in target["labels"].tolist()]
    assert back == [90, 2, 7]
    assert torch.tensor(ds.category_ids)[target["labels"]].tolist() == [90, 2, 7]
    # COCO xywh -> xyxy, absolute pixels.
    assert target["boxes"].tolist() == [[1, 1, 5, 5], [2, 2, 5, 5], [0, 0, 5, 5]]
    assert target["boxes"].dtype == torch.float32
    assert target["image_id"] == 5 and target["orig_size"] == (10, 20)


def test_crowd_boxes_go_to_crowd_boxes_not_targets(tmp_path):
    ann_file, img_dir = write_coco(
        tmp_path,
        [(1, "a.png", 16, 16)],
        [(1, 2, [1, 2, 3, 4], 0), (1, 7, [0, 0, 10, 8], 1)],
        CATS,
    )
    _, target = CocoDetection(ann_file, img_dir)[0]
    assert target["boxes"].tolist() == [[1, 2, 4, 6]]
    assert target["labels"].tolist() == [0]
    assert target["crowd_boxes"].tolist() == [[0, 0, 10, 8]]
    assert target["crowd_boxes"].dtype == torch.float32


def test_empty_images_kept_unless_filtered(tmp_path):
    ann_file, img_dir = write_coco(
        tmp_path,
        [(1, "a.png", 8, 8), (2, "b.png", 8, 8), (3, "c.png", 8, 8)],
        [(1, 2, [1, 1, 3, 3]), (3, 2, [0, 0, 8, 8], 1)],  # image 3 holds only a crowd region
        CATS,
    )
    kept = CocoDetection(ann_file, img_dir)
    assert kept.image_ids.tolist() == [1, 2, 3]
    image, target = kept[1]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["crowd_boxes"].shape == (0, 4)
    assert image.shape == (3, 8, 8)
    filtered = CocoDetection(ann_file, img_dir, filter_empty=True)
    assert filtered.image_ids.tolist() == [1]
    assert filtered.sanitize_counts["empty_images_filtered"] == 2
    assert filtered[0][1]["image_id"] == 1


def test_sanitize_drops_and_clips_with_counts(tmp_path, caplog):
    ann_file, img_dir = write_coco(
        tmp_path,
        [(1, "a.png", 20, 10)],  # W = 20, H = 10
        [
            (1, 2, [1, 1, 4, 4]),  # kept as is
            (1, 2, [1, float("nan"), 4, 4]),  # non-finite
            (1, 2, [1, 1, float("inf"), 4]),  # non-finite
            (1, 2, [1, 1, 0, 4]),  # zero width
            (1, 2, [1, 1, 4, -2]),  # negative height
            (1, 7, [-3, 6, 10, 10]),  # partly outside: clipped to [0, 6, 7, 10]
            (1, 7, [25, 2, 5, 5]),  # fully outside (right of the image)
            (1, 7, [18, 2, 2, 3], 1),  # crowd, inside
            (1, 7, [15, -5, 10, 7], 1),  # crowd, clipped to [15, 0, 20, 2]
        ],
        CATS,
    )
    with caplog.at_level(logging.INFO, logger="retinanet.data.coco"):
        ds = CocoDetection(ann_file, img_dir)
    assert ds.sanitize_counts == {"non_finite": 2, "degenerate": 2, "outside": 1, "clipped": 2}
    _, target = ds[0]
    assert target["boxes"].tolist() == [[1, 1, 5, 5], [0, 6, 7, 10]]
    assert target["labels"].tolist() == [0, 1]
    assert target["crowd_boxes"].tolist() == [[18, 2, 20, 5], [15, 0, 20, 2]]
    summary = [r for r in caplog.records if "dropped 5 of 9" in r.getMessage()]
    assert len(summary) == 1 and summary[0].levelno == logging.WARNING
    # The evaluator's COCO object keeps the file as written.
    assert len(ds.coco.getAnnIds(imgIds=[1])) == 9
    assert math.isnan(ds.coco.anns[2]["bbox"][1])


def test_missing_image_file_names_ann_file_id_file_and_folder(tmp_path):
    ann_file, img_dir = write_coco(tmp_path, [(1, "a.png", 8, 8), (42, "foo.jpg", 8, 8)], [], CATS)
    (img_dir / "foo.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"ann\.json: image 42 'foo\.jpg' not found under .*images"):
        CocoDetection(ann_file, img_dir)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(tmp_path / "nope.json", tmp_path)


def test_unknown_image_id(tmp_path):
    ann_file, img_dir = write_coco(tmp_path, [(1, "a.png", 8, 8)], [(1, 2, [0, 0, 2, 2]), (77, 2, [0, 0, 2, 2])], CATS)
    with pytest.raises(ValueError, match=r"ann\.json: annotation 2 names unknown image_id 77"):
        CocoDetection(ann_file, img_dir)


def test_unknown_category_id(tmp_path):
    ann_file, img_dir = write_coco(tmp_path, [(1, "a.png", 8, 8)], [(1, 2, [0, 0, 2, 2]), (1, 3, [0, 0, 2, 2])], CATS)
    with pytest.raises(ValueError, match=r"ann\.json: annotation 2 names unknown category_id 3"):
        CocoDetection(ann_file, img_dir)


def test_malformed_json(tmp_path):
    ann_file = tmp_path / "broken.json"
    ann_file.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        CocoDetection(ann_file, tmp_path)
    ann_file.write_text('{"images": []}')
    with pytest.raises(ValueError, match=r"broken\.json: needs a list 'annotations'"):
        CocoDetection(ann_file, tmp_path)


def test_undecodable_image_names_the_file(tmp_path):
    ann_file, img_dir = write_coco(tmp_path, [(3, "bad.jpg", 8, 8)], [], CATS)
    (img_dir / "bad.jpg").write_bytes(b"not an image at all")
    ds = CocoDetection(ann_file, img_dir)  # start-up only checks existence
    with pytest.raises(BadImageError, match=r"image 3: cannot decode .*bad\.jpg: Unsupported image file"):
        ds[0]


def test_size_mismatch_between_json_and_file(tmp_path):
    ann_file, img_dir = write_coco(tmp_path, [(3, "a.png", 8, 6)], [], CATS, write_files=False)
    write_image(img_dir / "a.png", 8, 8)
    with pytest.raises(BadImageError, match=r"image 3: .*a\.png is 8x8 \(WxH\) but the json says 8x6"):
        CocoDetection(ann_file, img_dir)[0]


@pytest.mark.parametrize("channels", [1, 4])
def test_grayscale_and_rgba_decode_to_rgb(tmp_path, channels):
    ann_file, img_dir = write_coco(tmp_path, [(1, "x.png", 7, 5)], [], CATS, write_files=False)
    write_image(img_dir / "x.png", 5, 7, channels=channels, value=123)
    image, target = CocoDetection(ann_file, img_dir)[0]
    assert image.shape == (3, 5, 7) and image.dtype == torch.uint8
    assert (image == 123).all()
    assert target["orig_size"] == (5, 7)


def test_jpeg_and_attributes(tmp_path):
    ann_file, img_dir = write_coco(
        tmp_path, [(9, "b.jpg", 12, 8), (4, "a.jpg", 8, 12), (6, "s.jpg", 8, 8)], [(4, 7, [0, 0, 2, 2])], CATS
    )
    ds = CocoDetection(ann_file, img_dir)
    assert len(ds) == 3
    assert ds.image_ids.tolist() == [4, 6, 9]  # sorted by id
    assert ds.is_landscape.tolist() == [False, True, True]  # square counts as landscape
    assert ds.aspect_ratios.tolist() == [8 / 12, 1.0, 12 / 8]
    assert ds.coco.getImgIds() == [9, 4, 6]
    assert ds[0][0].shape == (3, 12, 8)


def test_train_sample_seed_makes_transforms_reproducible(tmp_path):
    ann_file, img_dir = write_coco(tmp_path, [(1, "a.png", 16, 8)], [(1, 2, [1, 1, 4, 4])], CATS)
    ds = CocoDetection(ann_file, img_dir, transforms=build_train_transforms(0.5))
    first_boxes = {}
    for seed in range(16):
        boxes = ds[TrainSample(0, 0, seed)][1]["boxes"].tolist()
        assert ds[TrainSample(0, 3, seed)][1]["boxes"].tolist() == boxes  # same seed, same flip
        first_boxes[seed] = boxes
    assert {str(b) for b in first_boxes.values()} == {"[[1.0, 1.0, 5.0, 5.0]]", "[[11.0, 1.0, 15.0, 5.0]]"}
    # The caller's RNG stream is left untouched.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    ds[TrainSample(0, 0, 123)]
    assert torch.equal(torch.rand(3), expected)
