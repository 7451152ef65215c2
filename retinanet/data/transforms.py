"""Data augmentation on (image, target) pairs, built on torchvision.transforms.v2.

Only flips happen here. Resizing to the model's short side / max size, normalisation and padding
happen inside the model's preprocessor, on the device, for training and evaluation alike: the
loader ships images at file resolution as uint8, which is 4x less host-to-device traffic than
float32 and keeps the resize on the GPU.

Boxes cross this module's boundary as plain float32 (N, 4) xyxy tensors in absolute pixels of the
image they come with; tv_tensors are used only inside, so collate and the model never see them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


class DetectionTransforms:
    """Apply v2 transforms to an image and its target's boxes, then drop degenerate boxes.

    All transforms in one call share their random decisions across the image, "boxes" and
    "crowd_boxes" (a flip flips all three). Randomness comes from torch's global RNG; the dataset
    seeds it per training sample (see CocoDetection.__getitem__).

    Args:
        transforms: v2 transforms that accept (tv_tensors.Image, dict of tv_tensors); empty = identity.
        min_size: boxes narrower or shorter than this (px) after the transforms are dropped, with
            their labels (v2.SanitizeBoundingBoxes' rule, which requires >= 1).
    """

    def __init__(self, transforms: Sequence[v2.Transform], min_size: float = 1.0) -> None:
        self.transforms = v2.Compose(list(transforms)) if transforms else None
        self.min_size = min_size

    def __call__(self, image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """
        Args:
            image: uint8 (3, H, W).
            target: dict with "boxes" float32 (N, 4) xyxy, "labels" (N,), "crowd_boxes" (M, 4) xyxy,
                pixels of `image`; other keys are passed through untouched.
        Returns:
            (image uint8 (3, H', W') plain tensor, target with boxes in pixels of the new image).
        """
        if self.transforms is None:
            return image, target
        canvas_size = (image.shape[-2], image.shape[-1])
        wrapped = {
            "boxes": tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=canvas_size),
            "crowd_boxes": tv_tensors.BoundingBoxes(target["crowd_boxes"], format="XYXY", canvas_size=canvas_size),
        }
        new_image, wrapped = self.transforms(tv_tensors.Image(image), wrapped)
        # SanitizeBoundingBoxes would apply the mask of the first BoundingBoxes it finds to every
        # one in the sample, so the two box sets are sanitized separately.
        boxes, keep = F.sanitize_bounding_boxes(wrapped["boxes"], min_size=self.min_size)
        crowd_boxes, _ = F.sanitize_bounding_boxes(wrapped["crowd_boxes"], min_size=self.min_size)
        out = dict(target)
        out["boxes"] = boxes.as_subclass(Tensor).to(torch.float32)
        out["labels"] = target["labels"][keep]
        out["crowd_boxes"] = crowd_boxes.as_subclass(Tensor).to(torch.float32)
        return new_image.as_subclass(Tensor), out


def build_train_transforms(hflip_prob: float) -> DetectionTransforms:
    """Horizontal flip with probability `hflip_prob` (the paper's only augmentation)."""
    if not 0.0 <= hflip_prob <= 1.0:
        raise ValueError(f"data.hflip_prob must be in [0, 1], got {hflip_prob}")
    return DetectionTransforms([v2.RandomHorizontalFlip(p=hflip_prob)] if hflip_prob > 0 else [])


def build_eval_transforms() -> DetectionTransforms:
    """Identity: evaluation images go to the model at file resolution (it resizes on the device)."""
    return DetectionTransforms([])
