"""Detector.predict takes what people hold: paths, PIL images, numpy arrays (RGB or BGR), tensors of
1, 3 or 4 channels in uint8 or float 0..1, and lists of them; each gives the detections of the same
image read from its file. Inputs it cannot take fail with an error saying what was expected."""

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet.inference import Detector


@pytest.fixture(scope="module")
def detector(varied_checkpoint):
    return Detector.from_checkpoint(varied_checkpoint[0], device="cpu")


def noise_pixels(height=64, width=96, channels=3, seed=0):
    """(H, W, C) uint8 noise."""
    generator = np.random.default_rng(seed)
    return generator.integers(0, 256, (height, width, channels), dtype=np.uint8)


def assert_same_detections(got, expected, atol=0.0):
    """Equal detections; `atol` for images that went through the model in a batch (another conv
    algorithm can round differently in the last bit)."""
    assert len(expected["boxes"]) > 0
    torch.testing.assert_close(got["boxes"], expected["boxes"], rtol=0, atol=atol)
    torch.testing.assert_close(got["scores"], expected["scores"], rtol=0, atol=atol)
    assert torch.equal(got["labels"], expected["labels"]) and got["class_names"] == expected["class_names"]


def test_every_rgb_input_type_equals_the_file(detector, tmp_path):
    rgb = noise_pixels()
    path = tmp_path / "x.png"
    Image.fromarray(rgb).save(path)
    expected = detector.predict(str(path))
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)
    same_image = {
        "Path": path,
        "PIL image": Image.open(path),
        "numpy HWC uint8": rgb,
        "numpy read-only (np.asarray of a PIL image)": np.asarray(Image.open(path)),
        "numpy BGR (OpenCV)": rgb[:, :, ::-1],
        "uint8 (3, H, W)": tensor,
        "float (3, H, W) in 0..1": tensor.float() / 255,
        "float64 numpy HWC in 0..1": rgb / 255.0,
    }
    for name, item in same_image.items():
        got = detector.predict(item, bgr=name == "numpy BGR (OpenCV)")
        assert isinstance(got, dict), name
        assert_same_detections(got, expected)
    batch = detector.predict(tensor.unsqueeze(0).repeat(2, 1, 1, 1))  # (B, 3, H, W) counts as a list
    assert isinstance(batch, list) and len(batch) == 2
    for got in [*batch, *detector.predict([path, Image.open(path), rgb, tensor], batch_size=3)]:
        assert_same_detections(got, expected, atol=1e-4)
    assert len(detector.predict(np.stack([rgb, rgb]))) == 2  # (B, H, W, C) array counts as a list


def test_gray_and_rgba_inputs_equal_their_files(detector, tmp_path):
    gray = noise_pixels(channels=1, seed=1)[:, :, 0]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    expected = detector.predict(tmp_path / "gray.png")
    gray_tensor = torch.from_numpy(gray)
    for item in (gray_tensor, gray_tensor.unsqueeze(0), gray, gray[:, :, None], Image.fromarray(gray)):
        assert_same_detections(detector.predict(item), expected)

    rgba = noise_pixels(channels=4, seed=2)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    expected = detector.predict(tmp_path / "rgba.png")  # alpha dropped
    for item in (torch.from_numpy(rgba).permute(2, 0, 1), rgba, Image.fromarray(rgba)):
        assert_same_detections(detector.predict(item), expected)


@pytest.mark.parametrize(
    ("item", "error", "words"),
    [
        (torch.full((3, 32, 32), 200.0), ValueError, r"the input: a float image must hold values in 0\.\.1, got values up to 200"),
        (torch.full((3, 32, 32), -1.5), ValueError, r"values down to -1\.5; pass the image before normalisation"),
        (np.zeros((3, 32, 48), np.uint8), ValueError, r"numpy image must be \(H, W, C\) .* got shape \(3, 32, 48\)"),
        (torch.zeros(32, 48, 3, dtype=torch.uint8), ValueError, r"got shape \(32, 48, 3\); for channels last"),
        (torch.zeros(2, 32, 48, dtype=torch.uint8), ValueError, r"expected an image tensor \(3, H, W\)"),
        (torch.zeros(3, 32, 48, dtype=torch.int64), ValueError, r"expected a uint8 image or a float one in 0\.\.1, got dtype torch\.int64"),
        (torch.zeros(3, 0, 5, dtype=torch.uint8), ValueError, r"the input: the image has no pixels \(shape \(3, 0, 5\)\)"),
        (np.zeros((7, 0, 3), np.uint8), ValueError, r"the input: the image has no pixels \(shape \(3, 7, 0\)\)"),
        (42, TypeError, r"cannot read an image from a int"),
    ],
)
def test_inputs_it_cannot_take_say_what_is_expected(detector, item, error, words):
    with pytest.raises(error, match=words) as info:
        detector.predict(item)
    assert len(str(info.value)) < 400  # names the shape, never prints the pixels


def test_float_0_255_in_a_list_names_its_position(detector):
    good = torch.rand(3, 32, 32)
    with pytest.raises(ValueError, match=r"inputs\[1\]: a float image must hold values in 0\.\.1"):
        detector.predict([good, good * 255])


def test_missing_file_is_file_not_found(detector, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.jpg"):
        detector.predict(tmp_path / "missing.jpg")
    with pytest.raises(FileNotFoundError, match=r"missing\.jpg"):
        detector.predict([str(tmp_path / "missing.jpg")])
