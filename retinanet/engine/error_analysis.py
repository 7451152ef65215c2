"""Why is the AP low: TIDE error analysis and per-class precision-recall curves of COCO detection
results, and the evaluation pictures TensorBoard shows during training.

TIDE (Bolya et al., "TIDE: A General Toolbox for Identifying Object Detection Errors", ECCV 2020)
gives every false positive at IoU 0.5 one error type (Cls, Loc, Both, Dupe, Bkg) and every
undetected object not explained by one of them the type Miss; an error type's dAP is the AP50 after
an oracle fixes every error of that type, minus the AP50 before. docs/errors.md has the definitions.

Everything is computed from the ground truth (a pycocotools COCO) and the COCO result entries that
`evaluate` writes (coco_results.json), so the same code serves `retinanet eval --analyze`, the
offline `retinanet analyze-errors` and the training's TensorBoard pictures. AP and dAP are fractions
in 0..1, as every metric here; AP50 is exactly pycocotools' AP50 (same matching, same 101-point
interpolation, same ranking of tied scores).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor

# The evaluation dataset's own reading rules, so that the offline analysis scores the same ground truth.
from ..data.coco import _check_annotation_ids, _fill_area_and_iscrowd, _load_json
from ..data.image import pil_to_tensor_rgb
from ..visualize import DISPLAY_SCORE_THRESH, class_color, draw_detections, draw_style
from .evaluator import RESULTS_FILE, run_coco_eval

logger = logging.getLogger(__name__)

# TIDE's two thresholds (paper, sec. 2.2): a detection is a true positive at IoU >= t_f with an
# unmatched object of its class (COCO's AP50 rule); below t_b with every object it overlaps nothing.
FOREGROUND_IOU = 0.5
BACKGROUND_IOU = 0.1
MAX_DETECTIONS = 100  # per image and category, COCOeval's maxDets[-1]
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # COCOeval's params.recThrs
AREA_RANGE_ALL = (0.0, 1e5**2)  # COCOeval's "all" area range: a box outside it is ignored

# The error types, in tidecv's order. Cls: right place (IoU >= t_f), wrong class. Loc: right class,
# t_b <= IoU < t_f. Both: wrong class and t_b <= IoU < t_f. Dupe: right class and place, but the
# object was taken by a higher-scoring detection. Bkg: IoU < t_b with every object. Miss: an object
# no detection found, counting neither those a Cls or Loc error would find once fixed.
CLS, LOC, BOTH, DUPE, BKG, MISS = "Cls", "Loc", "Both", "Dupe", "Bkg", "Miss"
MAIN_ERRORS = (CLS, LOC, BOTH, DUPE, BKG, MISS)
# Bounds rather than causes: FP, every false positive ranked below every true positive (perfect
# precision at the same recall); FN, every object found (perfect recall at the same precision).
FALSE_POS, FALSE_NEG = "FP", "FN"
SPECIAL_ERRORS = (FALSE_POS, FALSE_NEG)
TRUE_POSITIVE = -1  # Matching.det_error of a true positive

# What the analysis writes, under OUTPUT_DIR/ANALYSIS_DIR.
ANALYSIS_DIR = "analysis"
TIDE_FILE = "tide.json"
TIDE_PLOT = "tide.png"
PR_FILE = "pr_curves.json"
PR_DIR = "pr_curves"
PLOTS_HINT = "pip install 'retinanet[plots]' (or pip install matplotlib)"

# TensorBoard PR curves: thresholds 0, 0.01, ..., 1 on the score.
PR_CURVE_THRESHOLDS = 101


# ----------------------------------------------------------------------------------------------
# Matching and error types.


@dataclass
class Matching:
    """Detections matched to the ground truth at IoU >= FOREGROUND_IOU as COCOeval matches them, with
    the TIDE error type of every false positive and every missed object.

    Detection arrays are (D,), over the detections COCOeval counts (the MAX_DETECTIONS best per image
    and category; those matched to a crowd region dropped), in COCOeval's ranking: score descending,
    then image order, then results order. Ground truth arrays are (G,), over the objects COCOeval
    counts (not crowd, area in range), in image order then annotation order.
    """

    num_classes: int
    det_label: np.ndarray  # int, position of the category in the sorted category ids
    det_score: np.ndarray  # float
    det_error: np.ndarray  # int: TRUE_POSITIVE, or the index of the error type in MAIN_ERRORS
    det_target: np.ndarray  # int: the object a Cls or Loc error would find once fixed; -1 otherwise
    gt_label: np.ndarray  # int
    gt_matched: np.ndarray  # bool: found by a true positive
    gt_error: np.ndarray  # bool: a Miss error
    gt_best: np.ndarray  # int: the best-scoring Cls / Loc error targeting the unmatched object, -1 if none

    @property
    def num_gt(self) -> np.ndarray:
        """(K,) objects of each class."""
        return np.bincount(self.gt_label, minlength=self.num_classes)

    @property
    def det_tp(self) -> np.ndarray:
        return self.det_error == TRUE_POSITIVE


def match_detections(coco_gt: COCO, results: list[dict], image_ids: list[int]) -> Matching:
    """Match `results` to the ground truth of `image_ids` and give every error its TIDE type.

    Args:
        coco_gt: the ground truth, with "area" and "iscrowd" on every annotation.
        results: COCO result entries {"image_id", "category_id", "bbox" xywh pixels, "score"}; those of
            other images or of categories not in `coco_gt` are left out, as COCOeval leaves them.
        image_ids: the evaluated images.
    """
    category_ids = sorted(coco_gt.getCatIds())
    label_of = {category_id: label for label, category_id in enumerate(category_ids)}
    image_ids = sorted(set(image_ids))  # COCOeval's order (np.unique)
    results_of_image: dict[int, list[int]] = defaultdict(list)
    for index, entry in enumerate(results):
        if entry["category_id"] in label_of:
            results_of_image[entry["image_id"]].append(index)

    # (-score, image position, result index, label, error, target object) of every counted detection
    det_rows: list[tuple[float, int, int, int, int, int]] = []
    gt_labels: list[int] = []
    gt_matched: list[bool] = []
    gt_targeted: list[bool] = []
    for image_pos, image_id in enumerate(image_ids):
        gt_offset = len(gt_labels)
        annotations = coco_gt.imgToAnns.get(image_id, [])
        entries = _kept_detections(results, results_of_image.get(image_id, []), label_of)
        image_rows, image_gt = _match_image(results, entries, annotations, label_of)
        labels, matched, targeted = image_gt
        gt_labels += labels
        gt_matched += matched
        gt_targeted += targeted
        for index, label, error, target in image_rows:
            det_rows.append((-results[index]["score"], image_pos, index, label, error,
                             target + gt_offset if target >= 0 else -1))

    det_rows.sort()  # COCOeval's ranking: score descending, then image order, then results order
    rows = np.array(det_rows, dtype=np.float64).reshape(-1, 6)
    det_error = rows[:, 4].astype(np.int64)
    det_target = rows[:, 5].astype(np.int64)
    gt_best = np.full(len(gt_labels), -1, dtype=np.int64)
    # TIDE's BestGTMatch: of the Cls / Loc errors an unmatched object could be found by, only the
    # best-scoring one (the first in ranking order) becomes its true positive when fixed.
    for det in np.flatnonzero(det_target >= 0):
        if gt_best[det_target[det]] < 0:
            gt_best[det_target[det]] = det
    matched = np.array(gt_matched, dtype=bool)
    return Matching(
        num_classes=len(category_ids),
        det_label=rows[:, 3].astype(np.int64),
        det_score=-rows[:, 0],
        det_error=det_error,
        det_target=det_target,
        gt_label=np.array(gt_labels, dtype=np.int64),
        gt_matched=matched,
        gt_error=~matched & ~np.array(gt_targeted, dtype=bool),
        gt_best=gt_best,
    )


def _kept_detections(results: list[dict], indices: list[int], label_of: dict[int, int]) -> list[int]:
    """The result indices COCOeval counts in one image: per category the MAX_DETECTIONS best (ties in
    results order), all of them ordered by score descending, then results order."""
    per_category: dict[int, list[int]] = defaultdict(list)
    for index in indices:
        per_category[label_of[results[index]["category_id"]]].append(index)
    kept = []
    for members in per_category.values():
        kept += sorted(members, key=lambda index: -results[index]["score"])[:MAX_DETECTIONS]  # stable, like mergesort
    return sorted(kept, key=lambda index: (-results[index]["score"], index))


def _match_image(
    results: list[dict], entries: list[int], annotations: list[dict], label_of: dict[int, int]
) -> tuple[list[tuple[int, int, int, int]], tuple[list[int], list[bool], list[bool]]]:
    """One image: COCOeval's greedy matching at FOREGROUND_IOU, then TIDE's error of each false positive.

    Returns:
        detections: (result index, label, error, target object index in this image or -1) of each
            detection COCOeval counts, crowd-matched ones left out.
        objects: (labels, matched, targeted by a Cls / Loc error while unmatched) of the counted objects.
    """
    annotations = [a for a in annotations if a["category_id"] in label_of]
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in annotations], dtype=bool)
    area = np.array([a["area"] for a in annotations], dtype=np.float64)
    ignored = crowd | (area < AREA_RANGE_ALL[0]) | (area > AREA_RANGE_ALL[1])  # COCOeval's gtIgnore
    gt_label = np.array([label_of[a["category_id"]] for a in annotations], dtype=np.int64)
    det_label = np.array([label_of[results[index]["category_id"]] for index in entries], dtype=np.int64)
    det_boxes = np.array([results[index]["bbox"] for index in entries], dtype=np.float64).reshape(-1, 4)
    gt_boxes = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
    # A crowd region's IoU is intersection / detection area (pycocotools' iscrowd rule).
    iou = np.asarray(mask_utils.iou(det_boxes, gt_boxes, crowd.astype(np.uint8).tolist()), dtype=np.float64)
    iou = iou.reshape(len(entries), len(annotations))
    same_class = det_label[:, None] == gt_label[None, :]  # (D, G)

    taken = np.zeros(len(annotations), dtype=bool)  # matched, by a detection of its class
    match = np.full(len(entries), -1, dtype=np.int64)
    counted_det = np.ones(len(entries), dtype=bool)
    for row in np.flatnonzero(same_class.any(axis=1)):  # best score first; other rows cannot match
        best = _best_match(iou[row], same_class[row] & ~ignored & ~taken)
        if best < 0:  # COCOeval tries the ignored objects (crowds any number of times) only then
            best = _best_match(iou[row], same_class[row] & ignored & (crowd | ~taken))
        if best >= 0:
            taken[best] = True
            match[row] = best
            counted_det[row] = not ignored[best]  # matched to an ignored object: not counted (dtIgnore)

    counted = ~ignored  # TIDE's errors are about these objects only
    false_positive = counted_det & (match < 0)
    errors, targets = _error_types(iou[false_positive][:, counted], same_class[false_positive][:, counted],
                                   taken[counted])
    error_of_row = np.full(len(entries), TRUE_POSITIVE, dtype=np.int64)
    target_of_row = np.full(len(entries), -1, dtype=np.int64)
    error_of_row[false_positive], target_of_row[false_positive] = errors, targets
    targeted = np.zeros(int(counted.sum()), dtype=bool)
    targeted[targets[targets >= 0]] = True
    detections = [(entries[row], int(det_label[row]), int(error_of_row[row]), int(target_of_row[row]))
                  for row in np.flatnonzero(counted_det)]
    return detections, (gt_label[counted].tolist(), taken[counted].tolist(), targeted.tolist())


def _best_match(iou: np.ndarray, allowed: np.ndarray) -> int:
    """COCOeval's choice among the `allowed` objects: the highest IoU >= FOREGROUND_IOU, the last one
    of equal IoUs (its loop replaces the match on >=); -1 if none reaches the threshold."""
    candidates = np.flatnonzero(allowed & (iou >= FOREGROUND_IOU))
    if not len(candidates):
        return -1
    values = iou[candidates]
    return int(candidates[len(values) - 1 - int(np.argmax(values[::-1]))])


def _error_types(iou: np.ndarray, same_class: np.ndarray, taken: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TIDE's type of each false positive of an image, tested in tidecv's order (Loc, Cls, Dupe,
    Bkg, else Both), and the object a Cls or Loc error would find once fixed.

    Args:
        iou: (F, G) IoU of the F false positives with the image's G counted objects.
        same_class: (F, G) whether the object has the detection's class.
        taken: (G,) objects a true positive found.
    Returns:
        errors: (F,) index in MAIN_ERRORS.
        targets: (F,) the Cls / Loc error's object if no true positive found it (else fixing it would
            make a duplicate, and it is removed instead); -1 for the other errors.
    """
    num_fp = iou.shape[0]
    if not iou.shape[1]:  # nothing in the image: all background
        return np.full(num_fp, MAIN_ERRORS.index(BKG)), np.full(num_fp, -1)
    same_iou = np.where(same_class, iou, 0.0)
    other_iou = np.where(same_class, 0.0, iou)
    rows = np.arange(num_fp)
    best_same, best_other = same_iou.argmax(axis=1), other_iou.argmax(axis=1)
    is_loc = (same_iou[rows, best_same] >= BACKGROUND_IOU) & (same_iou[rows, best_same] < FOREGROUND_IOU)
    is_cls = ~is_loc & (other_iou[rows, best_other] >= FOREGROUND_IOU)
    is_dupe = ~is_loc & ~is_cls & (np.where(taken, same_iou, 0.0).max(axis=1) >= FOREGROUND_IOU)
    is_bkg = ~is_loc & ~is_cls & ~is_dupe & (iou.max(axis=1) < BACKGROUND_IOU)
    # Both: the rest, a wrong class at BACKGROUND_IOU <= IoU < FOREGROUND_IOU and nothing of its class there.
    errors = np.select([is_loc, is_cls, is_dupe, is_bkg], [MAIN_ERRORS.index(e) for e in (LOC, CLS, DUPE, BKG)],
                       MAIN_ERRORS.index(BOTH))
    targets = np.where(is_loc, best_same, np.where(is_cls, best_other, -1))
    targets[(targets >= 0) & taken[np.maximum(targets, 0)]] = -1
    return errors, targets


