"""Everything between the user's images and the network input, in one place, and back.

Resizing (short side / max size, multi-scale in training), normalisation and padding the batch to a
multiple of the coarsest stride happen here, on the model's device; detections are mapped back to
each input image's own coordinates by `restore`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Preprocessor(nn.Module):
    """Turn a list of images into one padded, normalised batch (and scale the targets to match).

    Args:
        min_size_train: training short side, drawn uniformly per image from this list.
        max_size_train: training long side limit.
        min_size_test, max_size_test: the same at inference.
        pixel_mean, pixel_std: RGB, on the 0..1 scale.
        size_divisibility: the batch is padded to a multiple of this (128 = stride of P7).
        num_classes: K, when known: training labels must then be in 0..K-1 (see check_targets).
    """

    def __init__(
        self,
        min_size_train: list[int],
        max_size_train: int,
        min_size_test: int,
        max_size_test: int,
        pixel_mean: list[float],
        pixel_std: list[float],
        size_divisibility: int = 128,
        num_classes: int | None = None,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.min_size_train = list(min_size_train)
        self.max_size_train = max_size_train
        self.min_size_test = min_size_test
        self.max_size_test = max_size_test
        self.size_divisibility = size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(3, 1, 1), persistent=False)

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[Tensor, list[tuple[int, int]], list[tuple[int, int]], list[dict[str, Tensor]] | None]:
        """
        Args:
            images: list of (3, H_i, W_i) RGB, float in 0..1 or uint8 in 0..255, any device.
            targets: optional list of {"boxes": (N, 4) float xyxy absolute pixels of the input image,
                "labels": (N,) integer class indices, optional "crowd_boxes": (C, 4)}; checked by
                check_targets.
        Returns:
            batch: (B, 3, H, W) normalised, zero-padded at the bottom and right.
            image_sizes: (h_i, w_i) of each resized image inside the batch.
            original_sizes: (H_i, W_i) of each input image.
            targets: copies with "boxes" and "crowd_boxes" scaled to the resized image.
        """
        self._check(images)
        if targets is not None:
            check_targets(targets, len(images), self.num_classes)
        device = self.pixel_mean.device
        resized, image_sizes, original_sizes, scaled_targets = [], [], [], []
        for i, image in enumerate(images):  # sizes differ per image: resizing cannot be batched
            image = image.to(device, non_blocking=True)
            image = image.float() / 255 if image.dtype == torch.uint8 else image.float()
            image = (image - self.pixel_mean) / self.pixel_std
            original_size = (image.shape[-2], image.shape[-1])
            image = self._resize(image)
            resized.append(image)
            image_sizes.append((image.shape[-2], image.shape[-1]))
            original_sizes.append(original_size)
            if targets is not None:
                scaled_targets.append(self._scale_target(targets[i], original_size, image_sizes[-1], device))
        return self._pad(resized), image_sizes, original_sizes, (scaled_targets if targets is not None else None)

    def _check(self, images: list[Tensor]) -> None:
        if isinstance(images, Tensor) and images.dim() == 3:
            raise TypeError("images must be a list of (3, H, W) tensors (or a (B, 3, H, W) tensor), got one (3, H, W) tensor")
        if len(images) == 0:
            raise ValueError("got no images: the model takes a list of one or more (3, H, W) tensors")
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"image {i}: expected shape (3, H, W), got {tuple(image.shape)}")
            if image.shape[1] == 0 or image.shape[2] == 0:
                raise ValueError(f"image {i}: has no pixels (shape {tuple(image.shape)})")

    def _target_size(self) -> tuple[int, int]:
        if self.training:
            choice = int(torch.randint(len(self.min_size_train), (1,)).item()) if len(self.min_size_train) > 1 else 0
            return self.min_size_train[choice], self.max_size_train
        return self.min_size_test, self.max_size_test

    def _resize(self, image: Tensor) -> Tensor:
        """(3, H, W) -> (3, h, w): the short side to min_size, unless the long side would then pass
        max_size (then the long side to max_size); each side floor(side * scale) pixels, at least 1.
        """
        min_size, max_size = self._target_size()
        height, width = image.shape[-2:]
        scale = resize_scale(height, width, min_size, max_size)
        if scale == 1.0:
            return image
        if min(height, width) * scale < 1:
            # An extreme aspect ratio (a 1x5000 strip, its long side capped at max_size) would floor
            # the short side to 0 px, which interpolate refuses: keep it at 1 px. restore() uses the
            # sizes actually produced, so boxes still map back to the input's pixels.
            size = resized_size(height, width, scale)
            return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        # The same call as torchvision's GeneralizedRCNNTransform, so the two agree to the bit.
        return F.interpolate(
            image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
        )[0]

    def _pad(self, images: list[Tensor]) -> Tensor:
        stride = self.size_divisibility
        height = math.ceil(max(img.shape[-2] for img in images) / stride) * stride
        width = math.ceil(max(img.shape[-1] for img in images) / stride) * stride
        batch = images[0].new_zeros(len(images), 3, height, width)
        for i, image in enumerate(images):
            batch[i, :, : image.shape[-2], : image.shape[-1]].copy_(image)
        return batch

    @staticmethod
    def _scale_target(target: dict, original_size: tuple[int, int], new_size: tuple[int, int], device) -> dict:
        ratio_h, ratio_w = (float32_ratio(n, o) for n, o in zip(new_size, original_size))
        scaled = dict(target)
        for key in ("boxes", "crowd_boxes"):
            if key in target:
                boxes = target[key].to(device, torch.float32, non_blocking=True).reshape(-1, 4)
                scaled[key] = scale_boxes(boxes, ratio_w, ratio_h)
        if "labels" in target:
            scaled["labels"] = target["labels"].to(device, non_blocking=True)
        return scaled

    @staticmethod
    def restore(
        detections: list[dict[str, Tensor]], image_sizes: list[tuple[int, int]], original_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Scale each image's detected boxes from the resized image back to the input image."""
        for det, (h, w), (orig_h, orig_w) in zip(detections, image_sizes, original_sizes):
            det["boxes"] = scale_boxes(det["boxes"], float32_ratio(orig_w, w), float32_ratio(orig_h, h))
        return detections


