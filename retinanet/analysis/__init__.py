"""Dataset analysis: do the anchors fit the objects (statistics, coverage, anchor search)."""

from retinanet.analysis.anchors import (
    SIZE_BUCKETS,
    AnchorCoverage,
    AnchorFit,
    TrainingBoxes,
    anchor_coverage,
    collect_training_boxes,
    coverage_summary,
    feature_grid_sizes,
    fit_anchors,
)
from retinanet.analysis.report import analyze_data, format_summary

__all__ = [
    "SIZE_BUCKETS",
    "AnchorCoverage",
    "AnchorFit",
    "TrainingBoxes",
    "anchor_coverage",
    "collect_training_boxes",
    "coverage_summary",
    "feature_grid_sizes",
    "fit_anchors",
    "analyze_data",
    "format_summary",
]
