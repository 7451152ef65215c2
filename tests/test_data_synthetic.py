"""The synthetic dataset: real COCO files, tight boxes, determinism, generate-once."""

import contextlib
import io
import json
import warnings

import pytest
import torch
from pycocotools.coco import COCO
from torchvision.io import decode_image

from retinanet.config import SyntheticConfig
from retinanet.data import synthetic
from retinanet.data.coco import CocoDetection
from retinanet.data.synthetic import CATEGORIES, ensure_synthetic, make_synthetic, render_image

IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return root, make_synthetic(root, num_train=48, num_val=8, image_size=IMAGE_SIZE, seed=0)


def load_json(path):
    with open(path) as f:
        return json.load(f)


def extremeness(image):
    """(H, W) max over channels of |value - 0.5| (0..0.5): ~0.35+ on shapes, < ~0.2 on backgrounds."""
    return (image.float() / 255 - 0.5).abs().amax(dim=0)


def test_files_load_with_pycocotools(generated):
    root, summary = generated
    assert summary["train"]["num_images"] == 48 and summary["val"]["num_images"] == 8
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(summary["train"]["ann_file"])
    assert sorted(coco.getCatIds()) == [1, 3, 5]
    assert [c["name"] for c in coco.loadCats([1, 3, 5])] == ["circle", "square", "triangle"]
    assert len(coco.getImgIds()) == 48
    assert len(coco.getAnnIds()) == summary["train"]["num_annotations"] > 48
    data = load_json(summary["train"]["ann_file"])
    assert set(data) == {"info", "images", "annotations", "categories"}
    for ann in data["annotations"]:
        assert set(ann) == {"id", "image_id", "category_id", "bbox", "area", "iscrowd"}
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
    dataset = CocoDetection(summary["val"]["ann_file"], summary["val"]["img_dir"])
    assert dataset.category_ids == [1, 3, 5] and len(dataset) == 8
    assert (root / "val" / "000007.jpg").is_file()


def test_image_sizes_object_counts_and_empty_images(generated):
    _, summary = generated
    data = load_json(summary["train"]["ann_file"])
    per_image = {image["id"]: 0 for image in data["images"]}
    for ann in data["annotations"]:
        per_image[ann["image_id"]] += 1
    assert max(per_image.values()) <= 5
    assert 1 <= sum(count == 0 for count in per_image.values()) <= 12  # ~8% of 48
    for image in data["images"]:
        assert max(image["width"], image["height"]) == IMAGE_SIZE
        assert min(image["width"], image["height"]) >= 0.75 * IMAGE_SIZE
    landscape = [image["width"] > image["height"] for image in data["images"]]
    assert 0 < sum(landscape) < len(landscape)
    assert {ann["category_id"] for ann in data["annotations"]} == {1, 3, 5}
    sides = [max(ann["bbox"][2:]) / IMAGE_SIZE for ann in data["annotations"]]
    assert min(sides) < 0.2 and max(sides) > 0.4


def test_boxes_stand_out_from_the_background_in_the_files(generated):
    """Inside each box the pixels are far from the background's grey range; in a 3 px ring around
    the box (outside any other box) they are not, so the box neither misses nor overshoots much."""
    _, summary = generated
    data = load_json(summary["train"]["ann_file"])
    img_dir = summary["train"]["img_dir"]
    checked = 0
    for image_info in data["images"][:16]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_image(f"{img_dir}/{image_info['file_name']}")
        ext = extremeness(image)
        height, width = ext.shape
        boxes = [[int(v) for v in a["bbox"]] for a in data["annotations"] if a["image_id"] == image_info["id"]]
        for k, (x, y, w, h) in enumerate(boxes):
            near_others = torch.zeros(height, width, dtype=torch.bool)
            for j, (ox, oy, ow, oh) in enumerate(boxes):
                if j != k:
                    near_others[max(oy - 2, 0) : oy + oh + 2, max(ox - 2, 0) : ox + ow + 2] = True
            ring = torch.zeros(height, width, dtype=torch.bool)
            ring[max(y - 3, 0) : y + h + 3, max(x - 3, 0) : x + w + 3] = True
            ring[y : y + h, x : x + w] = False
            ring &= ~near_others
            if ring.any():
                assert ext[y : y + h, x : x + w].mean() > ext[ring].mean() + 0.08, (image_info, (x, y, w, h))
                checked += 1
    assert checked >= 10


