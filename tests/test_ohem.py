"""OHEM as the paper defines it (Table 1d): NMS over the anchors' boxes scored by loss, then the
highest-loss survivors up to the batch size per image, optionally at most 1:3 foreground."""

import math

import pytest
import torch
import torchvision

from retinanet.modeling import losses
from retinanet.modeling.box_coder import BoxCoder
from retinanet.modeling.losses import RetinaNetLoss
from retinanet.modeling.matcher import Matcher

# Two boxes of 10 x 10 shifted by 1 px: IoU 90 / 110 = 0.82, above both of the paper's thresholds.
A0, A0_SHIFTED = [0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0]


def ohem(keep: int, nms: float, fg_fraction: float = -1.0) -> RetinaNetLoss:
    return RetinaNetLoss(
        1, Matcher(), BoxCoder(), cls_loss="ohem", focal_alpha=-1.0, ohem_anchors_per_image=keep,
        ohem_fg_fraction=fg_fraction, ohem_nms_thresh=nms,
    )


def apart(i: int) -> list[float]:
    """A 10 x 10 box that overlaps no other box of these tests."""
    return [20.0 * i, 100.0, 20.0 * i + 10, 110.0]


def background_logits(loss: list[float]) -> torch.Tensor:
    """(1, A, 1) logits whose background CE (softplus) is `loss`."""
    return torch.tensor([math.log(math.expm1(value)) for value in loss])[None, :, None]


def classification_loss(criterion, anchors, per_anchor_ce, foreground=None, valid=None):
    """Loss of the selected anchors: each is plain CE (alpha off) = per_anchor_ce[i]."""
    num = len(anchors)
    foreground = torch.zeros(1, num, dtype=torch.bool) if foreground is None else torch.tensor([foreground])
    valid = torch.ones(1, num, dtype=torch.bool) if valid is None else torch.tensor([valid])
    # A foreground anchor's CE is softplus(-x): the same logit construction with the sign flipped.
    logits = background_logits(per_anchor_ce)
    logits = torch.where(foreground[..., None], -logits, logits)
    classes = torch.zeros(1, num, dtype=torch.int64)
    return criterion._classification_loss(logits, classes, foreground, valid, torch.tensor(anchors)).item()


def test_of_two_overlapping_hard_anchors_only_the_harder_is_kept():
    anchors = [A0, A0_SHIFTED, apart(1), apart(2), apart(3)]
    ce = [5.0, 4.0, 3.0, 2.0, 1.0]
    # The second hardest overlaps the hardest: NMS drops it, the third hardest takes its place.
    assert classification_loss(ohem(2, 0.7), anchors, ce) == pytest.approx(5.0 + 3.0)
    assert classification_loss(ohem(2, 0.5), anchors, ce) == pytest.approx(5.0 + 3.0)
    # IoU 0.82 is below 0.9; and <= 0 or >= 1 turn the NMS off: the two hardest, overlap or not.
    for no_nms in (0.9, 0.0, -1.0, 1.0):
        assert classification_loss(ohem(2, no_nms), anchors, ce) == pytest.approx(5.0 + 4.0)


def test_ignored_anchors_neither_count_nor_suppress():
    # Anchor 0 is ignored: it is not selected and does not suppress the anchor it overlaps.
    anchors = [A0, A0_SHIFTED, apart(1), apart(2)]
    loss = classification_loss(ohem(2, 0.5), anchors, [9.0, 4.0, 3.0, 2.0], valid=[False, True, True, True])
    assert loss == pytest.approx(4.0 + 3.0)


def test_one_to_three_ratio_after_the_nms():
    # Batch 4 at 1:3: at most one foreground, three background, all NMS survivors.
    anchors = [A0, A0_SHIFTED, apart(1), [0.0, 200.0, 10.0, 210.0], [1.0, 200.0, 11.0, 210.0],
               apart(2), apart(3), apart(4)]
    ce = [5.0, 4.5, 1.0, 4.0, 3.0, 2.0, 0.5, 0.1]
    foreground = [True, True, True, False, False, False, False, False]
    # fg: 0 (1 suppressed by 0; 2 over the 1:3 cap); bg: 3, 5, 6 (4 suppressed by 3).
    assert classification_loss(ohem(4, 0.7, 0.25), anchors, ce, foreground) == pytest.approx(5.0 + 4.0 + 2.0 + 0.5)
    # Without the NMS: fg 0; bg 3, 4, 5.
    assert classification_loss(ohem(4, -1, 0.25), anchors, ce, foreground) == pytest.approx(5.0 + 4.0 + 3.0 + 2.0)
    # Without the cap, with the NMS: the four hardest survivors, 0, 3, 5 and 2 (fg or not).
    assert classification_loss(ohem(4, 0.7), anchors, ce, foreground) == pytest.approx(5.0 + 4.0 + 2.0 + 1.0)


