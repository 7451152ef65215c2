"""ONNX and TorchScript exports give the eager model's detections, pre- and post-processing included."""

import json

import pytest
import torch
import torchvision  # noqa: F401  (registers torchvision::nms for torch.jit.load)

from conftest import varied_model
from retinanet.checkpoint import make_checkpoint, save_atomic
from retinanet.export import export_command, export_model

CLASS_NAMES = ["cat", "dog", "bird"]

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def checkpoint(varied_checkpoint):
    return varied_checkpoint


def noise_image(height, width, seed=1):
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed))


def assert_same_detections(boxes, scores, labels, expected):
    boxes, scores, labels = (torch.as_tensor(x) for x in (boxes, scores, labels))
    assert 10 <= len(expected["scores"]) < 100, "the test needs tens of detections"
    assert len(scores) == len(expected["scores"])
    order, expected_order = scores.argsort(descending=True), expected["scores"].argsort(descending=True)
    torch.testing.assert_close(boxes[order], expected["boxes"][expected_order], rtol=0, atol=1e-4)
    torch.testing.assert_close(scores[order], expected["scores"][expected_order], rtol=0, atol=1e-4)
    assert torch.equal(labels[order], expected["labels"][expected_order])
    assert labels.dtype == torch.int64


def test_torchscript_equals_eager(checkpoint, tmp_path):
    path, model = checkpoint
    image_size = (200, 150)  # resized to 170x128 inside, padded to 256x128
    export_model(path, "torchscript", tmp_path / "model.pt", image_size)
    extra = {"metadata.json": ""}
    exported = torch.jit.load(str(tmp_path / "model.pt"), _extra_files=extra)
    meta = json.loads(extra["metadata.json"])
    assert meta["class_names"] == CLASS_NAMES and meta["image_size"] == list(image_size)
    image = noise_image(*image_size)
    with torch.no_grad():
        expected = model([image])[0]
        assert_same_detections(*exported(image), expected)


@pytest.mark.parametrize("shape", [(3, 208, 150), (3, 150, 200), (3, 400, 75), (1, 3, 200, 150)])
def test_torchscript_refuses_another_image_size(checkpoint, tmp_path, shape):
    """Also with as many pixels as the export's size: a traced reshape to (3, 200, 150) let those
    through, and the boxes came back in 200x150 coordinates, outside a 150x200 image."""
    export_model(checkpoint[0], "torchscript", tmp_path / "model.pt", (200, 150))
    exported = torch.jit.load(str(tmp_path / "model.pt"))
    received = ", ".join(str(side) for side in shape)
    with torch.no_grad(), pytest.raises(torch.jit.Error, match=rf"shape \(3, 200, 150\), got \({received}\)"):
        exported(torch.rand(shape))


def test_onnx_refuses_another_image_size(checkpoint, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    export_model(checkpoint[0], "onnx", tmp_path / "model.onnx", (96, 128))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for shape in [(3, 128, 96), (3, 104, 128)]:
        with pytest.raises(Exception, match="(?i)invalid dimensions"):
            session.run(None, {"image": noise_image(*shape[1:]).numpy()})


def test_extreme_aspect_ratio_exports_and_equals_eager(checkpoint, tmp_path):
    """A 2x600 image with its long side capped at 256 px would resize to 0x256: it stays 1 px high."""
    path, model = checkpoint
    export_model(path, "torchscript", tmp_path / "model.pt", (2, 600))
    image = noise_image(2, 600)
    with torch.no_grad():
        boxes, scores, labels = torch.jit.load(str(tmp_path / "model.pt"))(image)
        expected = model([image])[0]
    assert len(scores) == len(expected["scores"])
    torch.testing.assert_close(boxes, expected["boxes"], rtol=0, atol=1e-4)
    assert bool((boxes[:, 2] <= 600).all() and (boxes[:, 3] <= 2).all())


def test_onnx_equals_eager(checkpoint, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path, model = checkpoint
    export_command(str(path), "onnx", str(tmp_path / "model.onnx"), [96, 128])
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and session.get_inputs()[0].shape == [3, 96, 128]
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == CLASS_NAMES
    image = noise_image(96, 128)
    with torch.no_grad():
        expected = model([image])[0]
    assert_same_detections(*session.run(None, {"image": image.numpy()}), expected)


def test_no_detection_gives_empty_outputs(tmp_path):
    model, cfg = varied_model(CLASS_NAMES, score_bias=-40.0)
    save_atomic(make_checkpoint(model.state_dict(), cfg, CLASS_NAMES), tmp_path / "model.pth")
    export_model(tmp_path / "model.pth", "torchscript", tmp_path / "model.pt")  # default: min_size_test square
    boxes, scores, labels = torch.jit.load(str(tmp_path / "model.pt"))(noise_image(128, 128))
    assert boxes.shape == (0, 4) and scores.shape == (0,) and labels.shape == (0,)


def test_unknown_format_is_rejected(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="tflite"):
        export_model(checkpoint[0], "tflite", tmp_path / "model.tflite")
