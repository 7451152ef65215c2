"""Flip and sanitize transforms: boxes follow the pixels, outputs are plain tensors."""

import pytest
import torch
from torch import Tensor
from torchvision.transforms import v2

from retinanet.data.transforms import DetectionTransforms, build_eval_transforms, build_train_transforms

H, W = 20, 32


def bright_rectangle_image(x1, y1, x2, y2):
    """uint8 (3, H, W), dark except a bright rectangle covering pixel columns x1..x2-1, rows y1..y2-1."""
    image = torch.full((3, H, W), 10, dtype=torch.uint8)
    image[:, y1:y2, x1:x2] = 250
    return image


def enclosing_box(image):
    """xyxy box of the bright pixels (pixel c covers [c, c + 1))."""
    bright = image[0] > 128
    rows = bright.any(dim=1).nonzero()[:, 0]
    cols = bright.any(dim=0).nonzero()[:, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def make_target(boxes, labels, crowd_boxes=()):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "crowd_boxes": torch.tensor(crowd_boxes, dtype=torch.float32).reshape(-1, 4),
        "image_id": 7,
        "orig_size": (H, W),
    }


def test_flip_moves_boxes_with_the_pixels():
    image = bright_rectangle_image(5, 3, 12, 9)
    target = make_target([[5, 3, 12, 9], [0, 0, 4, 20]], [1, 2], crowd_boxes=[[30, 1, 32, 2]])
    assert enclosing_box(image) == [5, 3, 12, 9]
    flipped, out = build_train_transforms(hflip_prob=1.0)(image, target)
    # x1' = W - x2, x2' = W - x1.
    assert out["boxes"].tolist() == [[20, 3, 27, 9], [28, 0, 32, 20]]
    assert enclosing_box(flipped) == out["boxes"][0].tolist()
    assert out["labels"].tolist() == [1, 2]
    assert out["crowd_boxes"].tolist() == [[0, 1, 2, 2]]
    assert torch.equal(flipped, image.flip(-1))
    assert out["image_id"] == 7 and out["orig_size"] == (H, W)
    # Inputs are not modified in place.
    assert target["boxes"][0].tolist() == [5, 3, 12, 9]


def test_outputs_are_plain_tensors():
    image = bright_rectangle_image(5, 3, 12, 9)
    flipped, out = build_train_transforms(hflip_prob=1.0)(image, make_target([[5, 3, 12, 9]], [0]))
    assert type(flipped) is Tensor and flipped.dtype == torch.uint8 and flipped.shape == (3, H, W)
    assert type(out["boxes"]) is Tensor and out["boxes"].dtype == torch.float32
    assert type(out["crowd_boxes"]) is Tensor
    assert type(out["labels"]) is Tensor and out["labels"].dtype == torch.int64


def test_no_flip_at_probability_zero_and_eval_is_identity():
    image = bright_rectangle_image(5, 3, 12, 9)
    target = make_target([[5, 3, 12, 9]], [0])
    for transform in (build_train_transforms(hflip_prob=0.0), build_eval_transforms()):
        same_image, same_target = transform(image, target)
        assert torch.equal(same_image, image)
        assert same_target["boxes"].tolist() == [[5, 3, 12, 9]]


def test_flip_probability_uses_global_rng():
    image = bright_rectangle_image(5, 3, 12, 9)
    transform = build_train_transforms(hflip_prob=0.5)
    torch.manual_seed(0)
    flips = [transform(image, make_target([[5, 3, 12, 9]], [0]))[1]["boxes"][0, 0].item() == 20 for _ in range(200)]
    assert 60 < sum(flips) < 140


def test_degenerate_boxes_dropped_labels_stay_aligned():
    image = bright_rectangle_image(5, 3, 12, 9)
    target = make_target(
        [[4, 4, 4, 9], [1, 1, 5, 5], [2, 2, 9, 2.5], [6, 6, 10, 10]],  # zero width, ok, 0.5 px high, ok
        [3, 1, 4, 2],
        crowd_boxes=[[3, 3, 3, 3], [0, 0, 8, 8]],
    )
    _, out = DetectionTransforms([v2.RandomHorizontalFlip(p=1.0)])(image, target)
    assert out["boxes"].tolist() == [[27, 1, 31, 5], [22, 6, 26, 10]]
    assert out["labels"].tolist() == [1, 2]
    assert out["crowd_boxes"].tolist() == [[24, 0, 32, 8]]


def test_empty_targets_pass_through():
    image = bright_rectangle_image(5, 3, 12, 9)
    flipped, out = build_train_transforms(1.0)(image, make_target([], []))
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,) and out["crowd_boxes"].shape == (0, 4)
    assert torch.equal(flipped, image.flip(-1))


def test_bad_probability():
    with pytest.raises(ValueError, match="hflip_prob"):
        build_train_transforms(1.5)
