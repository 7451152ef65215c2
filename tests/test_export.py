"""ONNX and TorchScript exports take a (B, 3, H, W) batch of any size and give the eager model's
detections, pre- and post-processing included.

Each file is exported once per module (a module-scoped fixture per format and variant) and run on
several sizes: (480, 640) resizes by the short side (min_size_test 128: to 128x170), (150, 400) by
the long side (max_size_test 256: to 96x256), (128, 128) not at all.
"""

import json
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch
import torch.nn.functional as F
import torchvision  # noqa: F401  (registers torchvision::nms for torch.jit.load)

from retinanet.checkpoint import load_model
from retinanet.cli import main
from retinanet.export import (
    FORMATS, bilinear_resize, export_command, export_model, first_per_image, grid_anchors, resized_size,
)
from retinanet.modeling.preprocess import resize_scale
from retinanet.modeling.preprocess import resized_size as eager_resized_size

CLASS_NAMES = ["cat", "dog", "bird"]
SIZES = [(480, 640), (150, 400), (128, 128)]
LOW_THRESH = "model.inference.score_thresh=0.00001"  # a 2 px strip scores ~3e-5 with the varied model

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated:FutureWarning")


class Exported(NamedTuple):
    fmt: str
    path: Path
    run: Callable  # (B, 3, H, W) images -> (boxes, scores, labels, num_detections) tensors


def file_for(fmt, folder) -> Path:
    """folder/model.onnx or folder/model.pt; skips ONNX where onnx or onnxruntime is missing."""
    if fmt == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
    return folder / ("model.onnx" if fmt == "onnx" else "model.pt")


def load_exported(fmt, path) -> Exported:
    if fmt == "torchscript":
        module = torch.jit.load(str(path))

        def run(images):
            with torch.no_grad():
                return module(images)
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run(images):
            return tuple(torch.as_tensor(output) for output in session.run(None, {"images": images.numpy()}))
    return Exported(fmt, path, run)


@pytest.fixture(scope="module")
def checkpoint(varied_checkpoint):
    return varied_checkpoint


@pytest.fixture(scope="module", params=FORMATS)
def exported(request, checkpoint, tmp_path_factory):
    """The default export (float32 input, traced at the default example size), through export_command."""
    path = file_for(request.param, tmp_path_factory.mktemp(request.param))
    export_command(str(checkpoint[0]), request.param, str(path))
    return load_exported(request.param, path)


@pytest.fixture(scope="module", params=FORMATS)
def exported_uint8(request, checkpoint, tmp_path_factory):
    """Exported for uint8 input through the command line (no --image-size: any size works)."""
    path = file_for(request.param, tmp_path_factory.mktemp("uint8"))
    assert main([
        "export", str(path), "--checkpoint", str(checkpoint[0]), "--format", request.param, "--input-dtype", "uint8",
    ]) == 0
    return load_exported(request.param, path)


@pytest.fixture(scope="module", params=FORMATS)
def exported_at_extreme_size(request, checkpoint, tmp_path_factory):
    """Traced at a 2x600 strip (resized to 1x256), with a threshold low enough for the strip to have
    detections; returns (exported, the eager model with that threshold)."""
    path = file_for(request.param, tmp_path_factory.mktemp("extreme"))
    export_model(checkpoint[0], request.param, path, image_size=(2, 600), overrides=[LOW_THRESH])
    return load_exported(request.param, path), load_model(checkpoint[0], overrides=[LOW_THRESH])[0].eval()


def noise_images(batch_size, height, width, seed=1):
    return torch.rand(batch_size, 3, height, width, generator=torch.Generator().manual_seed(seed))


def assert_same_detections(outputs, expected, box_atol=1e-3, score_atol=1e-4):
    """Image by image, the first num_detections rows equal the eager detections as sets (near-equal
    scores may swap places), the rest is padding."""
    boxes, scores, labels, num_detections = outputs
    assert labels.dtype == torch.int64 and num_detections.dtype == torch.int64
    assert num_detections.tolist() == [len(e["scores"]) for e in expected]
    for i, (count, reference) in enumerate(zip(num_detections.tolist(), expected)):
        assert_one_to_one(boxes[i, :count], scores[i, :count], labels[i, :count], reference, box_atol, score_atol)
        assert not boxes[i, count:].any() and not scores[i, count:].any() and bool((labels[i, count:] == -1).all())


