"""Our RetinaNet, built from converted torchvision weights, equals torchvision's RetinaNet."""

import pytest
import torch
from torchvision.models import resnet18, resnet50
from torchvision.models.detection import RetinaNet as TorchvisionRetinaNet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.retinanet import _default_anchorgen
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from retinanet import build_model
from retinanet.convert import convert_torchvision_state_dict
from retinanet.modeling import postprocess


def make_torchvision_model(builder, num_classes: int, size: int) -> TorchvisionRetinaNet:
    """A random-initialised torchvision RetinaNet with non-trivial frozen BN and class biases."""
    torch.manual_seed(0)
    backbone = _resnet_fpn_extractor(
        builder(weights=None, norm_layer=FrozenBatchNorm2d), 3, returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(256, 256),
    )
    model = TorchvisionRetinaNet(
        backbone, num_classes, min_size=size, max_size=4 * size, anchor_generator=_default_anchorgen()
    )
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):  # the defaults (1, 0, 0, 1) would hide a mix-up
            for buffer in (module.weight, module.bias, module.running_mean):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1 + (buffer == 1).float())
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    with torch.no_grad():  # spread the class scores so that many pass the 0.05 threshold
        bias = model.head.classification_head.cls_logits.bias
        bias.copy_(torch.randn(bias.shape, generator=generator) * 1.5 - 1.5)
    return model


def converted(tv_model, size: int, fold_frozen_bn: bool = False):
    state, cfg = convert_torchvision_state_dict(tv_model.state_dict())
    cfg.model.backbone.fold_frozen_bn = fold_frozen_bn
    for key, value in {"min_size_test": size, "max_size_test": 4 * size, "max_size_train": 4 * size}.items():
        setattr(cfg.model.input, key, value)
    cfg.model.input.min_size_train = [size]
    ours = build_model(cfg)
    ours.load_state_dict(state)  # strict: the converted weights are the whole state dict
    return ours


def images_and_targets(size: int):
    generator = torch.Generator().manual_seed(2)
    images = [torch.rand(3, size, 2 * size, generator=generator)]  # multiples of 128: no extra padding
    targets = [{
        "boxes": torch.tensor([[10.0, 20.0, 90.0, 100.0], [120.0, 30.0, 250.0, 120.0], [5.0, 5.0, 30.0, 22.0]]),
        "labels": torch.tensor([0, 2, 1]),
    }]
    return images, targets


@pytest.fixture
def keep_zero_area_boxes(monkeypatch):
    """torchvision's RetinaNet keeps boxes clipped to zero width or height (its random-init heads
    here push most of the resnet50 boxes outside the image); we drop them (postprocess.MIN_BOX_SIZE).
    Keep them too, so every one of the detections is compared."""
    monkeypatch.setattr(postprocess, "MIN_BOX_SIZE", float("-inf"))


def sort_detections(det):
    order = torch.argsort(det["scores"], descending=True, stable=True)
    return {k: v[order] for k, v in det.items()}


@pytest.mark.parametrize("fold_frozen_bn, box_atol", [(False, 1e-4), (True, 1e-3)])
@pytest.mark.parametrize("builder", [resnet18, pytest.param(resnet50, marks=pytest.mark.slow)])
def test_detections_and_losses_equal_torchvision(builder, fold_frozen_bn, box_atol, keep_zero_area_boxes):
    """Unfolded, ours does torchvision's ops in its order: equal to 1e-4. Folded (the default), the
    frozen BN's affine is applied inside the convolution: rounding moves boxes by < 1e-3 px."""
    size = 128
    tv_model = make_torchvision_model(builder, num_classes=4, size=size)
    ours = converted(tv_model, size, fold_frozen_bn)
    images, targets = images_and_targets(size)

    tv_model.eval(), ours.eval()
    with torch.no_grad():
        theirs_det = sort_detections(tv_model(images)[0])
        ours_det = sort_detections(ours(images)[0])
    assert theirs_det["scores"].numel() > 50, "the test needs many detections to mean anything"
    assert ours_det["scores"].shape == theirs_det["scores"].shape
    torch.testing.assert_close(ours_det["scores"], theirs_det["scores"], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours_det["boxes"], theirs_det["boxes"], atol=box_atol, rtol=0)
    assert torch.equal(ours_det["labels"], theirs_det["labels"])

    tv_model.train(), ours.train()
    theirs_loss = tv_model(images, [dict(t) for t in targets])
    ours_loss = ours(images, [dict(t) for t in targets])
    torch.testing.assert_close(ours_loss["loss_cls"], theirs_loss["classification"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ours_loss["loss_box"], theirs_loss["bbox_regression"], atol=1e-4, rtol=1e-5)


def test_converter_infers_depth_classes_and_torchvision_choices():
    tv_model = make_torchvision_model(resnet18, num_classes=7, size=128)
    state, cfg = convert_torchvision_state_dict(tv_model.state_dict())
    assert cfg.model.backbone.depth == 18
    assert cfg.model.num_classes == 7
    assert cfg.model.fpn.p6_from == "p5"
    assert cfg.model.anchors.torchvision_compat
    assert cfg.model.matcher.allow_low_quality_matches
    assert cfg.model.loss.box == "l1"
    assert cfg.model.inference.detections_per_image == 300
    assert state["head.cls_subnet.6.weight"].shape == (256, 256, 3, 3)  # 4th conv after 3 (conv, ReLU) pairs
    torch.testing.assert_close(state["head.box_deltas.bias"], tv_model.head.regression_head.bbox_reg.bias)


def test_converter_rejects_foreign_state_dict():
    tv_model = make_torchvision_model(resnet18, num_classes=2, size=128)
    state = tv_model.state_dict()
    state["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="roi_heads.box_predictor"):
        convert_torchvision_state_dict(state)


def test_convert_cli_writes_a_checkpoint_that_detects_like_torchvision(tmp_path, keep_zero_area_boxes):
    from retinanet.cli import main
    from retinanet.checkpoint import config_of, load_checkpoint

    size = 128
    tv_model = make_torchvision_model(resnet18, num_classes=3, size=size).eval()
    torch.save(tv_model.state_dict(), tmp_path / "tv.pth")
    assert main(["convert", "--from", "torchvision", str(tmp_path / "tv.pth"), str(tmp_path / "ours.pth")]) == 0
    checkpoint = load_checkpoint(tmp_path / "ours.pth")
    cfg = config_of(checkpoint)
    cfg.model.input.min_size_test, cfg.model.input.max_size_test = size, 4 * size
    ours = build_model(cfg, checkpoint["class_names"])
    ours.load_state_dict(checkpoint["model"])
    images, _ = images_and_targets(size)
    with torch.no_grad():
        theirs_det, ours_det = sort_detections(tv_model(images)[0]), sort_detections(ours.eval()(images)[0])
    torch.testing.assert_close(ours_det["boxes"], theirs_det["boxes"], atol=1e-3, rtol=0)  # the default folds frozen BN
