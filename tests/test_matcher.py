"""Matcher on hand-written IoU matrices: every boundary derivable on paper."""

import torch

from retinanet.modeling import BACKGROUND, FOREGROUND, IGNORE, Matcher


def match(iou_rows, low_quality=False):
    iou = torch.tensor(iou_rows)[None]  # (1, M, A)
    valid = torch.ones(iou.shape[:2], dtype=torch.bool)
    return Matcher(0.5, 0.4, low_quality).match_iou(iou, valid)


def test_thresholds_exactly_at_boundaries():
    # anchors:         0      1      2      3      4
    idx, labels = match([[0.5, 0.4999, 0.4, 0.3999, 0.0]])
    assert labels[0].tolist() == [FOREGROUND, IGNORE, IGNORE, BACKGROUND, BACKGROUND]
    assert idx[0, 0] == 0


def test_each_anchor_takes_its_best_box_and_boxes_share_anchors():
    idx, labels = match([[0.6, 0.7, 0.1], [0.8, 0.55, 0.2]])
    assert labels[0].tolist() == [FOREGROUND, FOREGROUND, BACKGROUND]
    assert idx[0, :2].tolist() == [1, 0]


def test_low_quality_matches_and_their_zero_iou_guard():
    rows = [[0.3, 0.1, 0.0], [0.0, 0.0, 0.0]]  # box 1 overlaps nothing: it must claim nothing
    _, labels = match(rows)
    assert labels[0].tolist() == [BACKGROUND] * 3
    idx, labels = match(rows, low_quality=True)
    assert labels[0].tolist() == [FOREGROUND, BACKGROUND, BACKGROUND]
    assert idx[0, 0] == 0


def test_padded_boxes_never_match_and_empty_image_is_all_background():
    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0]], [[0.0, 0.0, 10.0, 10.0]]])
    valid = torch.tensor([[True], [False]])  # image 1 has only padding
    idx, labels = matcher(anchors, gt, valid)
    assert labels.tolist() == [[FOREGROUND, BACKGROUND], [BACKGROUND, BACKGROUND]]
    idx, labels = matcher(anchors, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool))
    assert labels.tolist() == [[BACKGROUND, BACKGROUND]] * 2


def test_crowd_regions_are_ignored_not_foreground():
    matcher = Matcher(0.5, 0.4)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [100.0, 100.0, 110.0, 110.0]])
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0]]])
    crowd = torch.tensor([[[40.0, 40.0, 200.0, 200.0]]])  # covers anchors 1 and 2 entirely, IoU small
    _, labels = matcher(anchors, gt, torch.tensor([[True]]), crowd, torch.tensor([[True]]))
    assert labels.tolist() == [[FOREGROUND, IGNORE, IGNORE]]
    _, labels = matcher(anchors, gt, torch.tensor([[True]]), crowd, torch.tensor([[False]]))
    assert labels.tolist() == [[FOREGROUND, BACKGROUND, BACKGROUND]]


def test_real_boxes_iou_boundaries():
    matcher = Matcher(0.5, 0.4)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    # IoU of [0, 0, 10, w] with the anchor is w / 10.
    for width, expected in ((5.0, FOREGROUND), (4.5, IGNORE), (4.0, IGNORE), (3.9, BACKGROUND)):
        _, labels = matcher(anchors, torch.tensor([[[0.0, 0.0, 10.0, width]]]), torch.tensor([[True]]))
        assert labels.item() == expected, width


def reference_match(anchors, gt_boxes, gt_valid, low_quality):
    """Per-image loop in torchvision's style: box_iou on the image's real boxes, then the rules."""
    from torchvision.ops import box_iou

    all_idx, all_labels = [], []
    for boxes, valid in zip(gt_boxes, gt_valid):
        iou = box_iou(boxes[valid], anchors)  # (M_i, A)
        best, idx = iou.max(dim=0)
        labels = torch.full_like(idx, IGNORE)
        labels[best < 0.4] = BACKGROUND
        labels[best >= 0.5] = FOREGROUND
        if low_quality:
            best_per_box = iou.max(dim=1, keepdim=True).values
            ties = ((iou == best_per_box) & (best_per_box > 0)).any(dim=0)
            labels[ties] = FOREGROUND
        all_idx.append(torch.where(labels == FOREGROUND, idx, 0)), all_labels.append(labels)
    return torch.stack(all_idx), torch.stack(all_labels).to(torch.int8)


def test_blocked_matching_equals_per_image_reference(monkeypatch):
    """On CPU the IoU is computed in blocks of anchors: the result must not depend on the blocks,
    also for ties of a box's best IoU that fall in different blocks."""
    from retinanet.modeling import blocks

    monkeypatch.setattr(blocks, "CPU_BLOCK_BYTES", 1000 * 4 * 2 * 4)  # 1000 anchors per block (B = M = 2 x 4)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(4500, 2, generator=g) * 300
    anchors = torch.cat([xy, xy + 8 + torch.rand(4500, 2, generator=g) * 60], 1)
    # The same lone anchor in blocks 0 and 3, and a box whose best IoU (0.38) is with both: a
    # low-quality tie across blocks.
    anchors[100] = anchors[3900] = torch.tensor([500.0, 500.0, 520.0, 530.0])
    gt_boxes = torch.stack([anchors[[100, 2000, 7, 9]] + 2.0, anchors[[50, 60, 70, 80]] * 1.1])
    gt_boxes[0, 0] = torch.tensor([495.0, 495.0, 530.0, 540.0])
    gt_boxes[1, 3] = torch.tensor([1000.0, 1000.0, 1010.0, 1010.0])  # overlaps nothing
    gt_valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    for low_quality in (False, True):
        idx, labels = Matcher(0.5, 0.4, low_quality)(anchors, gt_boxes, gt_valid)
        ref_idx, ref_labels = reference_match(anchors, gt_boxes, gt_valid, low_quality)
        assert torch.equal(labels, ref_labels) and torch.equal(idx, ref_idx)
        assert (labels == FOREGROUND).sum() > 5
        assert labels[0, 100] == labels[0, 3900] == (FOREGROUND if low_quality else BACKGROUND)