def assert_one_to_one(boxes, scores, labels, expected, box_atol, score_atol):
    box_distance = (boxes[:, None] - expected["boxes"][None]).abs().amax(dim=2)
    score_distance = (scores[:, None] - expected["scores"][None]).abs()
    equal = (box_distance <= box_atol) & (score_distance <= score_atol) & (labels[:, None] == expected["labels"][None])
    taken = torch.zeros(len(scores), dtype=torch.bool)
    for j in range(len(expected["scores"])):
        candidates = (equal[:, j] & ~taken).nonzero()
        assert len(candidates), f"eager detection {j} {expected['boxes'][j].tolist()} has no equal in the export"
        taken[candidates[0, 0]] = True


@pytest.mark.parametrize("size", SIZES)
def test_any_size_equals_eager(exported, checkpoint, size):
    images = noise_images(1, *size)
    with torch.no_grad():
        expected = checkpoint[1](list(images))
    assert len(expected[0]["scores"]) >= 10, "the test needs tens of detections"
    assert_same_detections(exported.run(images), expected)


def test_a_batch_equals_eager_image_by_image(exported, checkpoint):
    """Three images in one call: noise fills D = 100, a flat grey image has no detection, a half-grey
    one some (the uint8 test runs a batch that is resized)."""
    images = noise_images(3, 128, 128, seed=2)
    images[1] = 0.5
    images[2, :, :64] = 0.5
    with torch.no_grad():
        expected = checkpoint[1](list(images))
    assert [len(e["scores"]) for e in expected] == [100, 0, 20]
    outputs = exported.run(images)
    assert [tuple(output.shape) for output in outputs] == [(3, 100, 4), (3, 100), (3, 100), (3,)]
    assert_same_detections(outputs, expected)


def test_uint8_input_equals_eager(exported_uint8, checkpoint):
    images = (noise_images(2, 480, 640, seed=3) * 255).round().to(torch.uint8)
    with torch.no_grad():
        expected = checkpoint[1](list(images))
    assert_same_detections(exported_uint8.run(images), expected)


# A strip's scores are ~3e-5, so 1e-6 rather than 1e-4; not tighter: onnxruntime's Sigmoid is a
# rational approximation, ~1e-7 off (0.6% of a 3e-5 score).
@pytest.mark.parametrize("size, score_atol", [((2, 600), 1e-6), ((600, 2), 1e-6), ((480, 640), 1e-4)])
def test_traced_at_an_extreme_aspect_ratio_any_size_equals_eager(exported_at_extreme_size, size, score_atol):
    """A 2x600 strip resizes to 1x256 (its short side floors to 0 px, kept at 1): traced there, the
    file still equals eager there, on its transpose and on a photo's size."""
    exported, model = exported_at_extreme_size
    images = noise_images(1, *size)
    with torch.no_grad():
        expected = model(list(images))
    assert len(expected[0]["scores"]) >= 10, "the test needs tens of detections"
    outputs = exported.run(images)
    assert_same_detections(outputs, expected, score_atol=score_atol)
    boxes = outputs[0][0, : int(outputs[3][0])]
    assert bool((boxes[:, 2] <= size[1]).all() and (boxes[:, 3] <= size[0]).all())


def test_no_detection_gives_zero_counts_and_padding(exported, checkpoint):
    """A 2 px strip scores below 0.05 everywhere with this model."""
    images = noise_images(2, 2, 600)
    with torch.no_grad():
        assert all(len(e["scores"]) == 0 for e in checkpoint[1](list(images)))
    boxes, scores, labels, num_detections = exported.run(images)
    assert num_detections.tolist() == [0, 0]
    assert not boxes.any() and not scores.any() and bool((labels == -1).all())


def test_metadata_and_declared_input(exported):
    if exported.fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
        (declared,) = session.get_inputs()
        assert (declared.name, declared.shape) == ("images", ["batch", 3, "height", "width"])
        assert declared.type == "tensor(float)"
        assert [output.name for output in session.get_outputs()] == ["boxes", "scores", "labels", "num_detections"]
        meta = {key: json.loads(value) for key, value in session.get_modelmeta().custom_metadata_map.items()}
    else:
        extra = {"metadata.json": ""}
        torch.jit.load(str(exported.path), _extra_files=extra)
        meta = json.loads(extra["metadata.json"])
    assert meta["class_names"] == CLASS_NAMES and meta["input_dtype"] == "float32"
    assert "dynamic input (B, 3, H, W)" in meta["input"] and meta["detections_per_image"] == 100