# ----------------------------------------------------------------------------------------------
# AP with errors fixed.


def average_precision(is_tp: np.ndarray, num_gt: int) -> float | None:
    """COCO's 101-point interpolated AP of one class.

    Args:
        is_tp: (D,) bool, the class's detections in ranking order (best first).
        num_gt: objects of the class; 0 or less: undefined (None), as pycocotools' -1.
    """
    if num_gt <= 0:
        return None
    tp = np.cumsum(is_tp, dtype=np.float64)
    fp = np.cumsum(~is_tp, dtype=np.float64)
    recall = tp / num_gt
    precision = tp / (tp + fp + np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the precision envelope
    positions = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")
    interpolated = np.zeros(len(RECALL_THRESHOLDS))
    reached = positions < len(precision)
    interpolated[reached] = precision[positions[reached]]
    return float(interpolated.mean())


def class_aps(labels: np.ndarray, is_tp: np.ndarray, num_gt: np.ndarray) -> list[float | None]:
    """AP of each class from detections in ranking order ((D,) labels and true-positive flags)."""
    return [average_precision(is_tp[labels == k], int(num_gt[k])) for k in range(len(num_gt))]


def mean_ap(aps: list[float | None]) -> float | None:
    """Mean over the classes whose AP is defined (pycocotools leaves out those without objects)."""
    defined = [ap for ap in aps if ap is not None]
    return float(np.mean(defined)) if defined else None


def fixed_class_aps(matching: Matching, error: str) -> list[float | None]:
    """AP of each class after an oracle fixed every error of type `error` (MAIN_ERRORS or
    SPECIAL_ERRORS), as tidecv's fix_errors does.

    Cls and Loc: the best-scoring error targeting an unmatched object becomes its true positive (in
    the object's class, at its score); every other one (another detection found that object) is
    removed. Both, Dupe, Bkg: removed. Miss: the missed objects no longer count. FP: the true
    positives ranked before every false positive. FN: only the objects found count.
    """
    labels, is_tp, num_gt = matching.det_label.copy(), matching.det_tp.copy(), matching.num_gt
    keep = np.ones(len(labels), dtype=bool)
    if error in (CLS, LOC):
        of_type = matching.det_error == MAIN_ERRORS.index(error)
        fixed = of_type & (matching.det_target >= 0)
        fixed[fixed] = matching.gt_best[matching.det_target[fixed]] == np.flatnonzero(fixed)
        labels[fixed] = matching.gt_label[matching.det_target[fixed]]
        is_tp[fixed] = True
        keep = ~of_type | fixed
    elif error in (BOTH, DUPE, BKG):
        keep = matching.det_error != MAIN_ERRORS.index(error)
    elif error == MISS:
        num_gt = num_gt - np.bincount(matching.gt_label[matching.gt_error], minlength=matching.num_classes)
    elif error == FALSE_POS:
        order = np.argsort(~is_tp, kind="stable")
        labels, is_tp = labels[order], is_tp[order]
    elif error == FALSE_NEG:
        num_gt = np.bincount(matching.gt_label[matching.gt_matched], minlength=matching.num_classes)
    else:
        raise ValueError(f"unknown error type {error!r}; expected one of {MAIN_ERRORS + SPECIAL_ERRORS}")
    return class_aps(labels[keep], is_tp[keep], num_gt)


def tide_errors(coco_gt: COCO, results: list[dict], image_ids: list[int], class_names: list[str]) -> dict[str, Any]:
    """TIDE's error breakdown of `results`, overall and per class.

    Args:
        coco_gt, results, image_ids: see `match_detections`.
        class_names: name of each category, in sorted category id order.
    Returns:
        {"AP50": mean AP50 (None without objects), "dAP": {type: AP50 gain of fixing that type},
        "counts": {type: number of errors}, "per_class": {name: {"AP50", "dAP", "counts"}}, and the
        thresholds}. A dAP of MAIN_ERRORS is at least 0 (tidecv clamps a negative one, an artefact
        of the interpolation, to 0); a dAP is None where the AP before or after is undefined.
    """
    matching = match_detections(coco_gt, results, image_ids)
    base = class_aps(matching.det_label, matching.det_tp, matching.num_gt)
    counts = np.zeros((len(MAIN_ERRORS), matching.num_classes), dtype=np.int64)
    for error_index, error in enumerate(MAIN_ERRORS):
        if error == MISS:
            counts[error_index] = np.bincount(matching.gt_label[matching.gt_error], minlength=matching.num_classes)
        else:
            labels = matching.det_label[matching.det_error == error_index]
            counts[error_index] = np.bincount(labels, minlength=matching.num_classes)
    delta: dict[str, float | None] = {}
    delta_per_class: dict[str, list[float | None]] = {}
    for error in MAIN_ERRORS + SPECIAL_ERRORS:
        fixed = fixed_class_aps(matching, error)
        delta[error] = _gain(mean_ap(fixed), mean_ap(base), clamp=error in MAIN_ERRORS)
        delta_per_class[error] = [_gain(after, before, clamp=error in MAIN_ERRORS)
                                  for after, before in zip(fixed, base)]
    names = list(class_names[: matching.num_classes])
    return {
        "foreground_iou": FOREGROUND_IOU,
        "background_iou": BACKGROUND_IOU,
        "num_images": len(set(image_ids)),
        "num_detections": len(matching.det_label),
        "num_objects": len(matching.gt_label),
        "AP50": mean_ap(base),
        "dAP": delta,
        "counts": {error: int(counts[i].sum()) for i, error in enumerate(MAIN_ERRORS)},
        "per_class": {
            name: {
                "AP50": base[k],
                "dAP": {error: delta_per_class[error][k] for error in delta_per_class},
                "counts": {error: int(counts[i, k]) for i, error in enumerate(MAIN_ERRORS)},
            }
            for k, name in enumerate(names)
        },
    }


def _gain(after: float | None, before: float | None, clamp: bool) -> float | None:
    if after is None or before is None:
        return None
    return max(after - before, 0.0) if clamp else after - before


def format_tide_table(summary: dict[str, Any]) -> str:
    """The TIDE summary as a text table: AP50 and each type's dAP, overall then per class, then the
    error counts; an undefined number reads "n/a"."""
    types = list(MAIN_ERRORS + SPECIAL_ERRORS)
    rows = [("all", summary["AP50"], summary["dAP"])] + [
        (name, entry["AP50"], entry["dAP"]) for name, entry in summary["per_class"].items()
    ]
    width = max(len("category"), *(len(name) for name, _, _ in rows))

    def number(value: float | None) -> str:
        return f"{'n/a' if value is None else f'{value:.3f}':>6}"

    header = f"{'category':<{width}}  {'AP50':>6}  " + " ".join(f"{name:>6}" for name in types)
    lines = [header, "-" * len(header)]
    for name, ap, gains in rows:
        lines.append(f"{name:<{width}}  {number(ap)}  " + " ".join(number(gains[error]) for error in types))
    lines.append(f"{'errors':<{width}}  {'':>6}  " + " ".join(f"{summary['counts'][e]:>6}" for e in MAIN_ERRORS))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Precision-recall curves.


def precision_recall_curves(
    coco_gt: COCO, results: list[dict], image_ids: list[int], class_names: list[str]
) -> dict[str, Any]:
    """Per-class precision at COCO's 101 recall points, from pycocotools' precision array
    (all areas, 100 detections): at IoU 0.50, at 0.75, and averaged over 0.50:0.95.

    Returns:
        {"recall": [101 floats], "classes": {name: {"AP", "AP50", "AP75", "precision", "precision50",
        "precision75"} or None for a class without objects}}.
    """
    coco_eval = run_coco_eval(coco_gt, results, image_ids)
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]  # (T IoUs, R recall points, K classes)
    iou_thresholds = coco_eval.params.iouThrs
    at_50 = int(np.argmin(np.abs(iou_thresholds - 0.5)))
    at_75 = int(np.argmin(np.abs(iou_thresholds - 0.75)))
    classes: dict[str, Any] = {}
    for k, name in enumerate(class_names[: precision.shape[2]]):
        curves = precision[:, :, k]
        if (curves < 0).any():  # -1: no object of the class in these images
            classes[name] = None
            continue
        classes[name] = {
            "AP": float(curves.mean()),
            "AP50": float(curves[at_50].mean()),
            "AP75": float(curves[at_75].mean()),
            "precision": curves.mean(axis=0).tolist(),
            "precision50": curves[at_50].tolist(),
            "precision75": curves[at_75].tolist(),
        }
    return {"recall": coco_eval.params.recThrs.tolist(), "classes": classes}


