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
