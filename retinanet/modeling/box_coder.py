"""The R-CNN box parametrisation: (dx, dy, dw, dh) of a box relative to its anchor."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class BoxCoder:
    """Encode ground-truth boxes against anchors and decode predicted deltas back to boxes.

    dx = wx * (gx - ax) / aw,  dy = wy * (gy - ay) / ah,  dw = ww * log(gw / aw),  dh = wh * log(gh / ah)
    with (x, y) box centres and (w, h) sizes; boxes are xyxy in absolute pixels of the padded batch.

    Args:
        weights: (wx, wy, ww, wh); (1, 1, 1, 1) in the paper.
        scale_clamp: dw, dh are clamped to this before exp() on decode, so a wild prediction cannot
            overflow (log(1000 / 16): no box grows more than 62x its anchor).
    """

    def __init__(self, weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0), scale_clamp: float = math.log(1000.0 / 16)):
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, gt_boxes: Tensor, anchors: Tensor) -> Tensor:
        """(..., 4) xyxy ground truth and broadcastable (..., 4) xyxy anchors -> (..., 4) deltas."""
        wx, wy, ww, wh = self.weights
        anchor_w = anchors[..., 2] - anchors[..., 0]
        anchor_h = anchors[..., 3] - anchors[..., 1]
        anchor_x = anchors[..., 0] + 0.5 * anchor_w
        anchor_y = anchors[..., 1] + 0.5 * anchor_h
        gt_w = gt_boxes[..., 2] - gt_boxes[..., 0]
        gt_h = gt_boxes[..., 3] - gt_boxes[..., 1]
        gt_x = gt_boxes[..., 0] + 0.5 * gt_w
        gt_y = gt_boxes[..., 1] + 0.5 * gt_h
        return torch.stack(
            (
                wx * (gt_x - anchor_x) / anchor_w,
                wy * (gt_y - anchor_y) / anchor_h,
                ww * torch.log(gt_w / anchor_w),
                wh * torch.log(gt_h / anchor_h),
            ),
            dim=-1,
        )

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """(..., 4) deltas and broadcastable (..., 4) xyxy anchors -> (..., 4) xyxy boxes."""
        wx, wy, ww, wh = self.weights
        anchors = anchors.to(deltas.dtype)
        anchor_w = anchors[..., 2] - anchors[..., 0]
        anchor_h = anchors[..., 3] - anchors[..., 1]
        anchor_x = anchors[..., 0] + 0.5 * anchor_w
        anchor_y = anchors[..., 1] + 0.5 * anchor_h
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[..., 3] / wh).clamp(max=self.scale_clamp)
        centre_x = dx * anchor_w + anchor_x
        centre_y = dy * anchor_h + anchor_y
        half_w = 0.5 * torch.exp(dw) * anchor_w
        half_h = 0.5 * torch.exp(dh) * anchor_h
        return torch.stack((centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h), dim=-1)
