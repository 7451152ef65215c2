"""Input validation: every numeric config key has a range, and the model's targets are checked like
torchvision's GeneralizedRCNN checks them (shape, dtype, xyxy boxes with positive width and height)."""

import dataclasses
import json
import re
import typing

import pytest
import torch
import yaml

from conftest import CONFIGS, tiny_overrides
from retinanet import ConfigError, build_model, load_config
from retinanet.config import CHOICES, RANGES, Config, flatten, get_key, to_dict
from retinanet.modeling import Preprocessor

# Each of these loaded without complaint before the range table existed (except where noted in
# test_config.py); each names the key it breaks.
BAD_OVERRIDES = [
    "train.checkpoint_period=0",  # iteration % 0 mid-run
    "train.log_period=0",
    "train.eval_period=-1",
    "train.keep_checkpoints=0",
    "train.seed=-1",
    "model.loss.focal_alpha=1.5",  # 1 - alpha < 0: a negative loss
    "model.loss.focal_gamma=-1",
    "model.loss.ohem_anchors_per_image=0",
    "model.loss.ohem_fg_fraction=1.5",
    "model.loss.smooth_l1_beta=-0.1",
    "model.loss.box_weight=-1",
    "model.loss.normalizer_momentum=1.0",
    "model.inference.nms_thresh=7",
    "model.inference.nms_thresh=0",
    "model.inference.score_thresh=1.0",
    "model.inference.score_thresh=-0.1",
    "model.inference.score_thresh=.nan",
    "model.inference.topk_candidates=0",
    "model.inference.detections_per_image=0",
    "model.matcher.crowd_ioa_thresh=1.5",
    "model.backbone.freeze_at=6",
    "model.backbone.freeze_at=-1",
    "model.fpn.channels=0",
    "model.head.channels=0",
    "model.head.num_convs=-1",
    "model.anchors.sizes=[0,64,128,256,512]",
    "model.box_coder.weights=[1,1,0,1]",
    "model.box_coder.scale_clamp=0",
    "model.input.min_size_test=0",
    "model.input.max_size_test=100",  # below min_size_test (800)
    "model.input.max_size_train=600",  # below min_size_train (800)
    "model.input.pixel_std=[0.2,0.0,0.2]",
    "data.num_workers=-2",
    "data.hflip_prob=1.5",
    "data.synthetic.num_train=0",
    "data.synthetic.num_val=0",
    "data.synthetic.image_size=8",  # make_synthetic needs >= 16 px
    "data.synthetic.seed=-3",
    "solver.warmup_iters=-5",
    "solver.warmup_factor=0",
    "solver.warmup_factor=1.5",
    "solver.steps=[5,5]",
    "solver.steps=[0,5]",
    "solver.gamma=0",
    "solver.momentum=1.0",
    "solver.weight_decay=-1e-4",
    "solver.weight_decay_norm=-1",
    "solver.weight_decay_bias=-1",
    "solver.betas=[0.9,1.0]",
    "solver.betas=[0.9]",
    "solver.clip_grad_norm=-1",
    "solver.reference_batch_size=0",
]


@pytest.mark.parametrize("override", BAD_OVERRIDES)
def test_out_of_range_values_name_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(CONFIGS / "retinanet_R50_FPN_1x.yaml", [override])


def test_range_message_says_the_bound_and_the_value():
    with pytest.raises(ConfigError, match=r"<defaults>: train.checkpoint_period: must be >= 1, got 0$"):
        load_config(None, ["train.checkpoint_period=0"])
    with pytest.raises(ConfigError, match=r"solver.steps: must be strictly increasing, got \[5, 5\]"):
        load_config(None, ["solver.steps=[5,5]"])
    with pytest.raises(ConfigError, match=r"model.input.pixel_std\[1\]: must be > 0, got 0.0"):
        load_config(None, ["model.input.pixel_std=[0.2,0.0,0.2]"])


