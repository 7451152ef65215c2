"""COCO evaluation: equality with pycocotools run by hand, the perfect / empty corner cases, the
category id mapping, the gather across processes and the eval command."""

import contextlib
import io
import json
import logging
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torchvision.io import encode_png

from conftest import tiny_overrides
from retinanet import build_model, load_config
from retinanet.data import CocoDetection, build_val_loader
from retinanet.checkpoint import make_checkpoint, save_atomic
from retinanet.cli import eval_command
from retinanet.engine.evaluator import STAT_NAMES, evaluate

# Sparse category ids on purpose: label k must come back as CATEGORIES[k][0].
CATEGORIES = [(1, "cat"), (3, "dog"), (5, "bird")]

# (file name, width, height, [(category id, [x, y, w, h]), ...]); small (< 32^2), medium and large
# (> 96^2) boxes so that every area range has ground truth.
IMAGES = [
    ("a.png", 128, 128, [(1, [10, 10, 100, 100]), (3, [5, 90, 20, 20])]),
    ("b.png", 96, 64, [(5, [30, 10, 40, 40]), (1, [2, 2, 12, 10])]),
    ("c.png", 64, 96, [(3, [10, 20, 40, 60]), (5, [40, 70, 15, 15]), (5, [5, 5, 30, 30])]),
    ("d.png", 80, 80, []),  # no annotation: must not disturb anything
]


def marker(index: int) -> int:
    """Pixel value of image `index`: the fake model recognises images by it."""
    return 40 * (index + 1)


def write_dataset(tmp_path, images=IMAGES, categories=CATEGORIES):
    img_dir = tmp_path / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    entries, annotations = [], []
    for index, (file_name, width, height, boxes) in enumerate(images):
        image_id = 100 + index  # ids unrelated to positions
        pixels = torch.full((3, height, width), marker(index), dtype=torch.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            (img_dir / file_name).write_bytes(encode_png(pixels).numpy().tobytes())
        entries.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for category_id, bbox in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
    ann_file = tmp_path / "instances.json"
    cats = [{"id": cat_id, "name": name} for cat_id, name in categories]
    ann_file.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": cats}))
    return ann_file, img_dir


class FakeModel(nn.Module):
    """Returns fixed detections per image, looked up by the image's marker pixel value."""

    def __init__(self, detections_by_index: list[dict[str, torch.Tensor]]):
        super().__init__()
        self.detections = {marker(i): det for i, det in enumerate(detections_by_index)}

    def forward(self, images):
        assert not self.training
        return [{k: v.clone() for k, v in self.detections[int(image[0, 0, 0])].items()} for image in images]


def xyxy(bbox):
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def ground_truth_detections(dataset: CocoDetection, images=IMAGES) -> list[dict[str, torch.Tensor]]:
    detections = []
    for _, _, _, boxes in images:
        detections.append({
            "boxes": torch.tensor([xyxy(b) for _, b in boxes], dtype=torch.float32).reshape(-1, 4),
            "scores": torch.linspace(0.9, 0.5, len(boxes)),
            "labels": torch.tensor([dataset.category_ids.index(c) for c, _ in boxes], dtype=torch.int64),
        })
    return detections


def noisy_detections(dataset: CocoDetection) -> list[dict[str, torch.Tensor]]:
    """Jittered true boxes, some with the wrong class, plus random false positives."""
    g = torch.Generator().manual_seed(0)
    detections = []
    for det, (_, width, height, _) in zip(ground_truth_detections(dataset), IMAGES):
        boxes = det["boxes"] + torch.randn(det["boxes"].shape, generator=g) * 1.5
        labels = det["labels"].clone()
        if len(labels):
            labels[-1] = (labels[-1] + 1) % 3
        corner = torch.rand(5, 2, generator=g) * torch.tensor([width / 2, height / 2])
        size = 5 + torch.rand(5, 2, generator=g) * torch.tensor([width / 2, height / 2])
        false_positives = torch.cat([corner, corner + size], 1)
        detections.append({
            "boxes": torch.cat([boxes, false_positives]),
            "scores": torch.rand(len(boxes) + 5, generator=g),
            "labels": torch.cat([labels, torch.randint(0, 3, (5,), generator=g)]),
        })
    return detections


def run_evaluate(tmp_path, detections_of, images=IMAGES, output=True):
    ann_file, img_dir = write_dataset(tmp_path, images)
    dataset = CocoDetection(ann_file, img_dir)
    model = FakeModel(detections_of(dataset)).train()
    loader = build_val_loader(dataset, batch_size=3, num_workers=0)
    metrics = evaluate(model, loader, dataset, "cpu", output_dir=tmp_path / "out" if output else None)
    assert model.training, "evaluate must restore the model's mode"
    return metrics, dataset, ann_file


def test_metrics_equal_pycocotools_on_the_written_results(tmp_path):
    metrics, dataset, ann_file = run_evaluate(tmp_path, noisy_detections)
    results = json.loads((tmp_path / "out" / "coco_results.json").read_text())
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        coco_eval = COCOeval(gt, gt.loadRes(str(tmp_path / "out" / "coco_results.json")), "bbox")
        coco_eval.params.imgIds = sorted(dataset.image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    assert all(value >= 0 for value in coco_eval.stats)  # every area range has ground truth
    assert [metrics[name] for name in STAT_NAMES] == pytest.approx(list(coco_eval.stats), abs=1e-12)
    assert 0.0 < metrics["AP"] < 1.0
    assert len(results) == sum(len(b) for *_, b in IMAGES) + 5 * len(IMAGES)
    assert {r["category_id"] for r in results} == {1, 3, 5}
    assert {r["image_id"] for r in results} == {100, 101, 102, 103}
    assert set(metrics["per_class_AP"]) == {"cat", "dog", "bird"}


def test_perfect_detections_give_ap_one_with_sparse_category_ids(tmp_path):
    metrics, _, _ = run_evaluate(tmp_path, ground_truth_detections)
    for name in STAT_NAMES:
        if name not in ("AR1",):  # image a has 2 boxes: one detection per image cannot recall both
            assert metrics[name] == pytest.approx(1.0), name
    assert metrics["per_class_AP"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0), "bird": pytest.approx(1.0)}
    results = json.loads((tmp_path / "out" / "coco_results.json").read_text())
    first = min((r for r in results if r["image_id"] == 100), key=lambda r: -r["score"])
    assert first["category_id"] == 1 and first["bbox"] == pytest.approx([10, 10, 100, 100])  # xywh


def test_zero_detections_give_zero_and_a_warning(tmp_path, caplog):
    def nothing(dataset):
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
                for _ in IMAGES]

    with caplog.at_level(logging.WARNING):
        metrics, _, _ = run_evaluate(tmp_path, nothing)
    assert all(metrics[name] == 0.0 for name in STAT_NAMES)
    assert set(metrics["per_class_AP"].values()) == {0.0}
    assert "no detections" in caplog.text
    assert json.loads((tmp_path / "out" / "coco_results.json").read_text()) == []


