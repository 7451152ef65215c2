import math

import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from retinanet.modeling import AnchorGenerator, BoxCoder

PAPER_SIZES = [32.0, 64.0, 128.0, 256.0, 512.0]
PAPER_SCALES = [1.0, 2 ** (1 / 3), 2 ** (2 / 3)]
RATIOS = [0.5, 1.0, 2.0]
STRIDES = [8, 16, 32, 64, 128]


def test_count_and_sizes_per_level():
    generator = AnchorGenerator(PAPER_SIZES, PAPER_SCALES, RATIOS, STRIDES)
    assert generator.num_anchors_per_location == 9
    grid = [(64, 80), (32, 40), (16, 20), (8, 10), (4, 5)]  # a 512 x 640 batch
    anchors = generator(grid)
    counts = generator.num_anchors(grid)
    assert counts == [h * w * 9 for h, w in grid]
    assert anchors.shape == (sum(counts), 4)
    for level, per_level in enumerate(anchors.split(counts)):
        widths = per_level[:9, 2] - per_level[:9, 0]
        heights = per_level[:9, 3] - per_level[:9, 1]
        expected_sides = torch.tensor([PAPER_SIZES[level] * s for s in PAPER_SCALES] * 3)
        torch.testing.assert_close(torch.sqrt(widths * heights), expected_sides)  # area = (size * scale)^2
        torch.testing.assert_close(heights / widths, torch.tensor(RATIOS).repeat_interleave(3))
        # First location centred on (0, 0); the next column one stride to the right.
        torch.testing.assert_close(per_level[:9, :2] + per_level[:9, 2:], torch.zeros(9, 2), atol=1e-5, rtol=0)
        torch.testing.assert_close(per_level[9:18] - per_level[:9], torch.tensor([STRIDES[level], 0.0] * 2).expand(9, 4))


def test_cached_per_shape():
    generator = AnchorGenerator(PAPER_SIZES, PAPER_SCALES, RATIOS, STRIDES)
    grid = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    assert generator(grid) is generator(grid)
    assert generator([(16, 8), (8, 4), (4, 2), (2, 1), (1, 1)]) is not generator(grid)


def test_torchvision_compat_equals_torchvision_anchor_generator():
    sizes = tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in [32, 64, 128, 256, 512])
    theirs = TorchvisionAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    ours = AnchorGenerator(PAPER_SIZES, PAPER_SCALES, RATIOS, STRIDES, torchvision_compat=True)
    grid = [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
    feature_maps = [torch.zeros(1, 1, h, w) for h, w in grid]
    expected = theirs(ImageList(torch.zeros(1, 3, 256, 384), [(256, 384)]), feature_maps)[0]
    assert torch.equal(ours(grid), expected)


def test_box_coder_round_trip_and_known_values():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    torch.manual_seed(0)
    anchors = torch.rand(100, 2) * 500
    anchors = torch.cat([anchors, anchors + torch.rand(100, 2) * 200 + 4], dim=1)
    boxes = torch.rand(100, 2) * 500
    boxes = torch.cat([boxes, boxes + torch.rand(100, 2) * 200 + 4], dim=1)
    torch.testing.assert_close(coder.decode(coder.encode(boxes, anchors), anchors), boxes, atol=1e-3, rtol=1e-5)
    unit = BoxCoder()
    deltas = unit.encode(torch.tensor([[15.0, 0.0, 35.0, 40.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    torch.testing.assert_close(deltas, torch.tensor([[2.0, 1.5, math.log(2.0), math.log(4.0)]]))


def test_box_coder_clamps_scale_on_decode():
    coder = BoxCoder()
    boxes = coder.decode(torch.tensor([[0.0, 0.0, 50.0, 50.0]]), torch.tensor([[0.0, 0.0, 16.0, 16.0]]))
    width = boxes[0, 2] - boxes[0, 0]
    torch.testing.assert_close(width, torch.tensor(1000.0))  # exp(log(1000/16)) * 16
    assert torch.isfinite(boxes).all()
