import copy

import pytest
import torch

from conftest import tiny_overrides
from retinanet import build_model, load_config
from retinanet.modeling import FOREGROUND


def tiny_model(*extra, num_classes=3):
    torch.manual_seed(0)
    return build_model(load_config(None, tiny_overrides(num_classes) + list(extra)))


def batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 128, 160, generator=g), torch.rand(3, 96, 128, generator=g)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 70.0, 90.0], [80.0, 40.0, 150.0, 100.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return images, targets


def test_prior_probability_init_gives_mean_score_001():
    model = tiny_model(num_classes=5).eval()
    images, _ = batch()
    with torch.no_grad():
        batch_tensor, *_ = model.preprocessor(images)
        cls_per_level, _, _ = model.forward_batch(batch_tensor)
    probs = torch.sigmoid(torch.cat(cls_per_level, 1))
    assert abs(probs.mean().item() - 0.01) < 1e-3
    assert probs.shape[-1] == 5


def test_head_shapes_and_default_paper_architecture():
    cfg = load_config()
    assert (cfg.model.head.num_convs, cfg.model.fpn.channels, cfg.model.head.prior_prob) == (4, 256, 0.01)
    model = tiny_model()
    convs = [m for m in model.head.cls_subnet if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4
    assert model.head.cls_logits.out_channels == 9 * 3 and model.head.box_deltas.out_channels == 9 * 4
    assert all(float(c.bias.detach().abs().max()) == 0 for c in convs)
    std = torch.cat([c.weight.flatten() for c in convs]).std().item()
    assert 0.009 < std < 0.011  # N(0, 0.01)


def test_empty_image_has_zero_box_loss_and_finite_cls_loss():
    model = tiny_model().train()
    images, targets = batch()
    losses = model(images[1:], targets[1:])
    assert losses["loss_box"].item() == 0.0
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"].item() > 0
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_batched_loss_equals_sum_of_per_image_losses():
    """The whole batch is matched at once; the loss must equal per-image work normalised by the total fg."""
    model = tiny_model().train()
    images, targets = batch()
    images = [images[0], images[0].flip(-1)]
    targets = [targets[0], {"boxes": targets[0]["boxes"][:1], "labels": targets[0]["labels"][:1]}]
    with torch.no_grad():
        both = model(images, targets)
        batch_tensor, _, _, scaled = model.preprocessor(images, targets)
        cls, box, anchors = model.forward_batch(batch_tensor)
        cls, box, anchors = torch.cat(cls, 1), torch.cat(box, 1), torch.cat(anchors)
        fg = []
        for i in range(2):
            _, labels = model.criterion.matcher(anchors, scaled[i]["boxes"][None], torch.ones(1, len(scaled[i]["boxes"]), dtype=torch.bool))
            fg.append(int((labels == FOREGROUND).sum()))
        per_image = [model.criterion(cls[i : i + 1], box[i : i + 1], anchors, scaled[i : i + 1]) for i in range(2)]
    for key in ("loss_cls", "loss_box"):
        expected = sum(l[key] * n for l, n in zip(per_image, fg)) / sum(fg)
        torch.testing.assert_close(both[key], expected)


@pytest.mark.parametrize("extra", [
    ["model.loss.cls=ce"], ["model.loss.cls=ohem", "model.loss.ohem_fg_fraction=0.25"], ["model.loss.cls=ohem"],
    ["model.loss.box=giou"], ["model.loss.box=l1"], ["model.head.norm=gn"], ["model.fpn.p6_from=p5"],
    ["model.matcher.allow_low_quality_matches=true"], ["model.loss.normalizer_momentum=0.9"],
])
def test_options_train(extra):
    model = tiny_model(*extra).train()
    images, targets = batch()
    losses = model(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total) and total.item() > 0
    total.backward()
    assert model.head.cls_logits.weight.grad.abs().sum() > 0


def test_ohem_keeps_requested_number_of_anchors():
    model = tiny_model("model.loss.cls=ohem", "model.loss.ohem_anchors_per_image=64", "model.loss.ohem_fg_fraction=0.25")
    per_anchor = torch.rand(2, 1000)
    foreground = torch.zeros(2, 1000, dtype=torch.bool)
    foreground[0, :40] = True  # more than 64 * 0.25 = 16: capped
    foreground[1, :5] = True  # fewer: all kept, background fills the rest
    keep = model.criterion._ohem_selection(per_anchor, foreground)
    assert keep.sum(1).tolist() == [64, 64]
    assert (keep & foreground).sum(1).tolist() == [16, 5]
    bg_loss = per_anchor[1].masked_fill(foreground[1], -1)
    assert set(torch.where(keep[1] & ~foreground[1])[0].tolist()) == set(bg_loss.topk(59).indices.tolist())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_losses_finite_under_autocast(dtype):
    model = tiny_model().train()
    images, targets = batch()
    with torch.autocast("cpu", dtype=dtype):
        losses = model(images, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_crowd_boxes_only_remove_anchors_from_the_loss():
    model = tiny_model().train()
    images, targets = batch()
    images, targets = images[:1], targets[:1]
    with torch.no_grad():
        plain = model(images, targets)
        crowd = dict(targets[0], crowd_boxes=torch.tensor([[0.0, 0.0, 160.0, 128.0]]))
        with_crowd = model(images, [crowd])
    assert with_crowd["loss_cls"] < plain["loss_cls"]  # background anchors under the crowd are ignored
    torch.testing.assert_close(with_crowd["loss_box"], plain["loss_box"])  # foreground untouched


def test_eval_returns_boxes_in_input_coordinates():
    model = tiny_model("model.inference.score_thresh=0.0", "model.inference.detections_per_image=50").eval()
    image = torch.rand(3, 64, 80)  # resized x2 to 128 x 160 inside the model
    with torch.no_grad():
        det = model([image])[0]
    assert det["boxes"].shape == (50, 4)
    assert (det["boxes"][:, 0::2] <= 80).all() and (det["boxes"][:, 1::2] <= 64).all()
    assert det["boxes"][:, 2].max() > 70  # spans the whole input, not a 128 x 160 frame cut down
    # channels_last gives the same detections
    model_cl = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        det_cl = model_cl([image])[0]
    torch.testing.assert_close(det_cl["scores"], det["scores"], atol=1e-4, rtol=0)


def test_training_without_targets_is_a_clear_error():
    model = tiny_model().train()
    with pytest.raises(ValueError, match="needs targets"):
        model([torch.rand(3, 64, 64)])
    with pytest.raises(ValueError, match="expected shape"):
        model.eval()([torch.rand(64, 64, 3)])


def test_compiled_network_equals_eager_and_keeps_state_dict_keys():
    """train.compile compiles backbone, FPN and head in place. aot_eager traces and runs the same
    graphs as inductor without its slow code generation (inductor itself runs in the GPU check)."""
    cfg = load_config(None, tiny_overrides(size=64) + ["model.backbone.norm=frozen_bn"])
    torch.manual_seed(0)
    eager = build_model(cfg)
    compiled = copy.deepcopy(eager)
    compiled.compile_network(backend="aot_eager")
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    assert all(m._compiled_call_impl is not None for m in (compiled.backbone, compiled.fpn, compiled.head))
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = {name: model.train()(images, targets) for name, model in (("eager", eager), ("compiled", compiled))}
    for key in losses["eager"]:
        torch.testing.assert_close(losses["compiled"][key], losses["eager"][key], rtol=1e-5, atol=1e-6)
    sum(losses["compiled"].values()).backward()
    assert compiled.head.cls_logits.weight.grad is not None
