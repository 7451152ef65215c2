"""The infer command never harms its inputs, and one bad or extreme image costs only itself."""

import json
import logging
import warnings

import pytest
import torch
from torchvision.io import encode_jpeg, encode_png

from retinanet.cli import main
from retinanet.inference import Detector, infer_command


@pytest.fixture(scope="module")
def checkpoint(varied_checkpoint):
    return varied_checkpoint


def noise_image(height, width, seed=0):
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def write_image(path, image):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        encoded = encode_png(image) if path.suffix == ".png" else encode_jpeg(image)
    path.write_bytes(encoded.numpy().tobytes())
    return path


def snapshot(folder):
    """{name: bytes} of every file in a folder."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def infer_args(checkpoint_path, inputs, output):
    return ["infer", *inputs, "--checkpoint", str(checkpoint_path), "--output", str(output), "--device", "cpu"]


@pytest.mark.parametrize("names", [("a.jpg", "b.png"), ("a.png", "b.png")])
@pytest.mark.parametrize("trailing_slash", [False, True])
def test_output_folder_of_the_inputs_is_refused_and_inputs_stay_identical(
    checkpoint, tmp_path, caplog, names, trailing_slash
):
    """a.jpg would be replaced by its drawing; a.png would get a drawn a.jpg next to it, which the
    next run on the folder would read as an input."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed, name in enumerate(names):
        write_image(photos / name, noise_image(64, 96, seed))
    before = snapshot(photos)
    output = f"{photos}/" if trailing_slash else str(photos)
    with caplog.at_level(logging.ERROR):
        assert main(infer_args(checkpoint[0], [str(photos)], output)) == 2
    assert snapshot(photos) == before
    assert f"{photos / names[0]}" in caplog.text and "another output folder" in caplog.text


