"""COCO box evaluation: run the model over a dataset, gather the detections of every process, score
them with pycocotools.

Metrics keep pycocotools' scale: AP and AR are fractions in 0..1 (0.364 means 36.4 AP), never
percentages. A metric that pycocotools cannot define (-1: no ground truth in that category or area
range, e.g. APl of a set without large objects) is reported as None (null in metrics.json, "n/a" in
the logged table) with a warning: a 0.0 would read as a model that finds nothing. A defined metric
is always a finite float; no detection at all on annotated images is a real 0.0.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from tqdm import tqdm

from . import distributed as dist_utils

logger = logging.getLogger(__name__)

# The 12 numbers of COCOeval.stats, in its order (iouType="bbox", maxDets 1/10/100).
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

RESULTS_FILE = "coco_results.json"
METRICS_FILE = "metrics.json"


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel and torch.compile.

    DDP's forward broadcasts buffers, a collective call per batch, while ranks may run a different
    number of evaluation batches; a compiled model would recompile for every new image size.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


def detections_to_coco(
    detections: dict[str, torch.Tensor], image_id: int, category_ids: list[int | None]
) -> list[dict[str, Any]]:
    """One image's detections as COCO result entries.

    Args:
        detections: {"boxes": (D, 4) xyxy pixels of the original image, "scores": (D,), "labels": (D,)
            contiguous labels 0..K-1}.
        image_id: the COCO image id.
        category_ids: label k is COCO category category_ids[k] (None: no category, the detection is
            dropped; see `label_to_category_ids`); labels beyond it (classifier outputs
            without a category in this dataset) are dropped.
    Returns:
        [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...].
    """
    boxes = detections["boxes"].detach().to("cpu", torch.float32)
    boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
    results = []
    for box, score, label in zip(boxes.tolist(), detections["scores"].tolist(), detections["labels"].tolist()):
        if label < len(category_ids) and category_ids[label] is not None:
            results.append({"image_id": image_id, "category_id": category_ids[label], "bbox": box, "score": score})
    return results


def label_to_category_ids(
    model_class_names: list[str], dataset_class_names: list[str], dataset_category_ids: list[int]
) -> list[int | None]:
    """The dataset category id of each model label (None: the label has no category there).

    By name when the model names every dataset category exactly once and the dataset's names are
    unique (CocoDetection refuses duplicates; a name of two categories would go to one of them): a
    converted torchvision COCO model has 91 outputs ('__background__', 'N/A' and the 80 classes at
    their COCO ids) and must score on COCO's 80 sorted categories. Otherwise by position (label k ->
    the k-th category), which is what a model trained on this dataset has.
    """
    by_position = [
        dataset_category_ids[label] if label < len(dataset_category_ids) else None
        for label in range(len(model_class_names))
    ]
    if model_class_names[: len(dataset_class_names)] == dataset_class_names:
        return by_position
    if len(set(dataset_class_names)) == len(dataset_class_names) and all(
        model_class_names.count(name) == 1 for name in dataset_class_names
    ):
        category_by_name = dict(zip(dataset_class_names, dataset_category_ids))
        logger.info("the model's labels are mapped to the dataset's categories by class name")
        return [category_by_name.get(name) for name in model_class_names]
    logger.warning(
        "the model's class names %s differ from the dataset's %s; labels are mapped by position",
        model_class_names, dataset_class_names,
    )
    return by_position


# no_grad rather than inference_mode: what the model caches here (anchors per feature size) is
# reused by later training steps, where inference tensors have restrictions (no in-place, no saving
# for backward).
@torch.no_grad()
def _predict(
    model: nn.Module, data_loader: Iterable, category_ids: list[int], device: torch.device, show_progress: bool
) -> tuple[dict[int, list[dict]], float]:
    """This process's share: {image_id: [COCO result entries]} and the number of seconds it took."""
    results: dict[int, list[dict]] = {}
    start = time.perf_counter()
    # A bar only on a terminal: redirected to a file it would be carriage returns.
    for images, targets in tqdm(data_loader, desc="eval", disable=not (show_progress and sys.stderr.isatty()),
                                leave=False):
        images = [image.to(device, non_blocking=True) for image in images]
        outputs = model(images)
        for detections, target in zip(outputs, targets):
            image_id = int(target["image_id"])
            results.setdefault(image_id, detections_to_coco(detections, image_id, category_ids))
    return results, time.perf_counter() - start


