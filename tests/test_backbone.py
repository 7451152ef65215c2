import pytest
import torch
import torchvision

from conftest import tiny_overrides
from retinanet import build_model, load_config
from retinanet.modeling import ResNetBackbone


def test_weights_from_a_local_file_are_loaded(tmp_path):
    torch.manual_seed(5)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # torchvision's ImageNet checkpoint layout, fc included
    model = build_model(load_config(None, tiny_overrides() + [f"model.backbone.weights={path}"]))
    for name, value in model.backbone.body.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(value, reference.state_dict()[name]), name


def test_bad_weight_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.backbone.weights: no file at"):
        build_model(load_config(None, tiny_overrides() + [f"model.backbone.weights={tmp_path / 'nope.pth'}"]))
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="not a ResNet-18 state dict"):
        build_model(load_config(None, tiny_overrides() + [f"model.backbone.weights={path}"]))


@pytest.mark.parametrize("freeze_at, frozen", [
    (0, []), (1, ["conv1", "bn1"]), (2, ["conv1", "bn1", "layer1"]), (5, ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]),
])
def test_freeze_at(freeze_at, frozen):
    backbone = ResNetBackbone(18, "bn", freeze_at)
    for name, module in backbone.body.items():
        params = list(module.parameters())
        if params:
            assert all(p.requires_grad != (name in frozen) for p in params), name


def test_frozen_batchnorm_and_output_strides():
    backbone = ResNetBackbone(18, "frozen_bn", 2)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    c3, c4, c5 = backbone(torch.rand(1, 3, 128, 256))
    assert [tuple(c.shape[1:]) for c in (c3, c4, c5)] == [(128, 16, 32), (256, 8, 16), (512, 4, 8)]


@pytest.mark.parametrize("depth", [18, 50])
def test_folded_frozen_bn_equals_torchvision_conv_then_bn(depth):
    """norm=frozen_bn folds each BN into its convolution: same outputs, gradients and state-dict keys
    as torchvision's ResNet with FrozenBatchNorm2d."""
    from torchvision.ops import FrozenBatchNorm2d

    from retinanet.modeling.frozen_bn import ConvFrozenBN2d

    torch.manual_seed(depth)
    reference = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=FrozenBatchNorm2d)
    for module in reference.modules():
        if isinstance(module, FrozenBatchNorm2d):  # the defaults (1, 0, 0, 1) would hide a mix-up
            module.weight.uniform_(0.5, 1.5), module.bias.normal_(), module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    backbone = ResNetBackbone(depth, "frozen_bn", freeze_at=0)
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert set(backbone.body.state_dict()) == set(state)
    backbone.body.load_state_dict(state)
    num_convs = sum(isinstance(m, torch.nn.Conv2d) for m in reference.modules())
    assert sum(isinstance(m, ConvFrozenBN2d) for m in backbone.modules()) == num_convs

    images = torch.randn(2, 3, 64, 96)
    c3, c4, c5 = backbone(images)
    r = reference
    r2 = r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(images)))))
    r3 = r.layer2(r2)
    r4 = r.layer3(r3)
    r5 = r.layer4(r4)
    for ours, theirs in zip((c3, c4, c5), (r3, r4, r5)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
    (c5.square().mean() + c3.mean()).backward()
    (r5.square().mean() + r3.mean()).backward()
    for name in ("conv1.weight", "layer2.0.downsample.0.weight", "layer4.0.conv1.weight"):
        ours, theirs = backbone.body.get_parameter(name).grad, reference.get_parameter(name).grad
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3 * theirs.abs().max().item())