def test_output_file_linked_to_an_input_is_refused(checkpoint, tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    out.mkdir()
    original = write_image(photos / "a.jpg", noise_image(64, 96)).read_bytes()
    (out / "a.jpg").symlink_to(photos / "a.jpg")  # writing out/a.jpg would write through to the input
    with pytest.raises(ValueError, match=r"would overwrite the input image .*photos/a\.jpg"):
        infer_command(str(checkpoint[0]), [str(photos)], str(out), device="cpu")
    assert (photos / "a.jpg").read_bytes() == original
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg"]  # nothing written


def test_bad_and_extreme_images_are_skipped_or_processed_each_alone(checkpoint, tmp_path, caplog):
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    write_image(photos / "a_good.png", noise_image(64, 96, 1))
    write_image(photos / "b_strip.png", noise_image(1, 5000, 2))  # resized to 1x256, not 0x256
    write_image(photos / "c_column.png", noise_image(5000, 1, 3))
    (photos / "d_empty.png").write_bytes(b"")
    jpeg = write_image(photos / "e_truncated.jpg", noise_image(64, 64, 4)).read_bytes()
    (photos / "e_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    write_image(photos / "f_good.png", noise_image(80, 64, 5))
    with caplog.at_level(logging.WARNING):
        assert main(infer_args(checkpoint[0], [str(photos)], out) + ["--batch-size", "4"]) == 0
    records = json.loads((out / "detections.json").read_text())
    processed = ["a_good.png", "b_strip.png", "c_column.png", "f_good.png"]
    assert [r["file"] for r in records] == [str(photos / name) for name in processed]
    for record in records:
        boxes = torch.tensor([d["box"] for d in record["detections"]]).reshape(-1, 4)
        assert bool((boxes >= 0).all() and (boxes[:, 2] <= record["width"]).all() and (boxes[:, 3] <= record["height"]).all())
    assert sorted(p.name for p in out.glob("*.png")) == processed  # PNG inputs stay PNG
    assert [r["drawn"] for r in records] == processed
    skipped = json.loads((out / "skipped.json").read_text())
    assert [s["file"] for s in skipped] == [str(photos / "d_empty.png"), str(photos / "e_truncated.jpg")]
    assert "is an empty file (0 bytes)" in skipped[0]["reason"] and "truncated" in skipped[1]["reason"]
    assert "d_empty.png" in caplog.text and "e_truncated.jpg" in caplog.text


def test_exit_code_1_when_every_image_is_skipped(checkpoint, tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    (photos / "empty.png").write_bytes(b"")
    (photos / "text.jpg").write_bytes(b"not a jpeg")
    assert main(infer_args(checkpoint[0], [str(photos)], out)) == 1
    assert json.loads((out / "detections.json").read_text()) == []
    assert [s["file"] for s in json.loads((out / "skipped.json").read_text())] == [
        str(photos / "empty.png"), str(photos / "text.jpg")]


def test_a_failing_batch_is_retried_image_by_image(checkpoint, tmp_path, monkeypatch, caplog):
    """A forward that fails on one image (here: any batch holding a 77 px wide one) skips that image only."""
    forward = Detector._forward

    def fails_on_width_77(self, images):
        if any(image.shape[-1] == 77 for image in images):
            raise RuntimeError("simulated failure")
        return forward(self, images)

    monkeypatch.setattr(Detector, "_forward", fails_on_width_77)
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    for seed, (name, width) in enumerate([("a.png", 64), ("b.png", 77), ("c.png", 96)]):
        write_image(photos / name, noise_image(64, width, seed))
    with caplog.at_level(logging.WARNING):
        counts = infer_command(str(checkpoint[0]), [str(photos)], str(out), batch_size=4, device="cpu")
    assert counts == (2, 1)
    assert [r["file"] for r in json.loads((out / "detections.json").read_text())] == [
        str(photos / "a.png"), str(photos / "c.png")]
    assert json.loads((out / "skipped.json").read_text()) == [
        {"file": str(photos / "b.png"), "reason": "simulated failure"}]
    assert "b.png" in caplog.text


@pytest.mark.parametrize("shape", [(3, 1, 5000), (3, 5000, 1), (3, 2, 3000)])
def test_extreme_aspect_ratios_give_boxes_inside_the_image(checkpoint, shape):
    """With max_size_test 256, a 1x5000 image scaled by 256/5000 would be 0 px high."""
    _, model = checkpoint
    with torch.no_grad():
        det = model([torch.rand(shape, generator=torch.Generator().manual_seed(0))])[0]
    height, width = shape[1:]
    boxes = det["boxes"]
    assert boxes.shape[1:] == (4,) and len(det["scores"]) == len(boxes)
    assert bool((boxes >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all())


def test_output_folder_above_an_input_is_refused(checkpoint, tmp_path, caplog):
    """Inputs photos/a/*, output photos: the drawings would sit in the folder tree of the originals."""
    photos = tmp_path / "photos"
    (photos / "a").mkdir(parents=True)
    write_image(photos / "a" / "x.jpg", noise_image(64, 96))
    before = snapshot(photos / "a")
    with caplog.at_level(logging.ERROR):
        assert main(infer_args(checkpoint[0], [str(photos / "a")], photos)) == 2
    assert f"holds the input image {photos / 'a' / 'x.jpg'}" in caplog.text
    assert snapshot(photos / "a") == before and sorted(p.name for p in photos.iterdir()) == ["a"]


def test_output_folder_inside_a_recursively_searched_input_is_refused(checkpoint, tmp_path, caplog):
    """The next `infer photos --recursive` would read photos/out's drawings as inputs."""
    photos = tmp_path / "photos"
    photos.mkdir()
    write_image(photos / "a.jpg", noise_image(64, 96))
    with caplog.at_level(logging.ERROR):
        assert main(infer_args(checkpoint[0], [str(photos)], photos / "out") + ["--recursive"]) == 2
    assert "is searched recursively" in caplog.text and not (photos / "out").exists()
    assert main(infer_args(checkpoint[0], [str(photos)], photos / "out")) == 0  # a flat search never enters it
    assert main(infer_args(checkpoint[0], [str(photos)], photos / "out")) == 0  # nor on the next run
    assert sorted(p.name for p in (photos / "out").iterdir()) == ["a.jpg", "detections.json", "skipped.json"]
