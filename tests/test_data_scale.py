"""COCO at scale (issue 14): masks never parsed, flat per-image state, ground truth only for
evaluation and built on first use, and tools/benchmark.py --data-scale."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from retinanet.data.coco import GROUND_TRUTH_ANNOTATION_KEYS, CocoDetection, PackedStrings, _parse_without_masks
from retinanet.data.transforms import build_train_transforms
from retinanet.engine.evaluator import coco_metrics
from test_data_coco import CATS, write_coco

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import benchmark  # noqa: E402  (tools/ is not a package)


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory):
    """tools/benchmark.py's COCO-like files, 300 training images: COCO's keys, 12-point polygons,
    RLE crowd masks, sparse image and category ids."""
    folder = tmp_path_factory.mktemp("coco_like")
    benchmark.generate_coco_like(folder, num_train=300, seed=0)
    return folder


def expected_targets(ann_file):
    """Per image id, what load_target must give, derived from the json alone: boxes xyxy = (x, y,
    x + w, y + h) (the generator keeps boxes inside their image), labels = position of the category
    id among the sorted ids, crowd boxes apart, file order within an image."""
    dataset = json.loads(Path(ann_file).read_text())
    label_of = {cat_id: label for label, cat_id in enumerate(sorted(c["id"] for c in dataset["categories"]))}
    expected = {image["id"]: {"boxes": [], "labels": [], "crowd_boxes": [], "orig_size": (image["height"], image["width"])}
                for image in dataset["images"]}
    for ann in dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        target = expected[ann["image_id"]]
        if ann["iscrowd"]:
            target["crowd_boxes"].append([x, y, x + w, y + h])
        else:
            target["boxes"].append([x, y, x + w, y + h])
            target["labels"].append(label_of[ann["category_id"]])
    return expected


def test_samples_equal_the_values_written_in_the_json(coco_like):
    ann_file = coco_like / "instances_train.json"
    dataset = CocoDetection(ann_file, coco_like / "train", keep_ground_truth=False)
    expected = expected_targets(ann_file)
    assert dataset.image_ids.tolist() == sorted(expected)
    assert sum(len(t["crowd_boxes"]) for t in expected.values()) > 0  # the crowd path is exercised
    for index, image_id in enumerate(dataset.image_ids.tolist()):
        target, want = dataset.load_target(index), expected[image_id]
        assert target["image_id"] == image_id and type(target["image_id"]) is int
        assert target["orig_size"] == want["orig_size"] and all(type(v) is int for v in target["orig_size"])
        # Bit for bit: float64 from the json, rounded once to float32.
        assert torch.equal(target["boxes"], torch.tensor(want["boxes"], dtype=torch.float32).reshape(-1, 4))
        assert torch.equal(target["labels"], torch.tensor(want["labels"], dtype=torch.int64))
        assert target["labels"].dtype == torch.int64
        assert torch.equal(target["crowd_boxes"], torch.tensor(want["crowd_boxes"], dtype=torch.float32).reshape(-1, 4))
    image, _ = dataset[0]
    assert tuple(image.shape[1:]) == dataset.image_size(0)  # the JPEGs have the json's sizes


def test_training_state_is_flat_arrays_that_pickle_small(coco_like):
    """What a worker receives (pickled under spawn, shared under fork) holds no Python object per
    image or box: a few arrays, so its size is a few bytes per box and image."""
    dataset = CocoDetection(coco_like / "instances_train.json", coco_like / "train",
                            transforms=build_train_transforms(0.5), keep_ground_truth=False)
    num_boxes = len(dataset._labels) + len(dataset._crowd_boxes)
    for name, value in vars(dataset).items():
        if isinstance(value, (list, dict, set, tuple)):
            assert len(value) <= len(dataset.category_ids), f"{name} holds a Python container per item"
        else:
            assert isinstance(value, (np.ndarray, torch.Tensor, PackedStrings, str, int, type(None))) \
                or callable(value), f"{name}: {type(value).__name__}"
    pickled = pickle.dumps(dataset, protocol=pickle.HIGHEST_PROTOCOL)
    # boxes 16 + label 4 bytes per box; offsets, id, size, name (~25) per image; a little overhead.
    assert len(pickled) < 24 * num_boxes + 80 * len(dataset) + 20_000
    copy = pickle.loads(pickled)
    assert copy.image_ids.tolist() == dataset.image_ids.tolist()
    assert list(copy._file_names) == list(dataset._file_names)
    for index in (0, len(dataset) // 2, len(dataset) - 1):
        want, got = dataset.load_target(index), copy.load_target(index)
        assert all(torch.equal(want[key], got[key]) for key in ("boxes", "labels", "crowd_boxes"))
        assert (want["image_id"], want["orig_size"]) == (got["image_id"], got["orig_size"])
        assert copy.image_path(index) == dataset.image_path(index)
    with pytest.raises(RuntimeError, match=r"instances_train\.json: this dataset holds no evaluation ground truth"):
        dataset.coco


def test_ground_truth_is_built_on_first_use_without_masks(coco_like):
    dataset = CocoDetection(coco_like / "instances_val.json", coco_like / "val")
    assert dataset._coco is None  # start-up builds no pycocotools index
    coco = dataset.coco
    assert dataset.coco is coco  # built once
    written = json.loads((coco_like / "instances_val.json").read_text())
    assert len(coco.anns) == len(written["annotations"]) and len(coco.imgs) == len(written["images"])
    for ann in written["annotations"]:
        kept = coco.anns[ann["id"]]
        assert set(kept) <= set(GROUND_TRUTH_ANNOTATION_KEYS)  # no segmentation
        assert kept == {key: ann[key] for key in GROUND_TRUTH_ANNOTATION_KEYS if key in ann}
    assert set(coco.imgs[written["images"][0]["id"]]) == {"id", "file_name", "width", "height"}
    perfect = [{"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": ann["bbox"], "score": 1.0}
               for ann in written["annotations"] if not ann["iscrowd"]]
    metrics = coco_metrics(coco, perfect, dataset.image_ids.tolist(), dataset.class_names)
    assert metrics["AP"] == pytest.approx(1.0)
    copy = pickle.loads(pickle.dumps(dataset))  # a worker's copy carries no ground truth
    assert copy._ground_truth is None and copy._coco is None
    with pytest.raises(RuntimeError, match="a pickled copy"):
        copy.coco


def test_masks_are_cut_before_parsing_and_nothing_else_changes(tmp_path):
    # Polygons over several lines, an RLE mask with a count list, a compressed one whose string
    # holds braces and an escaped quote (not cut: parsed as written), "segmentation" inside a
    # string, a polygon holding a null (not cut), segmentation as the last key.
    text = (
        '{"images": [{"id": 1, "file_name": "say \\"segmentation\\": [1, 2]}.jpg", "width": 8, "height": 8}],\n'
        ' "annotations": [\n'
        '  {"segmentation" : [[1.5, 2,\n 3e1, -4.25E-1],\t[5, 6]], "id": 1, "bbox": [0, 0, 2, 2]},\n'
        '  {"id": 2, "segmentation": {"counts": [3, 4, 57], "size": [8, 8]}, "bbox": [0, 0, 3, 3]},\n'
        '  {"id": 3, "segmentation": {"counts": "a}b\\"{c", "size": [8, 8]}, "bbox": [0, 0, 4, 4]},\n'
        '  {"id": 4, "segmentation": [[1, null]], "bbox": [0, 0, 5, 5]},\n'
        '  {"id": 5, "bbox": [0, 0, 6, 6], "segmentation": [[1, 2, 3, 4, 5, 6]]}\n'
        ' ], "categories": [{"id": 1, "name": "segmentation"}]}'
    )
    path = tmp_path / "masks.json"
    path.write_text(text)
    parsed, written = _parse_without_masks(str(path)), json.loads(text)
    masks = [ann["segmentation"] for ann in parsed["annotations"]]
    assert masks == [None, None, {"counts": 'a}b"{c', "size": [8, 8]}, [[1, None]], None]
    for ann in parsed["annotations"] + written["annotations"]:
        ann.pop("segmentation")
    assert parsed == written  # file names, categories, ids and boxes as written


def test_image_ids_and_sizes_must_be_whole_numbers(tmp_path):
    ann_file, img_dir = write_coco(tmp_path, [(1, "a.png", 8, 8)], [], CATS)
    dataset = json.loads(ann_file.read_text())
    dataset["images"][0]["width"] = 8.0  # a float without fraction is a whole number of pixels
    ann_file.write_text(json.dumps(dataset))
    assert CocoDetection(ann_file, img_dir).image_size(0) == (8, 8)
    dataset["images"][0]["width"] = 8.5
    ann_file.write_text(json.dumps(dataset))
    with pytest.raises(ValueError, match=r"ann\.json: image 1 has size 8\.5x8"):
        CocoDetection(ann_file, img_dir)
    dataset["images"][0].update(width=8, id="1")
    ann_file.write_text(json.dumps(dataset))
    with pytest.raises(ValueError, match=r"ann\.json: image id '1' is not an integer"):
        CocoDetection(ann_file, img_dir)


def test_null_in_a_bbox_is_refused_as_before(tmp_path):
    # numpy would read null as NaN (a dropped box); like float(), the dataset refuses it.
    ann_file, img_dir = write_coco(tmp_path, [(1, "a.png", 8, 8)], [(1, 2, [0, 0, 2, 2]), (1, 2, [0, None, 2, 2])], CATS)
    with pytest.raises(ValueError, match=r"ann\.json: annotation 2: bbox has non-numbers: \[0, None, 2, 2\]"):
        CocoDetection(ann_file, img_dir)


def test_packed_strings():
    names = ["a.jpg", "", "sub/é.png", "x" * 300, "\ud800.jpg"]  # a lone surrogate from a json escape
    packed = PackedStrings(names)
    assert len(packed) == 5 and list(packed) == names and packed[-1] == names[-1]
    assert packed.index("sub/é.png") == 2
    with pytest.raises(IndexError):
        packed[5]


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").is_file(), reason="reads Linux /proc")
def test_benchmark_data_scale_runs_small(tmp_path):
    out = tmp_path / "data_scale.json"
    command = [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--data-scale", "--data-images", "200",
               "--data-batches", "3", "--data-workers", "2", "--data-dir", str(tmp_path / "data"), "--json", str(out)]
    printed = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout
    assert "targets (issue 14): train dataset start-up <= 10 s: ok" in printed
    results = json.loads(out.read_text())["results"]
    assert results["generated"]["train_images"] == 200 and results["generated"]["val_images"] == 8
    assert [step["step"] for step in results["steps"]] == ["train dataset", "val dataset", "val ground truth (val.coco)"]
    assert results["pickled_mib"]["train"] < 0.2
    assert len(results["workers"]) == 2
    assert all(worker["end"]["uss"] > 0 for worker in results["workers"])
    # A second run reuses the files of --data-dir.
    marker = tmp_path / "data" / benchmark.GENERATED_MARKER
    written = marker.stat().st_mtime_ns
    benchmark.ensure_coco_like(tmp_path / "data", 200, seed=0)
    assert marker.stat().st_mtime_ns == written


@pytest.mark.slow
def test_benchmark_e2e_trains_on_generated_jpegs_and_reports_images_per_second(tmp_path):
    out = tmp_path / "e2e.json"
    command = [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--e2e", "--data-images", "24",
               "--data-dir", str(tmp_path / "data"), "--e2e-iters", "20", "--e2e-size", "96", "128", "--depth", "18",
               "--batch", "2", "--data-workers", "0", "--threads", "2", "--json", str(out)]
    printed = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True).stdout
    assert "images/s" in printed
    result = json.loads(out.read_text())["results"]
    assert result["timed_iterations"] == 10  # the second window of 10; the first is warm-up
    assert result["images_per_second"] == pytest.approx(2 / result["seconds_per_iter"])
