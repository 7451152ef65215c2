"""Anchor-to-ground-truth assignment by IoU thresholds, batched over images."""

from __future__ import annotations

import torch
from torch import Tensor

from .blocks import anchor_blocks

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
        # No box, or no anchor (an empty feature map): every anchor, if any, is background; the
        # low-quality pass below would take a max over an empty anchor dimension.
        if max_boxes == 0 or num_anchors == 0:
            zeros = torch.zeros(batch_size, num_anchors, dtype=torch.int64, device=anchors.device)
            labels = zeros.to(torch.int8)
            return zeros, self._ignore_crowd(labels, anchors, crowd_boxes, crowd_valid)
        boxes = gt_boxes.reshape(-1, 4).float()
        columns = anchors.float().t().contiguous()  # (4, A) rows x1, y1, x2, y2: vectorised broadcasts
        areas = (columns[2] - columns[0]) * (columns[3] - columns[1])
        not_valid = ~gt_valid[:, :, None]
        # (B, M, A) IoU block by block (see blocks.py); each box's best IoU needs every block first,
        # so the low-quality ties are a second pass.
        blocks = anchor_blocks(num_anchors, 4 * batch_size * max_boxes, anchors.device)

        def iou_block(block: slice) -> Tensor:  # (B, M, block), -1 for padded boxes
            iou = _iou_with_columns(boxes, columns[:, block], areas[block])
            return iou.view(batch_size, max_boxes, -1).masked_fill_(not_valid, -1.0)

        best_iou, matched_idx, best_per_box, iou = [], [], None, None
        for block in blocks:
            iou = iou_block(block)
            values, indices = iou.max(dim=1)
            best_iou.append(values), matched_idx.append(indices)
            if self.allow_low_quality_matches:
                block_best = iou.amax(dim=2)
                best_per_box = block_best if best_per_box is None else torch.maximum(best_per_box, block_best)
        low_quality = None
        if self.allow_low_quality_matches:  # a second pass: the ties with each box's overall best
            low_quality = torch.cat([
                _ties_with_best(iou if len(blocks) == 1 else iou_block(block), best_per_box, gt_valid)
                for block in blocks
            ], dim=1)
        return self._label(
            torch.cat(best_iou, 1), torch.cat(matched_idx, 1), low_quality, anchors, crowd_boxes, crowd_valid
        )

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
        low_quality = None
        if self.allow_low_quality_matches and iou.shape[2] > 0:  # amax over zero anchors is an error
            low_quality = _ties_with_best(iou, iou.amax(dim=2), gt_valid)
        return self._label(best_iou, matched_idx, low_quality, anchors, crowd_boxes, crowd_valid)

    def _label(
        self,
        best_iou: Tensor,
        matched_idx: Tensor,
        low_quality: Tensor | None,
        anchors: Tensor | None,
        crowd_boxes: Tensor | None,
        crowd_valid: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """(B, A) best IoU over boxes, its box, and the low-quality matches (or None) -> see __call__."""
        # torch.where / masked_fill rather than boolean-index assignment: no host-device sync.
        labels = torch.full_like(matched_idx, IGNORE, dtype=torch.int8)
        labels = labels.masked_fill(best_iou < self.bg_iou_thresh, BACKGROUND)
        labels = labels.masked_fill(best_iou >= self.fg_iou_thresh, FOREGROUND)
        if low_quality is not None:
            # Anchors tied for a box's best IoU become foreground, keeping their own best box as
            # torchvision does.
            labels = labels.masked_fill(low_quality, FOREGROUND)
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
        ioa = ioa.view(batch_size, num_crowd, anchors.shape[0]).masked_fill(~crowd_valid[:, :, None], 0.0)
        in_crowd = ioa.max(dim=1).values > self.crowd_ioa_thresh
        return labels.masked_fill(in_crowd & (labels != FOREGROUND), IGNORE)


def intersection_over_anchor(regions: Tensor, anchors: Tensor) -> Tensor:
    """(R, 4) and (A, 4) xyxy -> (R, A) area of the intersection divided by the anchor's area."""
    top_left = torch.max(regions[:, None, :2], anchors[None, :, :2])
    bottom_right = torch.min(regions[:, None, 2:], anchors[None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    anchor_area = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    return intersection / anchor_area.clamp(min=1e-6)[None, :]


def _ties_with_best(iou: Tensor, best_per_box: Tensor, gt_valid: Tensor) -> Tensor:
    """(B, M, A) IoU, (B, M) each box's best IoU -> (B, A): the anchor ties some box's best.

    A best IoU of 0 would make every anchor "best": such a box claims nothing.
    """
    usable = ((best_per_box > 0) & gt_valid)[:, :, None]
    return ((iou == best_per_box[:, :, None]) & usable).any(dim=1)


@torch.no_grad()
def pairwise_iou(boxes: Tensor, anchors: Tensor) -> Tensor:
    """(N, 4) and (A, 4) xyxy -> (N, A) IoU, bit-equal to torchvision's box_iou for float32 / float64.

    Integer, float16 and bfloat16 boxes are computed in float32 and give float32, the dtype box_iou
    returns for them: an area of a 1000 px box (1e6) overflows float16 (max 65504). box_iou
    subtracts half-precision coordinates before upcasting, so for those the two may differ in the
    last float32 bits.
    """
    if boxes.dtype not in (torch.float32, torch.float64) or anchors.dtype not in (torch.float32, torch.float64):
        boxes, anchors = boxes.float(), anchors.float()
    columns = anchors.t().contiguous()
    return _iou_with_columns(boxes, columns, (columns[2] - columns[0]) * (columns[3] - columns[1]))


def _iou_with_columns(boxes: Tensor, columns: Tensor, areas: Tensor) -> Tensor:
    """(N, 4) boxes, anchors as (4, A) rows x1, y1, x2, y2 and their (A,) areas -> (N, A) IoU.

    Three (N, A) buffers instead of box_iou's ~10 (N, A)-sized temporaries; the same operations in
    the same order, so the same bits.
    """
    x1, y1, x2, y2 = boxes[:, 0:1], boxes[:, 1:2], boxes[:, 2:3], boxes[:, 3:4]
    inter = torch.minimum(x2, columns[2])
    scratch = torch.maximum(x1, columns[0])
    inter.sub_(scratch).clamp_(min=0)
    height = torch.minimum(y2, columns[3])
    torch.maximum(y1, columns[1], out=scratch)
    inter.mul_(height.sub_(scratch).clamp_(min=0))
    box_areas = (x2 - x1) * (y2 - y1)
    union = torch.add(box_areas, areas, out=scratch).sub_(inter)
    return inter.div_(union)
