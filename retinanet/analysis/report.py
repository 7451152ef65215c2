"""`retinanet analyze-data`: the training set's boxes against the anchors, written to a folder.

Files: summary.json (every number), summary.txt (the table that is also logged) and, when
matplotlib is installed (`pip install 'retinanet[plots]'`), PNG plots (see retinanet.analysis.plots).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from retinanet.analysis.anchors import (
    SIZE_BUCKETS,
    AnchorCoverage,
    AnchorFit,
    TrainingBoxes,
    anchor_coverage,
    collect_training_boxes,
    coverage_summary,
    fit_anchors,
)
from retinanet.config import Config
from retinanet.data.loader import build_train_dataset
from retinanet.modeling.anchors import AnchorGenerator
from retinanet.modeling.retinanet import STRIDES

logger = logging.getLogger(__name__)

SUMMARY_JSON = "summary.json"
SUMMARY_TEXT = "summary.txt"
PLOTS_HINT = "pip install 'retinanet[plots]' (or pip install matplotlib)"
PERCENTILES = (5, 25, 50, 75, 95)


def default_output_dir(cfg: Config) -> Path:
    return Path(cfg.train.output_dir) / "analyze_data"


def analyze_data(
    cfg: Config,
    output_dir: str | Path | None = None,
    max_images: int | None = None,
    fit: bool = False,
    generations: int = 1000,
) -> dict[str, Any]:
    """Box statistics and anchor coverage of cfg's training set; optionally fit anchors.

    Args:
        cfg: the config whose data.train, model.input, model.anchors and model.matcher are used
            (data.val and model.num_classes are not).
        output_dir: where the files go; default train.output_dir/analyze_data.
        max_images: analyse a seeded random sample of this many training images (train.seed).
        fit: also search anchors that cover more boxes (fit_anchors) and report their coverage.
        generations: mutations the search tries.
    Returns:
        the summary written to summary.json.
    """
    out = Path(output_dir) if output_dir is not None else default_output_dir(cfg)
    try:  # before reading the data, not after
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"{out}: cannot create the output folder ({err.strerror or err}); choose another --output"
        ) from None
    train_set = build_train_dataset(cfg)  # the validation files are not read
    m = cfg.model
    boxes = collect_training_boxes(
        train_set, m.input.min_size_train, m.input.max_size_train, m.input.size_divisibility, max_images, cfg.train.seed
    )
    anchors = AnchorGenerator(m.anchors.sizes, m.anchors.scales, m.anchors.aspect_ratios, STRIDES,
                              m.anchors.torchvision_compat)
    coverage = anchor_coverage(boxes, anchors, m.matcher.fg_iou_thresh, m.matcher.bg_iou_thresh)
    summary = {
        "dataset": {"ann_file": train_set.ann_file, "images_total": len(train_set),
                    "images_analysed": boxes.num_images, "boxes": int(boxes.boxes.shape[0])},
        "frame": {"min_size_train": list(m.input.min_size_train), "max_size_train": m.input.max_size_train,
                  "size_divisibility": m.input.size_divisibility},
        "anchors": {"sizes": list(m.anchors.sizes), "scales": list(m.anchors.scales),
                    "aspect_ratios": list(m.anchors.aspect_ratios), "strides": list(STRIDES)},
        "matcher": {"fg_iou_thresh": m.matcher.fg_iou_thresh, "bg_iou_thresh": m.matcher.bg_iou_thresh,
                    "allow_low_quality_matches": m.matcher.allow_low_quality_matches},
        **box_statistics(boxes),
        "coverage": coverage_summary(boxes, coverage, STRIDES),
    }
    fitted_coverage, fit_result = None, None
    if boxes.boxes.shape[0] == 0:
        logger.warning("the training set has no box: nothing to measure%s", "; no anchors fitted" if fit else "")
    elif fit:
        logger.info("searching anchors (%d generations)...", generations)
        fit_result = fit_anchors(
            boxes, m.anchors.sizes, m.anchors.scales, m.anchors.aspect_ratios, STRIDES, m.matcher.fg_iou_thresh,
            generations=generations, seed=cfg.train.seed, torchvision_compat=m.anchors.torchvision_compat,
        )
        fitted = AnchorGenerator(fit_result.sizes, m.anchors.scales, fit_result.aspect_ratios, STRIDES,
                                 m.anchors.torchvision_compat)
        fitted_coverage = anchor_coverage(boxes, fitted, m.matcher.fg_iou_thresh, m.matcher.bg_iou_thresh)
        summary["fitted"] = {
            "method": "best global rescaling, then a (1+1) evolution strategy on log sizes and log ratios "
                      "(scales kept); score: coverage, ties broken by the mean best IoU",
            "generations": fit_result.generations,
            "search_boxes": fit_result.num_boxes,
            "sizes": fit_result.sizes,
            "aspect_ratios": fit_result.aspect_ratios,
            "overrides": fit_result.overrides(),
            "coverage": coverage_summary(boxes, fitted_coverage, STRIDES),
        }
    text = format_summary(summary)
    (out / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    (out / SUMMARY_TEXT).write_text(text + "\n")
    for line in text.splitlines():
        logger.info("%s", line)
    summary["plots"] = _write_plots(out, boxes, coverage, summary, fitted_coverage, fit_result)
    logger.info("wrote %s", out)
    return summary


def _write_plots(
    out: Path, boxes: TrainingBoxes, coverage: AnchorCoverage, summary: dict[str, Any],
    fitted_coverage: AnchorCoverage | None, fit_result: AnchorFit | None,
) -> list[str]:
    try:
        # matplotlib is an optional extra: without it the numbers above are the whole report.
        plots = importlib.import_module("retinanet.analysis.plots")
    except ImportError as err:
        logger.warning("no plots: %s; the numbers are in %s. For the plots: %s", err, out / SUMMARY_TEXT, PLOTS_HINT)
        return []
    paths = plots.write_plots(out, boxes, coverage, summary, fitted_coverage, fit_result)
    logger.info("plots: %s", ", ".join(path.name for path in paths))
    return [str(path) for path in paths]


def _percentiles(values: Tensor) -> dict[str, float] | None:
    if values.numel() == 0:
        return None
    quantiles = torch.quantile(values.double(), torch.tensor([p / 100 for p in PERCENTILES], dtype=torch.float64))
    return {"min": float(values.min()), **{f"p{p}": float(q) for p, q in zip(PERCENTILES, quantiles)},
            "max": float(values.max())}


def box_statistics(boxes: TrainingBoxes) -> dict[str, Any]:
    """Boxes per image, box size sqrt(w * h) and aspect ratio h / w (resized frame) as plain numbers."""
    per_image = boxes.boxes_per_image().double()
    return {
        "boxes_per_image": {
            "mean": float(per_image.mean()) if boxes.num_images else None,
            "median": float(per_image.median()) if boxes.num_images else None,
            "max": int(per_image.max()) if boxes.num_images else None,
            "empty_image_share": float((per_image == 0).double().mean()) if boxes.num_images else None,
        },
        "box_size": _percentiles(boxes.sqrt_areas()),
        "aspect_ratio": _percentiles(boxes.aspect_ratios()),
    }


def _number(value: float | None, spec: str, width: int = 0) -> str:
    """value formatted by spec ('.1%'), right-aligned in width; '-' when None."""
    return f"{'-' if value is None else format(value, spec):>{width}}"


def _row_stats(name: str, stats: dict[str, Any]) -> str:
    return (f"  {name:<24} {stats['boxes']:>7} {_number(stats['coverage'], '.1%', 8)} "
            f"{_number(stats['mean_best_iou'], '.3f', 9)} {_number(stats['positives_mean'], '.2f', 9)} "
            f"{_number(stats['positives_median'], '.1f', 7)} {_number(stats['zero_positive_share'], '.1%', 7)}")


def _coverage_table(coverage: dict[str, Any], sizes: list[float], scales: list[float]) -> list[str]:
    lines = [f"  {'':<24} {'boxes':>7} {'coverage':>8} {'best IoU':>9} {'pos. mean':>9} {'median':>7} {'zero':>7}"]
    for (name, low, high), stats in zip(SIZE_BUCKETS, coverage["by_size"].values()):
        bounds = f"area < {math.sqrt(high):g}^2" if low == 0 else (
            f"{math.sqrt(low):g}^2..{math.sqrt(high):g}^2" if math.isfinite(high) else f">= {math.sqrt(low):g}^2")
        lines.append(_row_stats(f"{name} ({bounds})", stats))
    for (level, stats), size in zip(coverage["by_level"].items(), sizes):
        name = f"{level} s{stats['stride']} {size * min(scales):.3g}-{size * max(scales):.3g}px"
        lines.append(_row_stats(name, stats))
    lines.append(_row_stats("all", coverage["all"]))
    return lines


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable table of an analyze_data summary."""
    dataset, frame, anchors, matcher = summary["dataset"], summary["frame"], summary["anchors"], summary["matcher"]
    per_image, size, ratio = summary["boxes_per_image"], summary["box_size"], summary["aspect_ratio"]

    def spread(stats: dict[str, float] | None, fmt: str) -> str:
        if stats is None:
            return "-"
        return "  ".join(f"{key} {format(value, fmt)}" for key, value in stats.items())

    lines = [
        f"training set {dataset['ann_file']}: {dataset['images_analysed']} of {dataset['images_total']} images, "
        f"{dataset['boxes']} boxes",
        f"frame: every size below is in pixels of the resized image the network sees (short side "
        f"{frame['min_size_train']}, long side <= {frame['max_size_train']}, padded to a multiple of "
        f"{frame['size_divisibility']}); COCO's size buckets are applied to box areas in that frame",
        f"boxes per image: mean {_number(per_image['mean'], '.2f')}, median {_number(per_image['median'], 'g')}, "
        f"max {_number(per_image['max'], 'd')}; images with none: {_number(per_image['empty_image_share'], '.1%')}",
        f"box size sqrt(w*h) px: {spread(size, '.1f')}",
        f"aspect ratio h/w:      {spread(ratio, '.3f')}",
        f"anchors: sizes {anchors['sizes']} x scales {[round(s, 3) for s in anchors['scales']]} x ratios h/w "
        f"{anchors['aspect_ratios']} on strides {anchors['strides']}",
        f"coverage: share of boxes whose best anchor IoU >= {matcher['fg_iou_thresh']} (model.matcher.fg_iou_thresh); "
        "best IoU: its mean; pos.: foreground anchors per box without low-quality matches (zero: share with none); "
        "P3..P7 rows: boxes grouped by the level of their best anchor",
        *_coverage_table(summary["coverage"], anchors["sizes"], anchors["scales"]),
    ]
    if not matcher["allow_low_quality_matches"]:
        lines.append("model.matcher.allow_low_quality_matches is false: an uncovered box gets no foreground anchor")
    else:
        lines.append("model.matcher.allow_low_quality_matches is true: an uncovered box still gets the anchors of "
                     "its best IoU, below the threshold")
    fitted = summary.get("fitted")
    if fitted is not None:
        lines += [
            f"fitted anchors ({fitted['method']}; {fitted['generations']} generations on {fitted['search_boxes']} "
            f"boxes): sizes {fitted['sizes']}, ratios h/w {fitted['aspect_ratios']}",
            *_coverage_table(fitted["coverage"], fitted["sizes"], anchors["scales"]),
            f"coverage {summary['coverage']['all']['coverage']:.1%} -> {fitted['coverage']['all']['coverage']:.1%}; "
            f"to train with them: {' '.join(fitted['overrides'])}",
        ]
    return "\n".join(lines)
