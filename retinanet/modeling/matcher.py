"""Anchor-to-ground-truth assignment by IoU thresholds, batched over images."""

from __future__ import annotations

import torch
from torch import Tensor

# Values of the per-anchor label returned by the matcher.
FOREGROUND = 1
BACKGROUND = 0
IGNORE = -1


class Matcher:
    """Label each anchor foreground, background or ignored from its IoU with the ground truth.

    IoU >= fg_iou_thresh with some box: foreground, assigned to the box of highest IoU.
    IoU < bg_iou_thresh with every box: background. In between: ignored (no loss).

    Args:
        fg_iou_thresh: 0.5 in the paper.
        bg_iou_thresh: 0.4 in the paper.
        allow_low_quality_matches: each box also claims the anchors of its highest IoU even below
            fg_iou_thresh (torchvision, detectron2); a box whose best IoU is 0 claims nothing.
        crowd_ioa_thresh: non-foreground anchors with more than this fraction of their area inside
            a crowd box are ignored.
    """

    def __init__(
        self,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.4,
        allow_low_quality_matches: bool = False,
        crowd_ioa_thresh: float = 0.5,
    ):
        if not 0 <= bg_iou_thresh <= fg_iou_thresh <= 1:
            raise ValueError(f"need 0 <= bg_iou_thresh ({bg_iou_thresh}) <= fg_iou_thresh ({fg_iou_thresh}) <= 1")
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.allow_low_quality_matches = allow_low_quality_matches
        self.crowd_ioa_thresh = crowd_ioa_thresh

    def __call__(
        self,
        anchors: Tensor,
        gt_boxes: Tensor,
        gt_valid: Tensor,
        crowd_boxes: Tensor | None = None,
        crowd_valid: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Match a batch.

        Args:
            anchors: (A, 4) xyxy, shared by every image of the padded batch.
            gt_boxes: (B, M, 4) xyxy, padded; rows where gt_valid is False are ignored.
            gt_valid: (B, M) bool.
            crowd_boxes: (B, C, 4) xyxy crowd regions, padded like gt_boxes, or None.
            crowd_valid: (B, C) bool.
        Returns:
            matched_idx: (B, A) int64 index of the assigned box, 0 where label != FOREGROUND.
            labels: (B, A) int8 FOREGROUND, BACKGROUND or IGNORE.
        """
        batch_size, max_boxes = gt_valid.shape
        num_anchors = anchors.shape[0]
        if max_boxes == 0:
            zeros = torch.zeros(batch_size, num_anchors, dtype=torch.int64, device=anchors.device)
            labels = zeros.to(torch.int8)
            return zeros, self._ignore_crowd(labels, anchors, crowd_boxes, crowd_valid)
        iou = pairwise_iou(gt_boxes.reshape(-1, 4).float(), anchors.float()).view(batch_size, max_boxes, num_anchors)
        iou.masked_fill_(~gt_valid[:, :, None], -1.0)
        return self.match_iou(iou, gt_valid, anchors, crowd_boxes, crowd_valid)

    def match_iou(
        self,
        iou: Tensor,
        gt_valid: Tensor,
        anchors: Tensor | None = None,
        crowd_boxes: Tensor | None = None,
        crowd_valid: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Match from a precomputed (B, M, A) IoU matrix (-1 for padded boxes). See __call__."""
        best_iou, matched_idx = iou.max(dim=1)  # (B, A)
        # torch.where / masked_fill rather than boolean-index assignment: no host-device sync.
        labels = torch.full_like(matched_idx, IGNORE, dtype=torch.int8)
        labels = labels.masked_fill(best_iou < self.bg_iou_thresh, BACKGROUND)
        labels = labels.masked_fill(best_iou >= self.fg_iou_thresh, FOREGROUND)
        if self.allow_low_quality_matches:
            # Anchors tied for a box's best IoU become foreground, keeping their own best box as
            # torchvision does. A best IoU of 0 would make every anchor "best": skip that box.
            best_per_box = iou.max(dim=2, keepdim=True).values  # (B, M, 1)
            is_best = (iou == best_per_box) & (best_per_box > 0) & gt_valid[:, :, None]
            labels = labels.masked_fill(is_best.any(dim=1), FOREGROUND)
        if anchors is not None:
            labels = self._ignore_crowd(labels, anchors, crowd_boxes, crowd_valid)
        matched_idx = matched_idx.masked_fill(labels != FOREGROUND, 0)
        return matched_idx, labels

    def _ignore_crowd(
        self, labels: Tensor, anchors: Tensor, crowd_boxes: Tensor | None, crowd_valid: Tensor | None
    ) -> Tensor:
        if crowd_boxes is None or crowd_boxes.shape[1] == 0:
            return labels
        batch_size, num_crowd = crowd_boxes.shape[:2]
        ioa = intersection_over_anchor(crowd_boxes.reshape(-1, 4).float(), anchors.float())
        ioa = ioa.view(batch_size, num_crowd, -1).masked_fill(~crowd_valid[:, :, None], 0.0)
        in_crowd = ioa.max(dim=1).values > self.crowd_ioa_thresh
        return labels.masked_fill(in_crowd & (labels != FOREGROUND), IGNORE)


def intersection_over_anchor(regions: Tensor, anchors: Tensor) -> Tensor:
    """(R, 4) and (A, 4) xyxy -> (R, A) area of the intersection divided by the anchor's area."""
    top_left = torch.max(regions[:, None, :2], anchors[None, :, :2])
    bottom_right = torch.min(regions[:, None, 2:], anchors[None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    anchor_area = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    return intersection / anchor_area.clamp(min=1e-6)[None, :]


@torch.no_grad()
def pairwise_iou(boxes: Tensor, anchors: Tensor) -> Tensor:
    """(N, 4) and (A, 4) xyxy -> (N, A) IoU, bit-equal to torchvision's box_iou.

    Three (N, A) buffers instead of box_iou's ~10 (N, A)-sized temporaries: at B x 50 boxes and
    ~200k anchors each is 40 MB per image, and allocating them costs more than the arithmetic.
    """
    inter = torch.minimum(boxes[:, None, 2], anchors[None, :, 2])
    scratch = torch.maximum(boxes[:, None, 0], anchors[None, :, 0])
    inter.sub_(scratch).clamp_(min=0)
    height = torch.minimum(boxes[:, None, 3], anchors[None, :, 3])
    torch.maximum(boxes[:, None, 1], anchors[None, :, 1], out=scratch)
    inter.mul_(height.sub_(scratch).clamp_(min=0))
    area_boxes = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_anchors = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    union = torch.add(area_boxes[:, None], area_anchors[None, :], out=scratch).sub_(inter)
    return inter.div_(union)