@pytest.mark.parametrize("override", [
    "train.eval_period=0",  # 0: evaluate only at the end
    "model.loss.focal_alpha=-1",  # < 0 disables alpha weighting
    "model.loss.focal_alpha=1",
    "model.loss.ohem_fg_fraction=-1",  # < 0: no limit
    "model.loss.focal_gamma=0",
    "model.inference.score_thresh=0",
    "model.inference.nms_thresh=1",
    "model.backbone.freeze_at=5",
    "model.head.num_convs=0",
    "data.num_workers=0",
    "data.hflip_prob=1",
    "solver.warmup_iters=0",
    "solver.warmup_factor=1",
    "solver.clip_grad_norm=0",
    "solver.steps=[]",
    "solver.betas=[0,0.999]",
])
def test_boundary_values_are_accepted(override):
    key, value = override.split("=", 1)
    cfg = load_config(CONFIGS / "retinanet_R50_FPN_1x.yaml", [override])
    assert get_key(cfg, key) == yaml.safe_load(value)  # taken as given, not clamped or replaced


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert to_dict(load_config(None, overrides_from(cfg))) == to_dict(cfg)  # every value survives a round trip


def overrides_from(cfg) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in flatten(to_dict(cfg)).items()]


def _numeric_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += _numeric_keys(hint, f"{prefix}{name}.")
        elif hint in (int, float) or typing.get_args(hint) in ((int,), (float,)):
            keys.append(f"{prefix}{name}")
    return keys


def test_every_numeric_key_has_a_range():
    """A new int / float field needs an entry in config.RANGES (or a fixed set in CHOICES)."""
    missing = [key for key in _numeric_keys(Config) if key not in RANGES and key not in CHOICES]
    assert not missing, f"add these keys to retinanet.config.RANGES: {missing}"
    assert not set(RANGES) - set(_numeric_keys(Config)), "RANGES names keys that are not numeric fields"


# ----------------------------------------------------------------------------------------------
# Targets.


def preprocessor(num_classes=None):
    return Preprocessor([64], 1000, 64, 1000, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], 32, num_classes=num_classes).train()


def two_images():
    return [torch.rand(3, 40, 60), torch.rand(3, 50, 50)]


def good_target():
    return {"boxes": torch.tensor([[1.0, 2.0, 30.0, 20.0]]), "labels": torch.tensor([1])}


@pytest.mark.parametrize("target, error, message", [
    ({"boxes": [[1.0, 2.0, 30.0, 20.0]], "labels": torch.tensor([1])}, TypeError, r"image 1: 'boxes' must be a Tensor"),
    ({"boxes": torch.tensor([[1.0, 2.0, 30.0, 20.0, 0.0]]), "labels": torch.tensor([1])}, ValueError,
     r"image 1: 'boxes' must have shape \(N, 4\), got \(1, 5\)"),
    ({"boxes": torch.tensor([1.0, 2.0, 30.0, 20.0]), "labels": torch.tensor([1])}, ValueError,
     r"image 1: 'boxes' must have shape \(N, 4\), got \(4,\)"),
    ({"boxes": torch.tensor([[1, 2, 30, 20]]), "labels": torch.tensor([1])}, TypeError,
     r"image 1: 'boxes' must be a floating point tensor, got torch.int64"),
    ({"boxes": torch.tensor([[1.0, 2.0, 30.0, 20.0]])}, ValueError, r"image 1: target has no 'labels'"),
    ({"labels": torch.tensor([1])}, ValueError, r"image 1: target has no 'boxes'"),
    ({"boxes": torch.tensor([[1.0, 2.0, 30.0, 20.0]]), "labels": torch.tensor([1.0])}, TypeError,
     r"image 1: 'labels' must be an integer tensor, got torch.float32"),
    ({"boxes": torch.tensor([[1.0, 2.0, 30.0, 20.0]]), "labels": torch.tensor([1, 2])}, ValueError,
     r"image 1: 'labels' must have shape \(N,\) = \(1,\) like 'boxes', got \(2,\)"),
    ({"boxes": torch.tensor([[1.0, 2.0, 30.0, 20.0]]), "labels": torch.tensor([-1])}, ValueError,
     r"image 1: 'labels'\[0\] = -1 is negative"),
    ({**good_target(), "crowd_boxes": torch.tensor([[1.0, 2.0, 3.0]])}, ValueError,
     r"image 1: 'crowd_boxes' must have shape \(N, 4\), got \(1, 3\)"),
    ("not a dict", TypeError, r"image 1: a target must be a dict"),
])
def test_malformed_targets_are_named(target, error, message):
    with pytest.raises(error, match=message):
        preprocessor()(two_images(), [good_target(), target])


