"""Small-function bugs (issue 8, item 5), each pinned with hand-made numbers."""

import json
import logging
import math

import pytest
import torch
import torchvision

from retinanet.modeling import AnchorGenerator, BoxCoder, PostProcessor
from retinanet.modeling.losses import softmax_focal_loss
from retinanet.modeling.matcher import BACKGROUND, Matcher, pairwise_iou
from retinanet.engine.evaluator import STAT_NAMES
from test_evaluator import ground_truth_detections, run_evaluate

# ----------------------------------------------------------------------------------------------
# a. softmax_focal_loss: ignored entries contribute exactly nothing, even non-finite ones.


@pytest.mark.parametrize("bad_logit", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_softmax_focal_loss_ignores_non_finite_logits_of_ignored_entries(bad_logit, reduction):
    logits = torch.tensor([[2.0, -1.0, 0.5], [bad_logit, 0.0, 1.0], [0.1, 0.2, 3.0], [-2.0, 1.5, 0.0]])
    targets = torch.tensor([0, -100, 2, 1])
    alpha = torch.tensor([0.25, 0.5, 1.0])
    logits.requires_grad_()
    loss = softmax_focal_loss(logits, targets, alpha=alpha, gamma=2.0, reduction=reduction)
    (grad,) = torch.autograd.grad(loss.sum(), logits)

    valid = torch.tensor([0, 2, 3])
    ref_logits = logits.detach()[valid].requires_grad_()
    ref = softmax_focal_loss(ref_logits, targets[valid], alpha=alpha, gamma=2.0, reduction=reduction)
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_logits)
    if reduction == "none":
        assert loss[1].item() == 0.0
        torch.testing.assert_close(loss[valid], ref)
    else:
        torch.testing.assert_close(loss, ref)
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[1], torch.zeros(3))
    torch.testing.assert_close(grad[valid], ref_grad)


def test_softmax_focal_loss_reference_numbers_unchanged():
    """p_t = softmax([2, 0, 0])[0] = e^2 / (e^2 + 2); FL = -(1 - p_t)^2 log p_t."""
    p_t = math.exp(2) / (math.exp(2) + 2)
    loss = softmax_focal_loss(torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([0, -100]))
    assert loss.item() == pytest.approx(-((1 - p_t) ** 2) * math.log(p_t), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# b. Matcher with zero anchors.


@pytest.mark.parametrize("low_quality", [False, True])
@pytest.mark.parametrize("num_boxes", [0, 2])
def test_matcher_with_zero_anchors_is_all_background(low_quality, num_boxes):
    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=low_quality)
    gt_boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 30.0]])[:num_boxes].expand(3, -1, -1)
    gt_valid = torch.ones(3, num_boxes, dtype=torch.bool)
    crowd = torch.tensor([[[0.0, 0.0, 50.0, 50.0]]]).expand(3, -1, -1)
    for crowd_boxes, crowd_valid in ((None, None), (crowd, torch.ones(3, 1, dtype=torch.bool))):
        matched_idx, labels = matcher(torch.zeros(0, 4), gt_boxes, gt_valid, crowd_boxes, crowd_valid)
        assert matched_idx.shape == (3, 0) and matched_idx.dtype == torch.int64
        assert labels.shape == (3, 0) and labels.dtype == torch.int8
    if num_boxes:
        matched_idx, labels = matcher.match_iou(torch.zeros(3, num_boxes, 0), gt_valid)
        assert matched_idx.shape == (3, 0) and labels.shape == (3, 0)


def test_matcher_still_matches_with_anchors_after_the_zero_anchor_fix():
    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]])
    matched_idx, labels = matcher(anchors, torch.tensor([[[0.0, 0.0, 10.0, 20.0]]]), torch.ones(1, 1, dtype=torch.bool))
    assert labels.tolist() == [[1, BACKGROUND]]  # IoU 0.5 -> foreground; 0 -> background


# ----------------------------------------------------------------------------------------------
# c. PostProcessor drops boxes that clip to zero width or height.


def outputs_with_degenerate_boxes():
    """One level, one class, four anchors all scoring 0.9 in a 20 x 20 image.

    Anchor 0 moves 10 widths right (x 100..110: clipped to 20..20), anchor 1 has infinite deltas,
    anchor 2 moves 10 heights up (y -100..-90: clipped to the line y = 0), anchor 3 is a normal box.
    """
    logit = math.log(0.9 / 0.1)
    cls = [torch.full((1, 4, 1), logit)]
    deltas = torch.tensor([[10.0, 0.0, 0.0, 0.0], [math.inf, 0.0, 0.0, 0.0], [0.0, -10.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0]])]
    return cls, [deltas[None]], anchors