def _gather(results: dict[int, list[dict]]) -> dict[int, list[dict]]:
    """All processes' results on every process; an image seen by several ranks is counted once."""
    if not dist_utils.is_distributed():
        return results
    per_rank: list[dict[int, list[dict]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, results)
    merged: dict[int, list[dict]] = {}
    for rank_results in per_rank:
        for image_id, entries in rank_results.items():
            merged.setdefault(image_id, entries)
    return merged


def evaluate(
    model: nn.Module,
    data_loader: Iterable,
    dataset,
    device: torch.device | str,
    output_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """COCO bbox metrics of `model` on `dataset`, over every process's share of it.

    Args:
        model: a RetinaNet (or DDP-wrapped one) in the torchvision calling convention; it is run in
            eval mode and put back in its previous mode afterwards.
        data_loader: yields (images, targets) batches, images (3, H, W) at file resolution and targets
            with "image_id"; under torch.distributed each process iterates its own share (see
            retinanet.data.build_val_loader).
        dataset: the CocoDetection the loader reads; provides `coco` (the ground truth) and
            `category_ids` (label -> COCO category id) and `class_names`.
        device: where the images go.
        output_dir: when given, rank 0 writes coco_results.json (the detections, COCO results
            format) and metrics.json there.
    Returns:
        On every process: {"AP", "AP50", ..., "ARl": float in 0..1, or None where pycocotools cannot
        define it, "per_class_AP": {class name: AP in 0..1 or None}}. The ranks agree: rank 0 computes the numbers and broadcasts them.
    """
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    is_main = dist_utils.is_main_process()
    try:
        # A model without class names is taken to be in the dataset's label order.
        model_class_names = list(getattr(model, "class_names", dataset.class_names))
        category_ids = label_to_category_ids(model_class_names, list(dataset.class_names), list(dataset.category_ids))
        local_results, seconds = _predict(model, data_loader, category_ids, torch.device(device), is_main)
    finally:
        model.train(was_training)
    num_local = len(local_results)
    results_per_image = _gather(local_results)
    metrics: dict[str, Any] | None = None
    if is_main:
        logger.info(
            "inference on %d images took %.1f s (%.1f images/s on rank 0)",
            len(results_per_image), seconds, num_local / max(seconds, 1e-9),
        )
        image_ids = sorted(results_per_image)
        results = [entry for image_id in image_ids for entry in results_per_image[image_id]]
        metrics = coco_metrics(dataset.coco, results, image_ids, list(dataset.class_names))
        if output_dir is not None:
            output_dir = Path(output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / RESULTS_FILE).write_text(json.dumps(results))
            (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
            logger.info("wrote %s and %s", output_dir / RESULTS_FILE, output_dir / METRICS_FILE)
    if dist_utils.is_distributed():
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def coco_metrics(coco_gt, results: list[dict], image_ids: list[int], class_names: list[str]) -> dict[str, Any]:
    """Run COCOeval (bbox) on `results` restricted to `image_ids`; log and return the metrics.

    Args:
        coco_gt: pycocotools COCO holding the ground truth.
        results: COCO result entries {"image_id", "category_id", "bbox" xywh, "score"}.
        image_ids: the evaluated images (those without any detection included).
        class_names: name of each category, in sorted category id order (CocoDetection.class_names).
    Returns:
        the 12 standard numbers by name and "per_class_AP"; see `evaluate`. A number pycocotools
        cannot define (no ground truth in its area range or category) is None, not 0.0.
    """
    if not coco_gt.getAnnIds(imgIds=image_ids):
        logger.warning("the %d evaluated images hold no annotation: every AP and AR is undefined (None)",
                       len(image_ids))
        return {**{name: None for name in STAT_NAMES}, "per_class_AP": {name: None for name in class_names}}
    if not results:
        logger.warning("no detections on the %d evaluated images: every AP and AR is 0", len(image_ids))

    coco_eval = run_coco_eval(coco_gt, results, image_ids)
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        coco_eval.summarize()
    logger.info("COCO bbox evaluation on %d images, %d detections:\n%s", len(image_ids), len(results),
                summary.getvalue().rstrip())

    undefined = [name for name, value in zip(STAT_NAMES, coco_eval.stats) if value < 0]
    if undefined:
        logger.warning("no ground truth for %s (pycocotools gives -1): reported as None", ", ".join(undefined))
    metrics: dict[str, Any] = {
        name: float(value) if value >= 0 else None for name, value in zip(STAT_NAMES, coco_eval.stats)
    }
    metrics["per_class_AP"] = per_class_ap(coco_eval, class_names)
    return metrics


def run_coco_eval(coco_gt, results: list[dict], image_ids: list[int]) -> COCOeval:
    """pycocotools' bbox COCOeval of `results` on `image_ids`, evaluated and accumulated (its
    eval["precision"] filled); `results` may be empty. Arguments as `coco_metrics`."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        if results:
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))  # loadRes adds keys to the entries
        else:  # loadRes cannot build a result set from an empty list (it reads the first entry)
            coco_dt = COCO()
            coco_dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                               "annotations": []}
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.params.imgIds = list(image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
    return coco_eval


def per_class_ap(coco_eval: COCOeval, class_names: list[str]) -> dict[str, float | None]:
    """AP of each category (IoU 0.50:0.95, all areas, 100 detections), as detectron2 computes it.

    COCOeval.eval["precision"] is (T IoUs, R recall points, K categories, A areas, M maxDets) with -1
    where a category has no ground truth; such a category gets None (and a warning), not NaN or 0.
    Category k of the array is params.catIds[k] (sorted ids), the order of `class_names`.
    """
    precision = coco_eval.eval["precision"]
    ap_per_class, without_gt = {}, []
    for index, name in enumerate(class_names[: len(coco_eval.params.catIds)]):
        values = precision[:, :, index, 0, -1]
        values = values[values > -1]
        ap_per_class[name] = float(np.mean(values)) if values.size else None
        if not values.size:
            without_gt.append(name)
    if without_gt:
        logger.warning("no ground truth for class(es) %s in the evaluated images: their AP is reported as None",
                       ", ".join(without_gt))
    logger.info("per-class AP:\n%s", _table(ap_per_class))
    return ap_per_class


def _table(values: dict[str, float | None], columns: int = 3) -> str:
    """Name / AP pairs, `columns` pairs per row; an undefined AP (None) reads "n/a"."""
    width = max([len("category")] + [len(name) for name in values])
    cells = [f"{name:<{width}}  {'n/a' if value is None else f'{value:.3f}':>5}" for name, value in values.items()]
    header = "  |  ".join([f"{'category':<{width}}  {'AP':>5}"] * min(columns, max(len(cells), 1)))
    rows = ["  |  ".join(cells[i : i + columns]) for i in range(0, len(cells), columns)]
    return "\n".join([header, "-" * len(header), *rows])