@pytest.mark.parametrize("box, reason", [
    ([30.0, 2.0, 10.0, 20.0], "x2 <= x1"),  # inverted
    ([10.0, 2.0, 10.0, 20.0], "x2 <= x1"),  # zero width
    ([1.0, 20.0, 30.0, 20.0], "y2 <= y1"),  # zero height
    ([20.0, 15.0, 10.0, 10.0], "x2 <= x1"),  # xywh: (x=20, y=15, w=10, h=10)
    ([1.0, 2.0, float("inf"), 20.0], "not finite"),
    ([1.0, float("nan"), 30.0, 20.0], "not finite"),
])
def test_degenerate_boxes_name_image_box_and_values(box, reason):
    boxes = torch.tensor([[1.0, 2.0, 30.0, 20.0], [5.0, 5.0, 25.0, 25.0], box])
    target = {"boxes": boxes, "labels": torch.tensor([0, 1, 2])}
    with pytest.raises(ValueError) as info:
        preprocessor()(two_images(), [good_target(), target])
    message = str(info.value)
    assert message.startswith(f"image 1: 'boxes'[2] = {box}: {reason}"), message
    assert "xyxy" in message and "xywh" in message


def test_degenerate_crowd_box_is_named():
    target = {**good_target(), "crowd_boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0, 9.0]])}
    with pytest.raises(ValueError, match=r"image 0: 'crowd_boxes'\[1\] = \[5.0, 5.0, 5.0, 9.0\]: x2 <= x1"):
        preprocessor()(two_images()[:1], [target])


def test_labels_beyond_num_classes_are_named_when_k_is_known():
    target = {"boxes": torch.tensor([[1.0, 2.0, 30.0, 20.0], [3.0, 3.0, 9.0, 9.0]]), "labels": torch.tensor([2, 3])}
    with pytest.raises(ValueError, match=r"image 0: 'labels'\[1\] = 3 is not a class index in 0..2 \(num_classes 3\)"):
        preprocessor(num_classes=3)(two_images()[:1], [target])
    preprocessor()(two_images()[:1], [target])  # K unknown: only the sign is checked


def test_target_count_must_match_images():
    with pytest.raises(ValueError, match="2 images but 1 targets"):
        preprocessor()(two_images(), [good_target()])


def test_valid_targets_pass_including_zero_boxes():
    targets = [
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": 7},
        {"boxes": torch.tensor([]), "labels": torch.tensor([], dtype=torch.int64),
         "crowd_boxes": torch.zeros(0, 4)},
    ]
    _, _, _, scaled = preprocessor(num_classes=3)(two_images(), targets)
    assert [t["boxes"].shape for t in scaled] == [(0, 4), (0, 4)]
    targets = [{"boxes": torch.tensor([[1.0, 2.0, 30.0, 20.0]], dtype=torch.float64),
                "labels": torch.tensor([2], dtype=torch.int32),  # any integer dtype
                "crowd_boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]])}, good_target()]
    preprocessor(num_classes=3)(two_images(), targets)


def test_model_rejects_inverted_boxes_and_still_trains_on_empty_images():
    torch.manual_seed(0)
    model = build_model(load_config(None, tiny_overrides(num_classes=3, size=64))).train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 48, 64)]
    bad = [{"boxes": torch.tensor([[10.0, 12.0, 5.0, 30.0]]), "labels": torch.tensor([0])},
           {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    with pytest.raises(ValueError, match=r"image 0: 'boxes'\[0\] = \[10.0, 12.0, 5.0, 30.0\]: x2 <= x1"):
        model(images, bad)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in images]
    losses = model(images, empty)
    assert losses["loss_box"].item() == 0.0 and torch.isfinite(losses["loss_cls"])
    sum(losses.values()).backward()