def test_boxes_are_pixel_tight_before_jpeg():
    """On the rendered pixels, each box's first/last row/column holds shape pixels (every channel
    far from the grey range) and the 1 px line around it, outside other boxes, holds none."""
    generator = torch.Generator().manual_seed(3)
    checked = 0
    for _ in range(12):
        pixels, objects = render_image(generator, IMAGE_SIZE)
        shape_pixel = (pixels.float() / 255 - 0.5).abs().amin(dim=0) > 0.25
        height, width = shape_pixel.shape
        boxes = [[int(v) for v in bbox] for _, bbox, _ in objects]
        for k, (x, y, w, h) in enumerate(boxes):
            x2, y2 = x + w, y + h
            assert shape_pixel[y:y2, x].any() and shape_pixel[y:y2, x2 - 1].any()
            assert shape_pixel[y, x:x2].any() and shape_pixel[y2 - 1, x:x2].any()
            ring = torch.zeros(height, width, dtype=torch.bool)
            ring[max(y - 1, 0) : y2 + 1, max(x - 1, 0) : x2 + 1] = True
            ring[y:y2, x:x2] = False
            for j, (ox, oy, ow, oh) in enumerate(boxes):
                if j != k:
                    ring[oy : oy + oh, ox : ox + ow] = False
            assert not shape_pixel[ring].any()
            checked += 1
    assert checked >= 15


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = make_synthetic(tmp_path / "a", 6, 2, 32, seed=5)
    b = make_synthetic(tmp_path / "b", 6, 2, 32, seed=5)
    c = make_synthetic(tmp_path / "c", 6, 2, 32, seed=6)
    for split in ("train", "val"):
        with open(a[split]["ann_file"], "rb") as fa, open(b[split]["ann_file"], "rb") as fb:
            assert fa.read() == fb.read()
    assert (tmp_path / "a/train/000003.jpg").read_bytes() == (tmp_path / "b/train/000003.jpg").read_bytes()
    assert load_json(a["train"]["ann_file"])["annotations"] != load_json(c["train"]["ann_file"])["annotations"]
    # Train and val come from different streams.
    assert (tmp_path / "a/train/000000.jpg").read_bytes() != (tmp_path / "a/val/000000.jpg").read_bytes()


def test_ensure_synthetic_generates_once(tmp_path, monkeypatch):
    cfg = SyntheticConfig(root=str(tmp_path / "syn"), num_train=4, num_val=2, image_size=32, seed=1)
    train, val = ensure_synthetic(cfg)
    assert train.ann_file == str(tmp_path / "syn/annotations/instances_train.json")
    assert train.img_dir == str(tmp_path / "syn/train") and val.img_dir == str(tmp_path / "syn/val")
    assert len(load_json(val.ann_file)["images"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]  # no temporary folder left

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although the dataset is present")

    monkeypatch.setattr(synthetic, "make_synthetic", fail)
    assert ensure_synthetic(cfg) == (train, val)

    cfg.num_train = 5
    with pytest.raises(ValueError, match=r"instances_train\.json was generated with .*'num_images': 4"):
        ensure_synthetic(cfg)


def test_ensure_synthetic_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "syn").mkdir()
    (tmp_path / "syn" / "notes.txt").write_text("mine")
    cfg = SyntheticConfig(root=str(tmp_path / "syn"), num_train=2, num_val=1, image_size=32)
    with pytest.raises(FileExistsError, match="syn exists but holds no complete synthetic dataset"):
        ensure_synthetic(cfg)
    assert (tmp_path / "syn" / "notes.txt").read_text() == "mine"


def test_interrupted_generation_is_not_mistaken_for_complete(tmp_path, monkeypatch):
    cfg = SyntheticConfig(root=str(tmp_path / "syn"), num_train=3, num_val=1, image_size=32)
    real_render = synthetic.render_image
    calls = []

    def crash_midway(generator, image_size):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_render(generator, image_size)

    monkeypatch.setattr(synthetic, "render_image", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(cfg)
    assert not (tmp_path / "syn").exists()
    monkeypatch.setattr(synthetic, "render_image", real_render)
    train, _ = ensure_synthetic(cfg)
    assert len(load_json(train.ann_file)["images"]) == 3


def test_category_ids_are_not_contiguous():
    assert [c["id"] for c in CATEGORIES] == [1, 3, 5]


def test_generated_dataset_folder_follows_the_umask(tmp_path):
    import os
    import stat

    from retinanet.config import SyntheticConfig
    from retinanet.data import ensure_synthetic

    previous = os.umask(0o022)
    try:
        ensure_synthetic(SyntheticConfig(root=str(tmp_path / "syn"), num_train=2, num_val=1, image_size=32))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "syn").stat().st_mode) == 0o755