@dataclass
class PRCounts:
    """A TensorBoard PR curve (add_pr_curve_raw): (T,) arrays at score thresholds i / (T - 1),
    counting the detections scoring at least the threshold; false negatives include the objects no
    detection found."""

    true_positives: np.ndarray
    false_positives: np.ndarray
    true_negatives: np.ndarray
    false_negatives: np.ndarray
    precision: np.ndarray
    recall: np.ndarray


def pr_curve_counts(matching: Matching, num_thresholds: int = PR_CURVE_THRESHOLDS) -> list[PRCounts | None]:
    """Each class's PR curve at IoU FOREGROUND_IOU over score thresholds; None for a class without
    objects. Buckets as torch's add_pr_curve: a score s counts at thresholds <= floor(s * (T - 1))."""
    curves: list[PRCounts | None] = []
    num_gt = matching.num_gt
    for k in range(matching.num_classes):
        if num_gt[k] == 0:
            curves.append(None)
            continue
        of_class = matching.det_label == k
        buckets = np.clip(np.floor(matching.det_score[of_class] * (num_thresholds - 1)), 0, num_thresholds - 1)
        buckets = buckets.astype(np.int64)
        is_tp = matching.det_tp[of_class]
        tp = np.cumsum(np.bincount(buckets[is_tp], minlength=num_thresholds)[::-1])[::-1].astype(np.float64)
        fp = np.cumsum(np.bincount(buckets[~is_tp], minlength=num_thresholds)[::-1])[::-1].astype(np.float64)
        fn = num_gt[k] - tp
        curves.append(PRCounts(
            true_positives=tp, false_positives=fp, true_negatives=fp[0] - fp, false_negatives=fn,
            precision=tp / np.maximum(tp + fp, 1e-7), recall=tp / num_gt[k],
        ))
    return curves