def test_ground_truth_without_annotations_gives_none_not_minus_one(tmp_path, caplog):
    images = [(f, w, h, []) for f, w, h, _ in IMAGES]

    def some_boxes(dataset):
        return [{"boxes": torch.tensor([[1.0, 1.0, 20.0, 20.0]]), "scores": torch.tensor([0.9]),
                 "labels": torch.tensor([1])} for _ in images]

    with caplog.at_level(logging.WARNING):
        metrics, _, _ = run_evaluate(tmp_path, some_boxes, images)
    assert all(metrics[name] is None for name in STAT_NAMES)
    assert "no annotation" in caplog.text


def test_undefined_area_range_and_class_are_none_not_nan(tmp_path, caplog):
    """No large box and no 'bird' in the ground truth: pycocotools says -1 there."""
    images = [("a.png", 64, 64, [(1, [10, 10, 30, 30]), (3, [2, 2, 10, 10])])]
    with caplog.at_level(logging.WARNING):
        metrics, _, _ = run_evaluate(tmp_path, lambda ds: ground_truth_detections(ds, images), images)
    assert metrics["APl"] is None and metrics["ARl"] is None
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["per_class_AP"]["bird"] is None and metrics["per_class_AP"]["cat"] == pytest.approx(1.0)
    assert "APl" in caplog.text and "bird" in caplog.text


def _distributed_worker(rank, world_size, port, tmp_path, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        dataset = CocoDetection(tmp_path / "instances.json", tmp_path / "images")
        model = FakeModel(noisy_detections(dataset))
        loader = build_val_loader(dataset, batch_size=1, num_workers=0, rank=rank, world_size=world_size)
        queue.put((rank, evaluate(model, loader, dataset, "cpu", output_dir=tmp_path / "ddp" if rank == 0 else None)))
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_single_process_numbers(tmp_path):
    single, _, _ = run_evaluate(tmp_path, noisy_detections, output=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_distributed_worker, args=(2, port, tmp_path, queue), nprocs=2, start_method="spawn")
    by_rank = dict(queue.get() for _ in range(2))
    assert by_rank[0] == single and by_rank[1] == single  # every image counted once, ranks agree
    results = json.loads((tmp_path / "ddp" / "coco_results.json").read_text())
    assert sorted({r["image_id"] for r in results}) == [100, 101, 102, 103]


def test_eval_command_on_a_checkpoint(tmp_path):
    ann_file, img_dir = write_dataset(tmp_path)
    cfg = load_config(None, tiny_overrides(num_classes=3, size=64))
    torch.manual_seed(0)
    model = build_model(cfg, ["cat", "dog", "bird"])
    save_atomic(make_checkpoint(model.state_dict(), cfg, ["cat", "dog", "bird"]), tmp_path / "model.pth")
    overrides = [f"data.val.ann_file={ann_file}", f"data.val.img_dir={img_dir}", "data.num_workers=0",
                 "solver.ims_per_batch=2", "model.inference.score_thresh=0.0"]
    metrics = eval_command(None, str(tmp_path / "model.pth"), overrides, str(tmp_path / "eval"))
    assert set(STAT_NAMES) <= set(metrics) and all(0.0 <= metrics[name] <= 1.0 for name in STAT_NAMES)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == metrics
    results = json.loads((tmp_path / "eval" / "coco_results.json").read_text())
    assert len(results) == 100 * len(IMAGES)  # score_thresh 0: every image keeps detections_per_image
    assert {r["category_id"] for r in results} <= {1, 3, 5}
