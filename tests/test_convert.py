"""torchvision weights of every depth and both layouts, converted with `retinanet convert` and used
through every command that takes a checkpoint: strict loading, torchvision's detections to 1e-4."""

import json
from functools import partial

import pytest
import torch
from torch import nn
from torchvision.io import write_png
from torchvision.models import resnet18, resnet34, resnet50, resnet101, resnet152
from torchvision.models.detection import RetinaNet as TorchvisionRetinaNet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.retinanet import RetinaNetHead as TorchvisionHead
from torchvision.models.detection.retinanet import _default_anchorgen
from torchvision.ops import FrozenBatchNorm2d, box_iou
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from retinanet.checkpoint import load_checkpoint, load_model
from retinanet.cli import main
from retinanet.convert import TORCHVISION_COCO_NAMES
from retinanet.data import make_synthetic
from retinanet.engine.evaluator import label_to_category_ids
from retinanet.inference import Detector

SIZE = 128
C5_CHANNELS = {resnet18: 512, resnet34: 512, resnet50: 2048, resnet101: 2048, resnet152: 2048}
# Inference at the torchvision model's sizes, with torchvision's two ops for conv -> frozen BN.
EXACT = [f"model.input.min_size_test={SIZE}", f"model.input.max_size_test={4 * SIZE}",
         "model.backbone.fold_frozen_bn=false"]


def torchvision_retinanet(builder, layout: str, num_classes: int) -> TorchvisionRetinaNet:
    """A random torchvision RetinaNet: v1 (P6 from P5, plain heads) or v2 (P6 from C5, GroupNorm
    heads, as retinanet_resnet50_fpn_v2), with non-trivial frozen BN and spread class biases."""
    torch.manual_seed(0)
    p6_in = 256 if layout == "v1" else C5_CHANNELS[builder]
    backbone = _resnet_fpn_extractor(
        # zero_init_residual: the randomised last BN of each block is then ~0.1 (below), so that
        # activations stay finite through 50 blocks, as in a trained network.
        builder(weights=None, norm_layer=FrozenBatchNorm2d, zero_init_residual=True), 3, returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(p6_in, 256),
    )
    anchor_generator = _default_anchorgen()
    head = None
    if layout == "v2":
        head = TorchvisionHead(256, anchor_generator.num_anchors_per_location()[0], num_classes,
                               norm_layer=partial(nn.GroupNorm, 32))
    model = TorchvisionRetinaNet(backbone, num_classes, min_size=SIZE, max_size=4 * SIZE,
                                 anchor_generator=anchor_generator, head=head)
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            for buffer in (module.weight, module.bias, module.running_mean):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1 + (buffer == 1).float())
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
        if isinstance(module, nn.GroupNorm):
            with torch.no_grad():
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    with torch.no_grad():  # scores spread over anchors: near-equal scores could swap places in NMS
        for conv in model.head.classification_head.conv.modules():
            if isinstance(conv, nn.Conv2d):  # N(0, 0.01) would shrink the features to nothing
                nn.init.kaiming_normal_(conv.weight, generator=generator)
        cls_logits = model.head.classification_head.cls_logits
        cls_logits.weight.copy_(torch.randn(cls_logits.weight.shape, generator=generator) * 0.01)
        cls_logits.bias.copy_(torch.randn(cls_logits.bias.shape, generator=generator) * 1.5 - 1.5)
    return model.eval()


def convert(tmp_path, tv_model) -> str:
    torch.save(tv_model.state_dict(), tmp_path / "tv.pth")
    out = str(tmp_path / "ours.pth")
    assert main(["convert", "--from", "torchvision", str(tmp_path / "tv.pth"), out]) == 0
    return out


def sorted_by_score(det):
    order = torch.argsort(det["scores"], descending=True, stable=True)
    return {k: v[order] for k, v in det.items() if isinstance(v, torch.Tensor)}


def without_zero_area(det):
    """torchvision also returns boxes that clip to a line at the image border; ours drops them
    (retinanet.modeling.postprocess.MIN_BOX_SIZE). They overlap nothing, so NMS keeps the rest the same."""
    sizes = det["boxes"][:, 2:] - det["boxes"][:, :2]
    keep = (sizes > 1e-2).all(dim=1)
    return {k: v[keep] for k, v in det.items()}


def assert_same_detections(ours, theirs, atol=1e-4):
    ours, theirs = sorted_by_score(ours), without_zero_area(sorted_by_score(theirs))
    assert theirs["scores"].numel() > 20, "the test needs many detections to mean anything"
    # Where torchvision's top detections held zero-area boxes, ours holds the next ones instead.
    ours = {k: v[: theirs["scores"].numel()] for k, v in ours.items()}
    assert ours["scores"].shape == theirs["scores"].shape
    assert_one_to_one(ours, theirs, atol)


def assert_one_to_one(ours, theirs, atol):
    """Each of torchvision's detections has its own equal one among ours: same label, box and score
    to atol. Sorting both by score is not enough: scores equal to 1e-6 may swap places. Where two
    overlapping boxes of one class score the same to atol, NMS may keep either: such a swapped pair
    (theirs kept one, ours the other) counts as equal, for at most 2% of the detections."""
    distance = torch.maximum(
        (ours["boxes"][:, None] - theirs["boxes"][None]).abs().amax(dim=2),
        (ours["scores"][:, None] - theirs["scores"][None]).abs(),
    )
    distance[ours["labels"][:, None] != theirs["labels"][None]] = float("inf")
    taken = torch.zeros(len(ours["scores"]), dtype=torch.bool)
    unmatched = []
    for j in range(len(theirs["scores"])):
        column = distance[:, j].masked_fill(taken, float("inf"))
        best = int(column.argmin())
        if column[best] <= atol:
            taken[best] = True
        else:
            unmatched.append(j)
    for j in unmatched:
        swapped = (
            ~taken & (ours["labels"] == theirs["labels"][j])
            & ((ours["scores"] - theirs["scores"][j]).abs() <= atol)
            & (box_iou(ours["boxes"], theirs["boxes"][j : j + 1])[:, 0] > 0.5)
        )
        assert swapped.any(), f"torchvision's detection {j} has no equal among ours: {theirs['boxes'][j]}"
        taken[int(swapped.nonzero()[0])] = True
    assert len(unmatched) <= 0.02 * len(theirs["scores"]), f"{len(unmatched)} swapped NMS decisions"