def check_targets(targets: list[dict[str, Tensor]], num_images: int, num_classes: int | None = None) -> None:
    """Raise TypeError / ValueError naming the image (and box) of a malformed target, as torchvision's
    GeneralizedRCNN does.

    Shapes and dtypes are checked on any device: reading them is host-side metadata. Values (boxes
    with x2 <= x1, y2 <= y1 or non-finite coordinates; labels outside 0..K-1) are only checked for
    CPU tensors: reading a GPU tensor's values waits for the device, and the training step must not
    sync. The DataLoader delivers CPU tensors (train_step moves them inside the model), and the
    dataset already drops degenerate boxes, so training is covered; a GPU caller gets shape checks.

    Args:
        targets: per image {"boxes": (N, 4) floating xyxy absolute pixels (an empty (0,) tensor
            counts as no box), "labels": (N,) integer, optional "crowd_boxes": (C, 4) floating xyxy};
            other keys (e.g. "image_id") are left alone.
        num_images: the number of images, which targets must match.
        num_classes: K, or None when unknown (labels are then only checked to be >= 0).
    """
    if len(targets) != num_images:
        raise ValueError(f"got {num_images} images but {len(targets)} targets")
    for image_index, target in enumerate(targets):
        if not isinstance(target, dict):
            raise TypeError(f"image {image_index}: a target must be a dict with 'boxes' and 'labels', got "
                            f"{type(target).__name__}")
        for key in ("boxes", "labels"):
            if key not in target:
                raise ValueError(f"image {image_index}: target has no {key!r} (keys: {sorted(target)})")
        for key in ("boxes", "crowd_boxes"):
            if key in target:
                _check_boxes(target[key], key, image_index)
        num_boxes = target["boxes"].shape[0] if target["boxes"].dim() == 2 else 0
        _check_labels(target["labels"], num_boxes, image_index, num_classes)


