"""Detector and the infer command: same detections as the model itself, files in and out, bad inputs."""

import json
import logging
import warnings

import pytest
import torch
from torchvision.io import encode_png

from retinanet.checkpoint import load_model
from retinanet.inference import Detector, collect_images, infer_command, read_image

CLASS_NAMES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def checkpoint(varied_checkpoint):
    return varied_checkpoint


def noise_image(height, width, seed):
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def write_png(path, image):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        path.write_bytes(encode_png(image).numpy().tobytes())
    return path


def assert_same(det, expected):
    assert len(det["boxes"]) > 0
    torch.testing.assert_close(det["boxes"], expected["boxes"], rtol=0, atol=0)
    torch.testing.assert_close(det["scores"], expected["scores"], rtol=0, atol=0)
    assert torch.equal(det["labels"], expected["labels"])
    assert det["class_names"] == [CLASS_NAMES[label] for label in expected["labels"].tolist()]


def test_predict_tensor_path_and_list_equal_the_model(checkpoint, tmp_path):
    path, model = checkpoint
    images = [noise_image(96, 128, 1), noise_image(128, 80, 2)]
    files = [write_png(tmp_path / f"{i}.png", image) for i, image in enumerate(images)]
    with torch.no_grad():
        single = [model([image])[0] for image in images]
        both = model(images)
    detector = Detector.from_checkpoint(path, device="cpu")
    assert detector.class_names == CLASS_NAMES
    assert_same(detector.predict(images[0]), single[0])
    assert_same(detector.predict(images[1].float() / 255), single[1])
    assert_same(detector.predict(str(files[1])), single[1])
    listed = detector.predict(files, batch_size=2)
    assert isinstance(listed, list) and len(listed) == 2
    for det, expected in zip(listed, both):
        assert_same(det, expected)
    for det, expected in zip(detector.predict([images[0], files[1]], batch_size=1), single):
        assert_same(det, expected)


def test_score_thresh_and_config_come_from_the_checkpoint(checkpoint):
    path, _ = checkpoint
    model, cfg = load_model(path, overrides=["model.inference.nms_thresh=0.3"])
    assert cfg.model.num_classes == 3 and model.postprocessor.nms_thresh == 0.3
    detector = Detector.from_checkpoint(path, device="cpu", score_thresh=0.5)
    det = detector.predict(noise_image(96, 128, 1))
    assert len(det["scores"]) > 0 and bool((det["scores"] > 0.5).all())


def test_infer_command_writes_drawn_images_and_json_equal_to_predict(checkpoint, tmp_path):
    path, _ = checkpoint
    images = {"b.png": noise_image(96, 128, 1), "a.png": noise_image(128, 80, 2)}
    folder = tmp_path / "in"
    folder.mkdir()
    for name, image in images.items():
        write_png(folder / name, image)
    (folder / "notes.txt").write_text("not an image")
    counts = infer_command(str(path), [str(folder)], str(tmp_path / "out"), score_thresh=0.3, batch_size=2, device="cpu")
    assert counts == (2, 0) and counts.processed == 2
    records = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [r["file"] for r in records] == [str(folder / "a.png"), str(folder / "b.png")]  # sorted
    expected = Detector.from_checkpoint(path, "cpu", score_thresh=0.3).predict(
        [folder / "a.png", folder / "b.png"], batch_size=2)
    for record, det in zip(records, expected):
        name = record["file"].rsplit("/", 1)[-1]
        assert (record["height"], record["width"]) == tuple(images[name].shape[-2:])
        assert len(record["detections"]) == len(det["scores"]) > 0
        assert torch.tensor([d["box"] for d in record["detections"]]).equal(det["boxes"])
        assert [d["score"] for d in record["detections"]] == det["scores"].tolist()
        assert [d["class_name"] for d in record["detections"]] == det["class_names"]
        assert all(d["score"] > 0.3 for d in record["detections"])
        drawn = read_image(tmp_path / "out" / name.replace(".png", ".jpg"))
        assert drawn.shape == images[name].shape


def test_infer_command_skips_a_corrupt_image_with_a_warning(checkpoint, tmp_path, caplog):
    path, _ = checkpoint
    good = [write_png(tmp_path / f"good{i}.png", noise_image(64, 96, i)) for i in range(2)]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with caplog.at_level(logging.WARNING):
        counts = infer_command(str(path), [str(good[0]), str(corrupt), str(tmp_path / "good1.*")],
                               str(tmp_path / "out"), batch_size=2, device="cpu")
    assert counts == (2, 1)
    assert "corrupt.jpg" in caplog.text
    skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert [s["file"] for s in skipped] == [str(corrupt)] and "cannot decode" in skipped[0]["reason"]
    records = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [r["file"] for r in records] == [str(good[0]), str(good[1])]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.jpg")) == ["good0.jpg", "good1.jpg"]


def test_collect_images_errors_name_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        collect_images([str(tmp_path / "missing.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image found"):
        collect_images([str(tmp_path / "empty"), str(tmp_path / "*.jpg")])
    (tmp_path / "x").mkdir()
    a = write_png(tmp_path / "x" / "a.png", noise_image(8, 8, 0))
    assert collect_images([str(a), str(tmp_path / "x")]) == [a]  # listed twice, kept once