def sample_images():
    generator = torch.Generator().manual_seed(2)
    return [torch.rand(3, SIZE, 2 * SIZE, generator=generator), torch.rand(3, SIZE, SIZE, generator=generator)]


LAYOUTS = [
    (resnet18, "v1"), (resnet18, "v2"),
    pytest.param(resnet34, "v1", marks=pytest.mark.slow),
    pytest.param(resnet50, "v1", marks=pytest.mark.slow),
    pytest.param(resnet50, "v2", marks=pytest.mark.slow),
    pytest.param(resnet101, "v1", marks=pytest.mark.slow),
    pytest.param(resnet152, "v2", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("builder, layout", LAYOUTS)
def test_converted_checkpoint_detects_like_torchvision(tmp_path, builder, layout):
    tv_model = torchvision_retinanet(builder, layout, num_classes=4)
    checkpoint = convert(tmp_path, tv_model)
    detector = Detector.from_checkpoint(checkpoint, device="cpu", overrides=EXACT)
    cfg = load_model(checkpoint)[1]
    assert cfg.model.head.norm == ("gn" if layout == "v2" else "none")
    assert cfg.model.fpn.p6_from == ("c5" if layout == "v2" else "p5")
    images = sample_images()
    with torch.no_grad():
        theirs = tv_model(images)
    for ours_det, theirs_det in zip(detector.predict(images), theirs):
        assert_same_detections(ours_det, theirs_det)


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_converted_checkpoint_through_eval_infer_and_export(tmp_path, layout):
    """The path of the README: convert, then eval / infer / export on the command line."""
    tv_model = torchvision_retinanet(resnet18, layout, num_classes=3)
    checkpoint = convert(tmp_path, tv_model)
    make_synthetic(tmp_path / "data", num_train=2, num_val=3, image_size=SIZE, seed=0)
    data = [f"data.val.ann_file={tmp_path / 'data/annotations/instances_val.json'}",
            f"data.val.img_dir={tmp_path / 'data/val'}", "data.num_workers=0", "train.device=cpu"]
    assert main(["eval", "--checkpoint", checkpoint, *data, *EXACT, "--output-dir", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) >= {"AP", "AP50", "per_class_AP"}

    image = (sample_images()[0] * 255).to(torch.uint8)
    write_png(image, str(tmp_path / "photo.png"))
    assert main(["infer", str(tmp_path / "photo.png"), "--checkpoint", checkpoint, "--output", str(tmp_path / "out"),
                 "--device", "cpu", "--score-thresh", "0.05", *EXACT]) == 0
    records = json.loads((tmp_path / "out" / "detections.json").read_text())
    with torch.no_grad():
        theirs = sorted_by_score(tv_model([image.float() / 255])[0])
    boxes = torch.tensor([d["box"] for d in records[0]["detections"]])
    scores = torch.tensor([d["score"] for d in records[0]["detections"]])
    theirs = without_zero_area(theirs)
    assert len(scores) >= len(theirs["scores"]) > 20
    labels = torch.tensor([d["label"] for d in records[0]["detections"]])
    count = len(theirs["scores"])
    assert_one_to_one({"boxes": boxes[:count], "scores": scores[:count], "labels": labels[:count]}, theirs, 1e-4)

    assert main(["export", str(tmp_path / "model.pt"), "--checkpoint", checkpoint, "--format", "torchscript",
                 "--image-size", str(SIZE), str(2 * SIZE), *EXACT]) == 0
    assert (tmp_path / "model.pt").stat().st_size > 0


def test_converted_coco_model_is_named_and_scored_by_coco_category():
    """torchvision's COCO layout: 91 outputs indexed by category id. The checkpoint names them,
    and evaluation sends label 1 (person) to category 1 and label 90 (toothbrush) to 90, not by
    position among the dataset's 80 sorted categories."""
    assert len(TORCHVISION_COCO_NAMES) == 91
    assert TORCHVISION_COCO_NAMES[1] == "person" and TORCHVISION_COCO_NAMES[90] == "toothbrush"
    coco_ids = [i for i, name in enumerate(TORCHVISION_COCO_NAMES) if name not in ("__background__", "N/A")]
    coco_names = [TORCHVISION_COCO_NAMES[i] for i in coco_ids]
    assert len(coco_ids) == 80
    mapping = label_to_category_ids(TORCHVISION_COCO_NAMES, coco_names, coco_ids)
    assert mapping[0] is None and mapping[12] is None  # background and an 'N/A' slot
    assert all(mapping[i] == i for i in coco_ids)
    # A model trained on the dataset keeps the positional mapping.
    assert label_to_category_ids(coco_names, coco_names, coco_ids) == coco_ids


def test_convert_writes_coco_names_for_a_91_class_model(tmp_path):
    tv_model = torchvision_retinanet(resnet18, "v1", num_classes=91)
    checkpoint = load_checkpoint(convert(tmp_path, tv_model))
    assert checkpoint["class_names"] == TORCHVISION_COCO_NAMES
    model, cfg = load_model(checkpoint)  # strict
    assert cfg.model.num_classes == 91 and model.class_names[1] == "person"