def _check_boxes(boxes: Tensor, key: str, image_index: int) -> None:
    """(N, 4) floating xyxy with x2 > x1, y2 > y1, finite (values: CPU tensors only, see check_targets)."""
    if not isinstance(boxes, Tensor):
        raise TypeError(f"image {image_index}: {key!r} must be a Tensor of shape (N, 4), got {type(boxes).__name__}")
    if not boxes.is_floating_point():
        raise TypeError(f"image {image_index}: {key!r} must be a floating point tensor, got {boxes.dtype}")
    empty = boxes.dim() == 1 and boxes.shape[0] == 0  # torch.tensor([]): no box
    if not empty and (boxes.dim() != 2 or boxes.shape[1] != 4):
        raise ValueError(f"image {image_index}: {key!r} must have shape (N, 4), got {tuple(boxes.shape)}")
    if boxes.device.type != "cpu" or empty:
        return
    finite = torch.isfinite(boxes).all(dim=1)
    bad = ~(finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
    if bad.any():
        box_index = int(bad.nonzero()[0, 0])
        x1, y1, x2, y2 = boxes[box_index].tolist()
        reason = "not finite" if not finite[box_index] else "x2 <= x1" if x2 <= x1 else "y2 <= y1"
        raise ValueError(
            f"image {image_index}: {key!r}[{box_index}] = {[x1, y1, x2, y2]}: {reason}. Boxes are xyxy absolute "
            "pixels (x1, y1, x2, y2) with x2 > x1 and y2 > y1; xywh boxes need converting first, e.g. "
            "torchvision.ops.box_convert(boxes, 'xywh', 'xyxy')"
        )


def _check_labels(labels: Tensor, num_boxes: int, image_index: int, num_classes: int | None) -> None:
    """(N,) integer class indices in 0..K-1 (values: CPU tensors only, see check_targets)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"image {image_index}: 'labels' must be a Tensor of shape (N,), got {type(labels).__name__}")
    if labels.numel() == 0 and labels.dim() == 1 and num_boxes == 0:
        return  # torch.tensor([]) is float32: accepted as "no label"
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"image {image_index}: 'labels' must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != (num_boxes,):
        raise ValueError(
            f"image {image_index}: 'labels' must have shape (N,) = ({num_boxes},) like 'boxes', got {tuple(labels.shape)}"
        )
    if labels.device.type != "cpu" or num_boxes == 0:
        return
    bad = labels < 0
    if num_classes is not None:
        bad |= labels >= num_classes
    if bad.any():
        box_index = int(bad.nonzero()[0, 0])
        label = int(labels[box_index])
        if label < 0:
            raise ValueError(f"image {image_index}: 'labels'[{box_index}] = {label} is negative")
        raise ValueError(f"image {image_index}: 'labels'[{box_index}] = {label} is not a class index in "
                         f"0..{num_classes - 1} (num_classes {num_classes})")


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """The factor that brings the short side to min_size, unless the long side would then pass max_size."""
    return min(min_size / min(height, width), max_size / max(height, width))


def resized_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(h, w) = floor(side * scale) px each, as interpolate(recompute_scale_factor=True) makes them,
    but at least 1 px (an extreme strip would floor to 0)."""
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


def float32_ratio(numerator: int, denominator: int) -> float:
    """numerator / denominator rounded like torchvision's float32 tensor division, as an exact Python float.

    Computed on CPU tensors: .item() here reads host memory and never waits for a device.
    """
    return (torch.tensor(numerator, dtype=torch.float32) / torch.tensor(denominator, dtype=torch.float32)).item()


def scale_boxes(boxes: Tensor, ratio_w: float, ratio_h: float) -> Tensor:
    """(N, 4) xyxy boxes times (ratio_w, ratio_h, ratio_w, ratio_h), in float32.

    The ratios travel as kernel scalars: a (4,) tensor of them would be a host-to-device copy, which
    syncs the stream on a GPU.
    """
    xy = boxes.reshape(-1, 2, 2)
    return torch.stack([xy[..., 0] * ratio_w, xy[..., 1] * ratio_h], dim=-1).reshape(-1, 4)