def test_a_hard_background_anchor_suppresses_an_easier_foreground_one():
    # NMS runs over all anchors together, as OHEM's over all RoIs.
    anchors = [A0, A0_SHIFTED, apart(1)]
    ce, foreground = [3.0, 2.0, 1.0], [False, True, False]
    assert classification_loss(ohem(2, 0.7, 0.5), anchors, ce, foreground) == pytest.approx(3.0 + 1.0)
    assert classification_loss(ohem(2, -1, 0.5), anchors, ce, foreground) == pytest.approx(3.0 + 2.0)


def reference_selection(criterion: RetinaNetLoss, loss: torch.Tensor, foreground: torch.Tensor, anchors: torch.Tensor):
    """Full NMS over every valid anchor of each image, one image at a time, then the selection."""
    survivors = torch.zeros_like(foreground)
    for image in range(loss.shape[0]):
        valid = torch.isfinite(loss[image]).nonzero().squeeze(1)
        kept = torchvision.ops.nms(anchors[valid], loss[image, valid], criterion.ohem_nms_thresh)
        survivors[image, valid[kept]] = True
    return criterion._ohem_selection(loss.masked_fill(~survivors, float("-inf")), foreground)


@pytest.mark.parametrize("fg_shift", [0.5, -0.5])  # foreground harder / easier than background
@pytest.mark.parametrize("fg_fraction", [-1.0, 0.25])
@pytest.mark.parametrize("nms", [0.7, 0.5])
def test_nms_over_the_top_candidates_selects_what_a_full_nms_selects(fg_fraction, nms, fg_shift, monkeypatch):
    """Anchors of a 3-scale x 3-ratio grid (many overlaps), random losses, some ignored: the batched
    NMS over the top candidates, grown from 32 when they are too few, equals a full NMS per image."""
    monkeypatch.setattr(losses, "OHEM_NMS_MIN_CANDIDATES", 32)
    monkeypatch.setattr(losses, "OHEM_NMS_CANDIDATES_PER_KEPT", 1)
    g = torch.Generator().manual_seed(0)
    centres = torch.stack(torch.meshgrid(torch.arange(0.0, 96, 8), torch.arange(0.0, 96, 8), indexing="ij"), -1)
    sizes = torch.tensor([[w * s, h * s] for s in (16, 20, 25) for w, h in ((1.4, 0.7), (1, 1), (0.7, 1.4))])
    centres, sizes = centres.reshape(-1, 1, 2), sizes[None]
    anchors = torch.cat([centres - sizes / 2, centres + sizes / 2], -1).reshape(-1, 4)  # (1296, 4), some < 0
    loss = torch.rand(3, len(anchors), generator=g)
    foreground = torch.rand(3, len(anchors), generator=g) < 0.05
    loss = torch.where(foreground, loss + fg_shift * torch.rand(3, len(anchors), generator=g), loss)
    loss = loss.masked_fill(torch.rand(3, len(anchors), generator=g) < 0.2, float("-inf"))  # ignored
    loss[2, 40:] = float("-inf")  # an image with fewer valid anchors than the batch size
    foreground &= torch.isfinite(loss)
    for keep in (16, 64):
        criterion = ohem(keep, nms, fg_fraction)
        survivors = criterion._ohem_nms_survivors(loss, foreground, anchors)
        ours = criterion._ohem_selection(loss.masked_fill(~survivors, float("-inf")), foreground)
        assert torch.equal(ours, reference_selection(criterion, loss, foreground, anchors))
        assert ours[:2].sum(1).tolist() == [keep, keep]


def test_ohem_with_nms_trains_through_the_whole_model():
    from conftest import tiny_overrides
    from retinanet import build_model, load_config

    cfg = load_config(None, tiny_overrides() + [
        "model.loss.cls=ohem", "model.loss.ohem_anchors_per_image=128", "model.loss.ohem_nms_thresh=0.5",
        "model.loss.ohem_fg_fraction=0.25",
    ])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert model.criterion.ohem_nms_thresh == 0.5
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses_ = model(images, targets)
    total = sum(losses_.values())
    assert torch.isfinite(total) and total.item() > 0
    total.backward()
    assert model.head.cls_logits.weight.grad.abs().sum() > 0
