import torch
from torchvision.ops import batched_nms, box_iou

from retinanet.modeling import BoxCoder, PostProcessor
from retinanet.modeling.postprocess import MIN_BOX_SIZE


def random_outputs(batch, anchors_per_level, num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    cls = [torch.randn(batch, a, num_classes, generator=g) * 2 - 2 for a in anchors_per_level]
    box = [torch.randn(batch, a, 4, generator=g) * 0.1 for a in anchors_per_level]
    anchors = []
    for a in anchors_per_level:
        xy = torch.rand(a, 2, generator=g) * 200
        anchors.append(torch.cat([xy, xy + 10 + torch.rand(a, 2, generator=g) * 40], 1))
    return cls, box, anchors


def reference(cls, box, anchors, sizes, post):
    """Per-image, per-level loop in the style of torchvision's RetinaNet.postprocess_detections."""
    results = []
    for i, size in enumerate(sizes):
        all_boxes, all_scores, all_labels = [], [], []
        for logits, deltas, anc in zip(cls, box, anchors):
            scores = torch.sigmoid(logits[i]).flatten()
            keep = torch.where(scores > post.score_thresh)[0]
            scores = scores[keep]
            top, order = scores.topk(min(post.topk_candidates, keep.numel()))
            idx = keep[order]
            a_idx, labels = idx // logits.shape[2], idx % logits.shape[2]
            boxes = post.box_coder.decode(deltas[i][a_idx], anc[a_idx])
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, size[1])
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, size[0])
            # Boxes clipped to a line (anchors partly outside the image) are no detection.
            big = ((boxes[:, 2:] - boxes[:, :2]) > MIN_BOX_SIZE).all(dim=1)
            boxes, top, labels = boxes[big], top[big], labels[big]
            all_boxes.append(boxes), all_scores.append(top), all_labels.append(labels)
        boxes, scores, labels = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
        kept = batched_nms(boxes, scores, labels, post.nms_thresh)[: post.detections_per_image]
        results.append({"boxes": boxes[kept], "scores": scores[kept], "labels": labels[kept]})
    return results


def test_batched_postprocess_equals_per_image_reference():
    post = PostProcessor(BoxCoder(), score_thresh=0.05, topk_candidates=50, nms_thresh=0.5, detections_per_image=20)
    cls, box, anchors = random_outputs(3, [400, 100, 30], num_classes=4)
    sizes = [(180, 200), (150, 160), (200, 120)]
    ours = post(cls, box, anchors, sizes)
    for i, expected in enumerate(reference(cls, box, anchors, sizes, post)):
        assert ours[i]["scores"].shape == expected["scores"].shape == (20,)
        torch.testing.assert_close(ours[i]["scores"], expected["scores"])
        torch.testing.assert_close(ours[i]["boxes"], expected["boxes"])
        assert torch.equal(ours[i]["labels"], expected["labels"])


def test_limits_threshold_topk_nms_and_clip():
    post = PostProcessor(BoxCoder(), score_thresh=0.3, topk_candidates=7, nms_thresh=0.5, detections_per_image=5)
    cls, box, anchors = random_outputs(2, [300, 80], num_classes=3, seed=1)
    dets = post(cls, box, anchors, [(100, 120), (90, 60)])
    for det, (h, w) in zip(dets, [(100, 120), (90, 60)]):
        assert det["scores"].numel() <= 5
        assert (det["scores"] > 0.3).all()
        assert torch.all(det["scores"][:-1] >= det["scores"][1:])
        assert (det["boxes"][:, 0::2] <= w).all() and (det["boxes"][:, 1::2] <= h).all() and (det["boxes"] >= 0).all()
        for label in det["labels"].unique():
            same = det["boxes"][det["labels"] == label]
            iou = box_iou(same, same).fill_diagonal_(0).nan_to_num(0.0)  # boxes clipped to zero area
            assert (iou <= 0.5).all()
    # topk: at most 7 candidates per level and image survive to NMS.
    boxes, scores, _ = post.candidates(cls, box, anchors, torch.tensor([[100, 120], [90, 60]]))
    assert scores.shape == (2, 14)


def test_no_detection_above_threshold_gives_empty_results():
    post = PostProcessor(BoxCoder(), score_thresh=0.99)
    cls, box, anchors = random_outputs(2, [50], num_classes=2)
    cls = [c - 20 for c in cls]
    dets = post(cls, box, anchors, [(100, 100), (100, 100)])
    assert [d["boxes"].shape for d in dets] == [(0, 4), (0, 4)]