def test_postprocess_drops_boxes_that_clip_to_zero_area():
    post = PostProcessor(BoxCoder(), score_thresh=0.05, topk_candidates=10, nms_thresh=0.5, detections_per_image=10)
    cls, box, anchors = outputs_with_degenerate_boxes()
    (detections,) = post(cls, box, anchors, [(20, 20)])
    torch.testing.assert_close(detections["boxes"], torch.tensor([[5.0, 5.0, 15.0, 15.0]]))
    torch.testing.assert_close(detections["scores"], torch.tensor([0.9]))
    # The fixed-shape path (export) keeps every candidate but zeroes the degenerate ones' scores.
    boxes, scores, _ = post.candidates(cls, box, anchors, torch.tensor([[20, 20]]), fixed_shapes=True)
    assert boxes.shape == (1, 4, 4)
    widths, heights = boxes[0, :, 2] - boxes[0, :, 0], boxes[0, :, 3] - boxes[0, :, 1]
    assert torch.equal(scores[0] > 0, (widths > 0) & (heights > 0))
    assert (scores[0] > 0).sum() == 1


# ----------------------------------------------------------------------------------------------
# d. pairwise_iou: integer and half-precision boxes, like torchvision's box_iou.


def iou_inputs(dtype):
    # Coordinates ~1000: areas ~1e6 overflow float16 (max 65504). Integers <= 2048 are exact in fp16.
    boxes = torch.tensor([[0, 0, 1000, 1000], [500, 500, 1500, 1400], [10, 20, 30, 60]], dtype=dtype)
    anchors = torch.tensor([[0, 0, 1000, 1000], [0, 0, 2000, 2000], [900, 900, 1000, 1200], [10, 20, 30, 40]], dtype=dtype)
    return boxes, anchors


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float16, torch.bfloat16, torch.float32])
def test_pairwise_iou_equals_box_iou_for_int_and_half_boxes(dtype):
    boxes, anchors = iou_inputs(dtype)
    expected = torchvision.ops.box_iou(boxes, anchors)
    ours = pairwise_iou(boxes, anchors)
    assert ours.dtype == expected.dtype == torch.float32
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    assert ours[0, 0].item() == 1.0 and ours[0, 1].item() == 0.25  # 1000^2 / 2000^2


# ----------------------------------------------------------------------------------------------
# e. AnchorGenerator: one grid size per level.


@pytest.mark.parametrize("num_grids", [4, 6])
def test_anchor_generator_needs_one_grid_size_per_level(num_grids):
    generator = AnchorGenerator([32.0, 64.0, 128.0, 256.0, 512.0], [1.0], [1.0], [8, 16, 32, 64, 128])
    grids = [(2, 2)] * num_grids
    with pytest.raises(ValueError, match=rf"{num_grids} grid sizes for 5 levels"):
        generator(grids)
    with pytest.raises(ValueError, match=rf"{num_grids} grid sizes for 5 levels"):
        generator.num_anchors(grids)
    assert generator([(2, 2)] * 5).shape == (5 * 4, 4)


# ----------------------------------------------------------------------------------------------
# f. COCO metrics that pycocotools cannot define are None, not 0.0.

SMALL_AND_MEDIUM = [("a.png", 64, 64, [(1, [10, 10, 40, 40]), (3, [2, 2, 10, 10])])]  # no large box, no bird


def test_undefined_area_range_and_class_are_none_in_metrics_and_json(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="retinanet.engine.evaluator"):
        metrics, _, _ = run_evaluate(tmp_path, lambda ds: ground_truth_detections(ds, SMALL_AND_MEDIUM), SMALL_AND_MEDIUM)
    assert metrics["APl"] is None and metrics["ARl"] is None
    assert metrics["AP"] == pytest.approx(1.0) and metrics["APs"] == pytest.approx(1.0)
    assert metrics["per_class_AP"]["bird"] is None and metrics["per_class_AP"]["cat"] == pytest.approx(1.0)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["APl"] is None and written["per_class_AP"]["bird"] is None
    assert "null" in (tmp_path / "out" / "metrics.json").read_text()
    table = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("per-class AP"))
    assert "n/a" in table and "bird" in table


def test_detections_that_miss_give_a_real_zero(tmp_path):
    def far_away(dataset):
        return [{"boxes": torch.tensor([[50.0, 50.0, 60.0, 60.0]]), "scores": torch.tensor([0.9]),
                 "labels": torch.tensor([0])}]

    metrics, _, _ = run_evaluate(tmp_path, far_away, SMALL_AND_MEDIUM)
    assert metrics["AP"] == 0.0 and metrics["APs"] == 0.0 and metrics["AR100"] == 0.0
    assert metrics["APl"] is None
    assert metrics["per_class_AP"] == {"cat": 0.0, "dog": 0.0, "bird": None}


def test_no_detections_with_annotations_is_zero_where_defined(tmp_path):
    def nothing(dataset):
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}]

    metrics, _, _ = run_evaluate(tmp_path, nothing, SMALL_AND_MEDIUM)
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0 and metrics["APm"] == 0.0
    assert metrics["APl"] is None and metrics["ARl"] is None
    assert metrics["per_class_AP"] == {"cat": 0.0, "dog": 0.0, "bird": None}


def test_no_annotations_at_all_makes_every_metric_none(tmp_path):
    images = [("a.png", 64, 64, [])]

    def some_box(dataset):
        return [{"boxes": torch.tensor([[1.0, 1.0, 20.0, 20.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}]

    metrics, _, _ = run_evaluate(tmp_path, some_box, images)
    assert all(metrics[name] is None for name in STAT_NAMES)
    assert metrics["per_class_AP"] == {"cat": None, "dog": None, "bird": None}
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["AP"] is None