@pytest.mark.parametrize("shape, dtype, torchscript_error, onnx_error", [
    ((3, 128, 128), torch.float32, r"shape \(B, 3, H, W\), got \(3, 128, 128\); give one image", "(?i)invalid rank"),
    ((1, 1, 64, 64), torch.float32, r"shape \(B, 3, H, W\), got \(1, 1, 64, 64\)", "(?i)invalid dimensions"),
    ((1, 3, 64, 64), torch.uint8, r"float images in 0\.\.1; convert uint8 images", "(?i)unexpected input data type"),
])
def test_a_wrong_input_is_refused_with_a_clear_error(exported, shape, dtype, torchscript_error, onnx_error):
    images = torch.zeros(shape, dtype=dtype)
    if exported.fmt == "torchscript":
        with pytest.raises(torch.jit.Error, match=torchscript_error):
            exported.run(images)
    else:
        with pytest.raises(Exception, match=onnx_error):
            exported.run(images)


def test_a_uint8_file_refuses_float_images(exported_uint8):
    if exported_uint8.fmt == "torchscript":
        with pytest.raises(torch.jit.Error, match=r"uint8 images in 0\.\.255; convert float images"):
            exported_uint8.run(noise_images(1, 64, 64))
    else:
        with pytest.raises(Exception, match="(?i)unexpected input data type"):
            exported_uint8.run(noise_images(1, 64, 64))


@pytest.mark.parametrize("height, width", [(480, 640), (150, 400), (128, 128), (2, 600), (600, 2), (1, 1),
                                           (800, 1333), (427, 640), (333, 500), (1000, 97),
                                           (41, 41), (49, 49), (83, 83)])
def test_resized_size_is_the_eager_preprocessors(height, width):
    expected = eager_resized_size(height, width, resize_scale(height, width, 128, 256))
    got = resized_size(torch.tensor(height), torch.tensor(width), 128, 256)
    assert (int(got[0]), int(got[1])) == expected


@pytest.mark.parametrize("height, width, expected", [
    (480, 640, (128, 170)),  # short side to min_size 128
    (150, 400, (96, 256)),  # long side to max_size 256
    (2, 600, (1, 256)),  # 2 * 0.4267 floors to 0: kept at 1 px
    (41, 41, (128, 128)),  # float32 scale would give 127
    (49, 49, (127, 127)),  # 49 * (128 / 49) = 127.99999999999999 in Python: float32 would give 128
])
def test_resized_size_by_hand(height, width, expected):
    got = resized_size(torch.tensor(height), torch.tensor(width), 128, 256)
    assert (int(got[0]), int(got[1])) == expected


@pytest.mark.parametrize("in_size, out_size", [((480, 640), (128, 170)), ((96, 128), (128, 170)), ((2, 600), (1, 256))])
def test_bilinear_resize_equals_interpolate(in_size, out_size):
    images = noise_images(2, *in_size)
    expected = F.interpolate(images, size=out_size, mode="bilinear", align_corners=False)
    got = bilinear_resize(images, torch.tensor(out_size[0]), torch.tensor(out_size[1]))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_grid_anchors_are_the_anchor_generators(checkpoint):
    generator = checkpoint[1].anchor_generator
    grid_sizes = [(16, 22), (8, 11), (4, 6), (2, 3), (1, 2)]
    expected = generator(grid_sizes)
    got = torch.cat([
        grid_anchors(getattr(generator, f"cell_anchors_{level}"), stride, torch.zeros(1, 1, height, width))
        for level, (stride, (height, width)) in enumerate(zip(generator.strides, grid_sizes))
    ])
    assert torch.equal(got, expected)


def test_first_per_image_by_hand():
    """Detections of images 1, 0, 1, 1, 0 in score order, 3 images, D = 2: image 0 gets list entries
    1 and 4, image 1 entries 0 and 2 (3 is its third), image 2 none (5 = the padding row)."""
    position, count = first_per_image(torch.tensor([1, 0, 1, 1, 0]), torch.tensor(3), 2)
    assert position.tolist() == [[1, 4], [0, 2], [5, 5]]
    assert count.tolist() == [2, 2, 0]


def test_unknown_format_or_dtype_is_rejected(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="tflite"):
        export_model(checkpoint[0], "tflite", tmp_path / "model.tflite")
    with pytest.raises(ValueError, match="float16"):
        export_model(checkpoint[0], "onnx", tmp_path / "model.onnx", input_dtype="float16")
