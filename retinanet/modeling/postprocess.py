"""Detections from head outputs: per-level top-k, score threshold, decode, clip, class-aware NMS."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import nms

from .box_coder import BoxCoder

# Detections narrower or shorter than this (px of the resized image, after clipping) are dropped:
# a prediction outside the image clips to a line of zero area, which is no detection. torchvision's
# detectors use the same 1e-2 in remove_small_boxes.
MIN_BOX_SIZE = 1e-2


class PostProcessor:
    """Top-k, threshold and decoding batched over images; then one NMS call per image, whatever the
    number of classes (`class_aware_nms`). Boxes that clip to (nearly) zero width or height are
    dropped (see MIN_BOX_SIZE).

    Args:
        box_coder: decodes deltas against anchors.
        score_thresh: candidates need sigmoid score > this (0.05).
        topk_candidates: at most this many (anchor, class) candidates per level and image (1000).
        nms_thresh: IoU of class-aware NMS (0.5).
        detections_per_image: kept after NMS, best first (100).
    """

    def __init__(
        self,
        box_coder: BoxCoder,
        score_thresh: float = 0.05,
        topk_candidates: int = 1000,
        nms_thresh: float = 0.5,
        detections_per_image: int = 100,
    ):
        self.box_coder = box_coder
        self.score_thresh = score_thresh
        self.topk_candidates = topk_candidates
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image

    def candidates(
        self, cls_per_level: list[Tensor], box_per_level: list[Tensor], anchors_per_level: list[Tensor],
        image_sizes: Tensor, fixed_shapes: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k (anchor, class) pairs of every level, decoded and clipped.

        Args:
            cls_per_level: per level (B, A_l, K) logits.
            box_per_level: per level (B, A_l, 4) deltas.
            anchors_per_level: per level (A_l, 4) xyxy.
            image_sizes: (B, 2) (height, width) of each resized image, for clipping.
            fixed_shapes: True: N = sum_l min(topk, A_l * K), whatever the scores (what export traces).
                False: one host sync sizes each level's top-k by the anchors that can pass score_thresh,
                which is much cheaper when few do; the pairs above the threshold are the same.
        Returns:
            boxes (B, N, 4) xyxy, scores (B, N), labels (B, N); scores at or below score_thresh, and
            those of boxes whose clipped width or height is at most MIN_BOX_SIZE, are set to 0.
        """
        # A pair in an image's top k has fewer than k pairs above it, so its anchor is among the k
        # anchors of highest max-logit: top-k over (B, A_l) then over (B, k * K), instead of over
        # all (B, A_l * K) pairs; sigmoid (monotonic) only for the winners.
        max_logits = [logits.amax(dim=2) for logits in cls_per_level]
        if fixed_shapes:
            anchors_to_keep = [min(self.topk_candidates, m.shape[1]) for m in max_logits]
        else:
            anchors_to_keep = self._anchors_that_can_pass(max_logits)
        max_xy = image_sizes.flip(1).repeat(1, 2)[:, None, :].to(torch.float32)  # (B, 1, 4): w, h, w, h
        all_boxes, all_scores, all_labels = [], [], []
        for logits, deltas, anchors, level_max, num_anchors in zip(
            cls_per_level, box_per_level, anchors_per_level, max_logits, anchors_to_keep
        ):
            num_classes = logits.shape[2]
            top_anchors = level_max.topk(num_anchors, dim=1).indices  # (B, k)
            top_logits = logits.gather(1, top_anchors[..., None].expand(-1, -1, num_classes)).flatten(1)
            top_logits, top_idx = top_logits.topk(min(self.topk_candidates, top_logits.shape[1]), dim=1)
            top_scores = torch.sigmoid(top_logits.float())
            anchor_idx = top_anchors.gather(1, top_idx // num_classes)
            boxes = self.box_coder.decode(
                deltas.gather(1, anchor_idx[..., None].expand(-1, -1, 4)).float(), anchors[anchor_idx]
            )
            boxes = torch.min(boxes.clamp(min=0), max_xy)
            # A score of 0 rather than boolean indexing keeps the shapes fixed; written as "> min"
            # so that a NaN box fails too.
            sizes_ok = ((boxes[..., 2:] - boxes[..., :2]) > MIN_BOX_SIZE).all(dim=-1)
            all_boxes.append(boxes)
            all_scores.append(torch.where((top_scores > self.score_thresh) & sizes_ok, top_scores, 0.0))
            all_labels.append(top_idx % num_classes)
        return torch.cat(all_boxes, 1), torch.cat(all_scores, 1), torch.cat(all_labels, 1)

    def _anchors_that_can_pass(self, max_logits: list[Tensor]) -> list[int]:
        """Per level, the anchors to keep so that every pair above score_thresh is among them.

        The bound sits a little below logit(score_thresh), so rounding in sigmoid cannot drop a pair
        that passes; the extra anchors it may admit are zeroed by the threshold like any other.
        """
        if self.score_thresh <= 0:
            bound = -math.inf
        elif self.score_thresh >= 1:
            bound = math.inf
        else:
            bound = math.log(self.score_thresh / (1 - self.score_thresh)) - 1e-3
        counts = torch.stack([(m.float() > bound).sum(dim=1).amax() for m in max_logits]).tolist()
        return [max(1, min(self.topk_candidates, count)) for count in counts]

    def __call__(
        self, cls_per_level: list[Tensor], box_per_level: list[Tensor], anchors_per_level: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Returns per image {"boxes": (D, 4) xyxy of the resized image, "scores": (D,), "labels": (D,) int64}."""
        device = cls_per_level[0].device
        sizes = torch.tensor(image_sizes, device=device)
        return self.select(*self.candidates(cls_per_level, box_per_level, anchors_per_level, sizes, fixed_shapes=False))

    def select(self, boxes: Tensor, scores: Tensor, labels: Tensor) -> list[dict[str, Tensor]]:
        """The detections among `candidates`' output: scores above score_thresh, class-aware NMS per
        image, at most detections_per_image, best first.

        Args:
            boxes (B, N, 4), scores (B, N), labels (B, N): as `candidates` returns them.
        Returns:
            per image {"boxes": (D, 4), "scores": (D,), "labels": (D,) int64}.
        """
        keep = scores > self.score_thresh
        counts = keep.sum(dim=1).tolist()  # a host sync: how many candidates per image
        boxes, scores, labels = boxes[keep].split(counts), scores[keep].split(counts), labels[keep].split(counts)
        results = []
        for image_boxes, image_scores, image_labels in zip(boxes, scores, labels):
            kept = class_aware_nms(image_boxes, image_scores, image_labels, self.nms_thresh)
            kept = kept[: self.detections_per_image]
            results.append({"boxes": image_boxes[kept], "scores": image_scores[kept], "labels": image_labels[kept]})
        return results


def class_aware_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_thresh: float) -> Tensor:
    """torchvision's batched_nms(boxes, scores, groups) as ONE nms call, whatever the number of groups
    (classes; image * K + class in the exported graph; images in OHEM).

    batched_nms falls back to a Python loop over the groups present (one kernel launch and host sync
    each) above a few thousand boxes, which an untrained model reaches at once; here each group is
    shifted to its own region instead, in float64 so that the shift keeps every coordinate exact
    (ONNX's NonMaxSuppression casts them back to float32). Traceable: no Python branch on values.

    Args:
        boxes: (N, 4) xyxy; scores: (N,); groups: (N,) int64 group of each box.
    Returns:
        (D,) int64 indices of the kept boxes, by decreasing score.
    """
    boxes64 = boxes.to(torch.float64)
    # Shifts of (max coordinate + 1) per group, as batched_nms's own coordinate trick; the appended
    # 0 keeps max() defined when there is no candidate.
    span = torch.cat([boxes64.reshape(-1), boxes64.new_zeros(1)]).max() + 1
    return nms(boxes64 + (groups.to(torch.float64) * span)[:, None], scores.to(torch.float64), iou_thresh)
