"""PNG plots of an analyze-data report (needs matplotlib: `pip install 'retinanet[plots]'`).

Drawn on matplotlib Figure objects directly, not through pyplot: no global figure state and no
interactive backend, so it works on a headless machine and inside a training process.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator, NullFormatter, NullLocator

from retinanet.analysis.anchors import AnchorCoverage, AnchorFit, TrainingBoxes

SCATTER_MAX_POINTS = 5000  # best-IoU scatter: a seeded sample of the boxes beyond this
DPI = 110
LEVEL_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def write_plots(
    out: Path,
    boxes: TrainingBoxes,
    coverage: AnchorCoverage,
    summary: dict[str, Any],
    fitted_coverage: AnchorCoverage | None = None,
    fit: AnchorFit | None = None,
) -> list[Path]:
    """boxes_per_image.png, box_sizes.png, aspect_ratios.png and anchor_coverage.png under `out`."""
    anchors = summary["anchors"]
    paths = [
        _boxes_per_image(out / "boxes_per_image.png", boxes),
        _box_sizes(out / "box_sizes.png", boxes, anchors, fit),
        _aspect_ratios(out / "aspect_ratios.png", boxes, anchors, fit),
    ]
    if boxes.boxes.shape[0]:
        paths.append(_coverage(out / "anchor_coverage.png", boxes, coverage, summary, fitted_coverage))
    return paths


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _powers_of_two(axis: Axis, low: float, high: float, fraction_labels: bool = False) -> None:
    """Ticks at the powers of 2 in [low, high] on a log axis, labelled 8, 16, ... (or 1/4, 1/2, 1,
    2, ...), in place of matplotlib's 2x10^1 labels that run into each other; over less than two
    octaves, also at 1.5 times each (6, 12, ...)."""
    exponents = range(math.floor(math.log2(low)), math.ceil(math.log2(high)) + 1)
    values = [2.0**k for k in exponents]
    labels = [f"1/{2 ** -k}" if fraction_labels and k < 0 else f"{2.0 ** k:g}" for k in exponents]
    if sum(low <= value <= high for value in values) < 3:
        values += [1.5 * 2.0**k for k in exponents]
        labels += [f"3/{2 ** (1 - k)}" if fraction_labels and k < 0 else f"{1.5 * 2.0 ** k:g}" for k in exponents]
    axis.set_major_locator(FixedLocator(values))
    axis.set_ticklabels(labels)
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())


def _boxes_per_image(path: Path, boxes: TrainingBoxes) -> Path:
    counts = torch.bincount(boxes.boxes_per_image()) if boxes.num_images else torch.zeros(1, dtype=torch.int64)
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(counts)), counts.tolist(), width=0.9, color="tab:blue")
    ax.set_xlabel("boxes in the image")
    ax.set_ylabel("images")
    ax.set_title(f"boxes per image ({boxes.num_images} training images)")
    return _save(fig, path)


def _log_bins(values: torch.Tensor, extra: list[float], count: int = 50) -> list[float]:
    low = min([float(values.min())] + extra) if values.numel() else min(extra)
    high = max([float(values.max())] + extra) if values.numel() else max(extra)
    low, high = low / 1.1, high * 1.1
    return torch.logspace(torch.log10(torch.tensor(low)), torch.log10(torch.tensor(high)), count + 1).tolist()


def _box_sizes(path: Path, boxes: TrainingBoxes, anchors: dict[str, Any], fit: AnchorFit | None) -> Path:
    sqrt_areas = boxes.sqrt_areas()
    anchor_sizes = [size * scale for size in anchors["sizes"] for scale in anchors["scales"]]
    fitted_sizes = [size * scale for size in fit.sizes for scale in anchors["scales"]] if fit else []
    bins = _log_bins(sqrt_areas, anchor_sizes + fitted_sizes)
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    ax.hist(sqrt_areas.tolist(), bins=bins, color="0.6")
    ax.set_xscale("log")
    _powers_of_two(ax.xaxis, bins[0], bins[-1])
    for level, size in enumerate(anchors["sizes"]):
        for i, scale in enumerate(anchors["scales"]):
            ax.axvline(size * scale, color=LEVEL_COLORS[level % 5], lw=1.2,
                       label=f"P{level + 3} anchors" if i == 0 else None)
    if fit:
        for level, size in enumerate(fit.sizes):
            for i, scale in enumerate(anchors["scales"]):
                ax.axvline(size * scale, color=LEVEL_COLORS[level % 5], lw=1.2, ls="--",
                           label="fitted (dashed)" if level == 0 and i == 0 else None)
    for bound in (32, 96):
        ax.axvline(bound, color="black", lw=0.8, ls=":")
    ax.set_xlabel("box size sqrt(w*h), px of the resized image (dotted: COCO small/medium/large at 32, 96)")
    ax.set_ylabel("boxes")
    ax.set_title("box sizes and anchor sizes (size x scale, per level)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def _aspect_ratios(path: Path, boxes: TrainingBoxes, anchors: dict[str, Any], fit: AnchorFit | None) -> Path:
    ratios = boxes.aspect_ratios()
    marks = list(anchors["aspect_ratios"]) + (list(fit.aspect_ratios) if fit else [])
    bins = _log_bins(ratios, marks)
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    ax.hist(ratios.tolist(), bins=bins, color="0.6")
    ax.set_xscale("log")
    _powers_of_two(ax.xaxis, bins[0], bins[-1], fraction_labels=True)
    for i, ratio in enumerate(anchors["aspect_ratios"]):
        ax.axvline(ratio, color="tab:blue", lw=1.5, label="anchor ratios" if i == 0 else None)
    if fit:
        for i, ratio in enumerate(fit.aspect_ratios):
            ax.axvline(ratio, color="tab:red", lw=1.5, ls="--", label="fitted ratios" if i == 0 else None)
    ax.set_xlabel("aspect ratio height / width (< 1: wide, > 1: tall)")
    ax.set_ylabel("boxes")
    ax.set_title("box aspect ratios and anchor aspect ratios")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def _coverage(
    path: Path, boxes: TrainingBoxes, coverage: AnchorCoverage, summary: dict[str, Any],
    fitted_coverage: AnchorCoverage | None,
) -> Path:
    sqrt_areas = boxes.sqrt_areas()
    thresh = coverage.fg_iou_thresh
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    scatter_ax, curve_ax, positives_ax = fig.subplots(1, 3)
    bins = torch.tensor(_log_bins(sqrt_areas, [], count=20))

    sample = torch.arange(len(sqrt_areas))
    if len(sample) > SCATTER_MAX_POINTS:
        sample = torch.randperm(len(sample), generator=torch.Generator().manual_seed(0))[:SCATTER_MAX_POINTS]
    for level in range(len(summary["anchors"]["sizes"])):
        at_level = sample[coverage.best_level[sample] == level]
        if len(at_level) == 0:
            continue
        scatter_ax.scatter(sqrt_areas[at_level].tolist(), coverage.best_iou[at_level].tolist(), s=4, alpha=0.5,
                           color=LEVEL_COLORS[level % 5], label=f"best anchor on P{level + 3}")
    scatter_ax.axhline(thresh, color="black", lw=0.8, ls="--")
    scatter_ax.set_xscale("log")
    _powers_of_two(scatter_ax.xaxis, float(bins[0]), float(bins[-1]))
    scatter_ax.set_ylim(0, 1)
    scatter_ax.set_xlabel("box size sqrt(w*h), resized px")
    scatter_ax.set_ylabel("best anchor IoU")
    scatter_ax.set_title(f"best IoU per box, given anchors (dashed: fg_iou_thresh {thresh})")
    scatter_ax.legend(fontsize=7, markerscale=3)

    bin_of_box = (torch.bucketize(sqrt_areas, bins) - 1).clamp(0, len(bins) - 2)
    centers = (bins[:-1] * bins[1:]).sqrt()
    occupied = torch.bincount(bin_of_box, minlength=len(centers)) > 0
    curves = [("given anchors", coverage, "tab:blue")]
    if fitted_coverage is not None:
        curves.append(("fitted anchors", fitted_coverage, "tab:red"))
    for label, result, color in curves:
        covered = torch.bincount(bin_of_box, weights=result.covered().double(), minlength=len(centers))
        total = torch.bincount(bin_of_box, minlength=len(centers)).clamp(min=1)
        share = (covered / total)[occupied]
        curve_ax.plot(centers[occupied].tolist(), share.tolist(), marker="o", ms=3, color=color,
                      label=f"{label}: {result.covered().double().mean():.1%} overall")
    curve_ax.set_xscale("log")
    _powers_of_two(curve_ax.xaxis, float(bins[0]), float(bins[-1]))
    curve_ax.set_ylim(-0.02, 1.02)
    curve_ax.set_xlabel("box size sqrt(w*h), resized px")
    curve_ax.set_ylabel(f"share of boxes with best IoU >= {thresh}")
    curve_ax.set_title("anchor coverage by box size")
    curve_ax.legend(fontsize=8)

    most = int(max(result.num_positive.max() for _, result, _ in curves))
    edges = [x - 0.5 for x in range(most + 2)]
    for label, result, color in curves:
        positives_ax.hist(result.num_positive.tolist(), bins=edges, histtype="step", lw=1.5, color=color,
                          label=f"{label}: mean {result.num_positive.double().mean():.2f}, "
                                f"zero {(result.num_positive == 0).double().mean():.1%}")
    positives_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    positives_ax.set_xlabel("foreground anchors of the box (no low-quality matches)")
    positives_ax.set_ylabel("boxes")
    positives_ax.set_title("positive anchors per box")
    positives_ax.legend(fontsize=8)
    return _save(fig, path)

