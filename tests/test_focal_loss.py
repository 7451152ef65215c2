import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from retinanet import sigmoid_focal_loss, softmax_focal_loss


def test_gamma_zero_is_alpha_weighted_bce():
    torch.manual_seed(0)
    logits = torch.randn(200) * 3
    targets = (torch.rand(200) > 0.7).float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    alpha_t = 0.25 * targets + 0.75 * (1 - targets)
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=0.0), alpha_t * bce)
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha=-1, gamma=0.0), bce)


@pytest.mark.parametrize("p_t, ratio", [(0.9, 100.0), (0.968, 976.5625)])  # paper: 100x, ~1000x
def test_well_classified_examples_are_down_weighted(p_t, ratio):
    # A positive with p = p_t and a negative with p = 1 - p_t: both have (1 - p_t)^2 = ratio^-1.
    logit = math.log(p_t / (1 - p_t))
    for logits, target in ((torch.tensor([logit]), torch.tensor([1.0])), (torch.tensor([-logit]), torch.tensor([0.0]))):
        ce = sigmoid_focal_loss(logits, target, alpha=-1, gamma=0.0)
        fl = sigmoid_focal_loss(logits, target, alpha=-1, gamma=2.0)
        torch.testing.assert_close(ce / fl, torch.tensor([ratio]), rtol=1e-4, atol=0)


def test_equals_torchvision_sigmoid_focal_loss():
    torch.manual_seed(1)
    logits = torch.randn(64, 10) * 4
    targets = (torch.rand(64, 10) > 0.9).float()
    for alpha, gamma in ((0.25, 2.0), (0.5, 1.0), (-1, 0.0), (0.75, 5.0)):
        for reduction in ("none", "sum", "mean"):
            ours = sigmoid_focal_loss(logits, targets, alpha, gamma, reduction)
            theirs = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha, gamma, reduction)
            torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finite_for_extreme_logits_under_autocast(dtype):
    logits = torch.tensor([[100.0, -100.0, 0.0, 50.0]], requires_grad=True)
    targets = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    with torch.autocast("cpu", dtype=dtype):
        loss = sigmoid_focal_loss(logits.to(dtype), targets, reduction="sum")
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    # The wrongly-confident entries cost ~100 nats each (times alpha_t), not inf.
    assert 0.25 * 100 + 0.75 * 100 - 1 < loss.item() < 0.25 * 100 + 0.75 * 100 + 10
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_softmax_focal_loss_matches_cross_entropy_at_gamma_zero_and_down_weights():
    torch.manual_seed(2)
    logits = torch.randn(32, 5)
    targets = torch.randint(0, 5, (32,))
    targets[:4] = -100
    ce = F.cross_entropy(logits, targets, ignore_index=-100)
    torch.testing.assert_close(softmax_focal_loss(logits, targets, gamma=0.0), ce)
    weights = torch.rand(5)
    torch.testing.assert_close(
        softmax_focal_loss(logits, targets, alpha=weights, gamma=0.0, reduction="sum"),
        F.cross_entropy(logits, targets, weight=weights, ignore_index=-100, reduction="sum"),
    )
    # p_t = 0.9 for the true class: 100x less than CE.
    logits_09 = torch.tensor([[math.log(0.9), math.log(0.05), math.log(0.05)]])
    ratio = softmax_focal_loss(logits_09, torch.tensor([0]), gamma=0.0) / softmax_focal_loss(logits_09, torch.tensor([0]))
    torch.testing.assert_close(ratio, torch.tensor(100.0), rtol=1e-4, atol=0)


def test_giou_loss_equals_torchvision():
    from retinanet.modeling.losses import giou_loss

    torch.manual_seed(3)
    xy = torch.rand(2, 50, 2) * 100
    boxes1 = torch.cat([xy, xy + torch.rand(2, 50, 2) * 50 + 1], -1)
    xy = torch.rand(2, 50, 2) * 100
    boxes2 = torch.cat([xy, xy + torch.rand(2, 50, 2) * 50 + 1], -1)
    expected = torchvision.ops.generalized_box_iou_loss(boxes1.reshape(-1, 4), boxes2.reshape(-1, 4)).view(2, 50)
    torch.testing.assert_close(giou_loss(boxes1, boxes2), expected)
    torch.testing.assert_close(giou_loss(boxes1, boxes1), torch.zeros(2, 50), atol=1e-6, rtol=0)


@pytest.mark.parametrize("anchors_per_block", [None, 64])  # None: one block; 64: five blocks, the last partial
@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.5, 1.0), (-1.0, 0.0), (0.25, 0.0)])
def test_per_anchor_focal_loss_equals_one_hot_formula_with_gradients(alpha, gamma, anchors_per_block, monkeypatch):
    """The criterion's fused path equals sigmoid_focal_loss on one-hot targets, values and gradients,
    however the anchors are split into blocks."""
    from retinanet.modeling import blocks
    from retinanet.modeling.losses import focal_loss_per_anchor

    if anchors_per_block:
        monkeypatch.setattr(blocks, "CPU_BLOCK_BYTES", anchors_per_block * 4 * 2 * 5)  # B = 2, K = 5

    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, 300, 5, generator=g) * 6).requires_grad_()
    classes = torch.randint(0, 5, (2, 300), generator=g)
    foreground = torch.rand(2, 300, generator=g) < 0.2
    upstream = torch.rand(2, 300, generator=g)
    targets = F.one_hot(classes, 5).float() * foreground[..., None]
    expected = sigmoid_focal_loss(logits, targets, alpha, gamma).sum(dim=2)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), logits)
    ours = focal_loss_per_anchor(logits, classes, foreground, alpha, gamma)
    (ours_grad,) = torch.autograd.grad((ours * upstream).sum(), logits)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_pairwise_iou_equals_torchvision_box_iou():
    from retinanet.modeling.matcher import pairwise_iou

    g = torch.Generator().manual_seed(5)
    xy = torch.rand(40, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + torch.rand(40, 2, generator=g) * 60 + 1], 1)
    xy = torch.rand(500, 2, generator=g) * 100
    anchors = torch.cat([xy, xy + torch.rand(500, 2, generator=g) * 60 + 1], 1)
    assert torch.equal(pairwise_iou(boxes, anchors), torchvision.ops.box_iou(boxes, anchors))
