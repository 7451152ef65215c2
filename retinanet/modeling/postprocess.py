"""Detections from head outputs: per-level top-k, score threshold, decode, clip, class-aware NMS."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from .box_coder import BoxCoder


class PostProcessor:
    """Batched over images; one NMS call for the whole batch.

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
        image_sizes: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k (anchor, class) pairs of every level, decoded and clipped; fixed shapes.

        Args:
            cls_per_level: per level (B, A_l, K) logits.
            box_per_level: per level (B, A_l, 4) deltas.
            anchors_per_level: per level (A_l, 4) xyxy.
            image_sizes: (B, 2) (height, width) of each resized image, for clipping.
        Returns:
            boxes (B, N, 4) xyxy, scores (B, N), labels (B, N) with N = sum_l min(topk, A_l * K);
            scores at or below score_thresh are set to 0.
        """
        all_boxes, all_scores, all_labels = [], [], []
        max_xy = image_sizes.flip(1).repeat(1, 2)[:, None, :].to(torch.float32)  # (B, 1, 4): w, h, w, h
        for logits, deltas, anchors in zip(cls_per_level, box_per_level, anchors_per_level):
            num_anchors, num_classes = logits.shape[1:]
            # A pair in an image's top k has fewer than k pairs above it, so its anchor is among the k
            # anchors of highest max-logit: top-k over (B, A_l) then over (B, k * K), instead of over
            # all (B, A_l * K) pairs; sigmoid (monotonic) only for the winners.
            top_anchors = logits.amax(dim=2).topk(min(self.topk_candidates, num_anchors), dim=1).indices
            top_logits = logits.gather(1, top_anchors[..., None].expand(-1, -1, num_classes)).flatten(1)
            num_topk = min(self.topk_candidates, num_anchors * num_classes)
            top_logits, top_idx = top_logits.topk(num_topk, dim=1)
            top_scores = torch.sigmoid(top_logits.float())
            anchor_idx = top_anchors.gather(1, top_idx // num_classes)
            boxes = self.box_coder.decode(
                deltas.float().gather(1, anchor_idx[..., None].expand(-1, -1, 4)), anchors[anchor_idx]
            )
            all_boxes.append(torch.min(boxes.clamp(min=0), max_xy))
            all_scores.append(torch.where(top_scores > self.score_thresh, top_scores, 0.0))
            all_labels.append(top_idx % num_classes)
        return torch.cat(all_boxes, 1), torch.cat(all_scores, 1), torch.cat(all_labels, 1)

    def __call__(
        self, cls_per_level: list[Tensor], box_per_level: list[Tensor], anchors_per_level: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Returns per image {"boxes": (D, 4) xyxy of the resized image, "scores": (D,), "labels": (D,) int64}."""
        device = cls_per_level[0].device
        batch_size = cls_per_level[0].shape[0]
        sizes = torch.tensor(image_sizes, device=device)
        boxes, scores, labels = self.candidates(cls_per_level, box_per_level, anchors_per_level, sizes)
        image_idx = torch.arange(batch_size, device=device)[:, None].expand_as(labels)
        keep = scores > self.score_thresh
        boxes, scores, labels, image_idx = boxes[keep], scores[keep], labels[keep], image_idx[keep]
        num_classes = int(labels.max()) + 1 if labels.numel() else 1
        kept = batched_nms(boxes, scores, image_idx * num_classes + labels, self.nms_thresh)
        # kept is in decreasing score order; a stable sort by image keeps that order inside each image.
        kept = kept[torch.sort(image_idx[kept], stable=True).indices]
        counts = torch.bincount(image_idx[kept], minlength=batch_size)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(kept.numel(), device=device) - starts[image_idx[kept]]
        kept = kept[rank < self.detections_per_image]
        counts = counts.clamp(max=self.detections_per_image).tolist()
        return [
            {"boxes": b, "scores": s, "labels": l}
            for b, s, l in zip(boxes[kept].split(counts), scores[kept].split(counts), labels[kept].split(counts))
        ]