def test_score_sized_topk_equals_fixed_topk_and_reference():
    """Eager inference sizes each level's top-k by the anchors that can pass the threshold; the
    detections must equal the fixed-shape path's and the per-image reference, also for scores at
    the threshold's rounding edge and when one image has more candidates than topk and another few."""
    post = PostProcessor(BoxCoder(), score_thresh=0.05, topk_candidates=40, nms_thresh=0.5, detections_per_image=30)
    cls, box, anchors = random_outputs(2, [500, 120], num_classes=5, seed=3)
    g = torch.Generator().manual_seed(4)
    cls = [torch.randn(c.shape, generator=g) - 9 for c in cls]  # background: nothing passes
    cls[0][0, :60, 1] = torch.randn(60, generator=g) * 2  # image 0: more than topk candidates on level 0
    cls[0][1, 100:103, 2] = 1.0  # image 1: a few
    edge = torch.logit(torch.tensor(0.05)).item()
    cls[1][1, :5, 0] = torch.tensor([edge - 1e-4, edge - 1e-6, edge, edge + 1e-6, edge + 1e-4])
    sizes = [(180, 200), (150, 160)]
    ours = post(cls, box, anchors, sizes)
    tensor_sizes = torch.tensor(sizes)
    fixed = post.candidates(cls, box, anchors, tensor_sizes, fixed_shapes=True)
    sized = post.candidates(cls, box, anchors, tensor_sizes, fixed_shapes=False)
    assert sized[1].shape[1] < fixed[1].shape[1]  # the score-sized path did less work
    for image in range(2):
        fixed_pairs = sorted(zip(fixed[1][image].tolist(), fixed[2][image].tolist()))
        sized_pairs = sorted(zip(sized[1][image].tolist(), sized[2][image].tolist()))
        assert [p for p in fixed_pairs if p[0] > 0] == [p for p in sized_pairs if p[0] > 0]
    for det, expected in zip(ours, reference(cls, box, anchors, sizes, post)):
        torch.testing.assert_close(det["scores"], expected["scores"])
        torch.testing.assert_close(det["boxes"], expected["boxes"])
        assert torch.equal(det["labels"], expected["labels"])
    assert ours[0]["scores"].numel() > 0 and ours[1]["scores"].numel() > 0


def test_one_nms_call_per_image_with_thousands_of_candidates_and_80_classes(monkeypatch):
    """An untrained model's regime: thousands of candidates per image over 80 classes, where
    torchvision's batched_nms loops over every class present. Ours calls nms once per image, and
    still equals the per-image reference."""
    import retinanet.modeling.postprocess as postprocess

    calls = []
    real_nms = postprocess.nms
    monkeypatch.setattr(postprocess, "nms", lambda *args: calls.append(args[0].shape[0]) or real_nms(*args))
    post = PostProcessor(BoxCoder(), score_thresh=0.05, topk_candidates=1000, nms_thresh=0.5, detections_per_image=300)
    cls, box, anchors = random_outputs(3, [4000, 1000, 250], num_classes=80, seed=3)
    # Most pairs pass the threshold, as with an untrained head; every logit distinct (spaced so that
    # the sigmoids differ too), since the order of equal scores is an implementation's choice.
    g = torch.Generator().manual_seed(4)
    distinct = torch.linspace(-2.9, 2.9, 3 * 5250 * 80)[torch.randperm(3 * 5250 * 80, generator=g)]
    cls = list(distinct.reshape(3, 5250, 80).split([4000, 1000, 250], dim=1))
    sizes = [(180, 200), (150, 160), (200, 120)]
    ours = post(cls, box, anchors, sizes)
    assert len(calls) == 3 and min(calls) > 1500, calls
    for i, expected in enumerate(reference(cls, box, anchors, sizes, post)):
        assert len(set(expected["labels"].tolist())) > 40  # many (image, class) groups
        assert ours[i]["scores"].shape == expected["scores"].shape == (300,)
        torch.testing.assert_close(ours[i]["scores"], expected["scores"])
        torch.testing.assert_close(ours[i]["boxes"], expected["boxes"])
        assert torch.equal(ours[i]["labels"], expected["labels"])