# ----------------------------------------------------------------------------------------------
# Pictures.


def draw_ground_truth_and_detections(
    image: Tensor, target: dict[str, Any], detections: dict[str, Any]
) -> Tensor:
    """uint8 (3, H, 2W + gap): the ground truth outlined in its class colours (left) beside the
    detections drawn with their labels (right, retinanet.visualize.draw_detections).

    Args:
        image: uint8 (3, H, W) RGB.
        target: {"boxes": (N, 4) xyxy pixels of `image`, "labels": (N,)}.
        detections: {"boxes" xyxy pixels, "scores", "labels", "class_names" (one per detection)}, as
            draw_detections takes them.
    """
    picture = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    draw = ImageDraw.Draw(picture)
    line_width = draw_style(picture.height, picture.width).line_width
    for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
        x1, y1, x2, y2 = (round(value) for value in box)
        draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=class_color(label), width=line_width)
    gap = torch.full((3, image.shape[1], max(2, image.shape[2] // 100)), 255, dtype=torch.uint8)
    return torch.cat([pil_to_tensor_rgb(picture), gap, draw_detections(image, detections)], dim=2)


def evaluation_pictures(
    dataset, results: list[dict], num_images: int, score_thresh: float = DISPLAY_SCORE_THRESH
) -> dict[str, Tensor]:
    """The first `num_images` images of `dataset` (the lowest image ids) with their ground truth and
    their detections scoring at least `score_thresh`, by TensorBoard tag "val_images/<image id>".

    Args:
        dataset: a CocoDetection (image_ids sorted, load_image, load_target, category_id_to_label).
        results: COCO result entries of the evaluation.
    """
    pictures = {}
    chosen = dict(enumerate(dataset.image_ids[:num_images]))
    entries_of_image: dict[int, list[dict]] = defaultdict(list)
    wanted = set(chosen.values())
    for entry in results:
        if entry["image_id"] in wanted and entry["score"] >= score_thresh:
            entries_of_image[entry["image_id"]].append(entry)
    for index, image_id in chosen.items():
        entries = sorted(entries_of_image[image_id], key=lambda entry: -entry["score"])
        boxes = torch.tensor([entry["bbox"] for entry in entries], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        labels = [dataset.category_id_to_label[entry["category_id"]] for entry in entries]
        detections = {
            "boxes": boxes,
            "scores": torch.tensor([entry["score"] for entry in entries], dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "class_names": [dataset.class_names[label] for label in labels],
        }
        pictures[f"val_images/{image_id}"] = draw_ground_truth_and_detections(
            dataset.load_image(index), dataset.load_target(index), detections
        )
    return pictures


# ----------------------------------------------------------------------------------------------
# The analysis as files.


def load_ground_truth(ann_file: str | os.PathLike) -> tuple[COCO, list[str]]:
    """The ground truth of a COCO json as `evaluate` scores it, without reading any image; and the
    class names in sorted category id order.

    The evaluation dataset's rules (retinanet.data.coco): unique annotation ids, a missing "area"
    is the bbox's w*h, a missing "iscrowd" is 0.
    """
    ann_file = str(ann_file)
    dataset = _load_json(ann_file)
    _check_annotation_ids(dataset["annotations"], ann_file)
    for annotation in dataset["annotations"]:
        bbox = annotation.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise ValueError(f"{ann_file}: annotation {annotation['id']} has no 4-number 'bbox', got {bbox!r}")
    _fill_area_and_iscrowd(dataset["annotations"], ann_file)
    coco_gt = COCO()
    coco_gt.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt.createIndex()
    categories = sorted(dataset["categories"], key=lambda category: category["id"])
    return coco_gt, [str(category.get("name", category["id"])) for category in categories]


def load_results(path: str | os.PathLike, coco_gt: COCO, ann_file: str | os.PathLike) -> list[dict]:
    """COCO result entries from `path` (coco_results.json, or the folder holding it), checked
    against the ground truth: every image and category must be in `ann_file`."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; give the folder `retinanet eval` wrote, or its {RESULTS_FILE}")
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(results, list):
        raise ValueError(f"{path}: expected a list of COCO result entries, got {type(results).__name__}")
    image_ids, category_ids = set(coco_gt.imgs), set(coco_gt.cats)
    for entry in results:
        if not isinstance(entry, dict) or not {"image_id", "category_id", "bbox", "score"} <= set(entry):
            raise ValueError(f"{path}: not a COCO detection result entry: {entry!r}")
        if entry["image_id"] not in image_ids:
            raise ValueError(f"{path}: image {entry['image_id']} is not in {ann_file}; is it the ground truth these "
                             "results were computed on?")
        if entry["category_id"] not in category_ids:
            raise ValueError(f"{path}: category {entry['category_id']} is not in {ann_file}; is it the ground truth "
                             "these results were computed on?")
    return results


def analyze_errors(
    coco_gt: COCO, results: list[dict], image_ids: list[int], class_names: list[str], output_dir: str | os.PathLike
) -> dict[str, Any]:
    """Write the error analysis of `results` to `output_dir` and log its table.

    Writes tide.json (see `tide_errors`) and pr_curves.json (see `precision_recall_curves`); with
    matplotlib, also tide.png (the dAP bar chart) and pr_curves/<class>.png. Without it, a warning
    says how to get the pictures.

    Returns:
        the TIDE summary.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = tide_errors(coco_gt, results, image_ids, class_names)
    curves = precision_recall_curves(coco_gt, results, image_ids, class_names)
    (output_dir / TIDE_FILE).write_text(json.dumps(summary, indent=2))
    (output_dir / PR_FILE).write_text(json.dumps(curves))
    if summary["AP50"] is None:
        logger.warning("no object in the %d evaluated images: the TIDE error types are undefined", len(image_ids))
    logger.info(
        "TIDE errors (docs/errors.md) on %d images, %d detections, %d objects: AP50 and the AP50 gained by "
        "fixing each error type (dAP, 0..1):\n%s",
        summary["num_images"], summary["num_detections"], summary["num_objects"], format_tide_table(summary),
    )
    written = [output_dir / TIDE_FILE, output_dir / PR_FILE]
    try:
        # matplotlib is an optional extra: without it the numbers above are the whole analysis.
        plots = importlib.import_module("retinanet.engine.error_plots")
    except ImportError as err:
        logger.warning("no pictures: %s; the numbers are in %s and %s. For the pictures: %s",
                       err, output_dir / TIDE_FILE, output_dir / PR_FILE, PLOTS_HINT)
    else:
        written.append(plots.plot_tide(summary, output_dir / TIDE_PLOT))
        written += plots.plot_pr_curves(curves, output_dir / PR_DIR)
    logger.info("wrote the error analysis to %s (%d files)", output_dir, len(written))
    return summary


def analyze_results_file(
    results_path: str | os.PathLike, ann_file: str | os.PathLike, output_dir: str | os.PathLike | None = None
) -> dict[str, Any]:
    """`analyze_errors` of a coco_results.json (or the folder holding it) against `ann_file`, over
    every image of `ann_file` (what `retinanet eval` evaluates).

    Args:
        output_dir: default: an "analysis" folder beside the results file.
    """
    coco_gt, class_names = load_ground_truth(ann_file)
    results = load_results(results_path, coco_gt, ann_file)
    results_path = Path(results_path)
    if output_dir is None:
        output_dir = (results_path if results_path.is_dir() else results_path.parent) / ANALYSIS_DIR
    return analyze_errors(coco_gt, results, sorted(coco_gt.imgs), class_names, output_dir)


def safe_file_name(name: str) -> str:
    """A class name as a file name: runs of characters other than letters, digits, '.', '-', '_'
    become one '_' ("traffic light" -> "traffic_light")."""
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "class"
