"""The one image reader: EXIF orientation, every format and mode to RGB uint8, errors in words, and
the COCO dataset reading through it (boxes in the displayed frame)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from retinanet.data.coco import BadImageError, CocoDetection, check_image_files
from retinanet.data.image import UnreadableImageError, read_image

ORIENTATION_TAG = 0x0112
LOSSLESS_SUFFIXES = (".png", ".webp", ".tif")


def stored_pixels(height=40, width=60):
    """(H, W, 3) uint8: dark gray, with a red 10x10 block at the stored top-left corner and a green
    10x10 block at the stored bottom-left, so that every rotation and flip is told apart."""
    pixels = np.full((height, width, 3), 50, np.uint8)
    pixels[:10, :10] = (255, 0, 0)
    pixels[-10:, :10] = (0, 255, 0)
    return pixels


def save(path, pixels, orientation=None, **kwargs):
    """Write `pixels` with PIL (format by suffix), tagged with an EXIF orientation if given."""
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = orientation
        kwargs["exif"] = exif.tobytes()
    if path.suffix == ".webp":
        kwargs.setdefault("lossless", True)
    Image.fromarray(pixels).save(path, **kwargs)
    return path


def chw(pixels):
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1)


@pytest.mark.parametrize("suffix", [".jpg", *LOSSLESS_SUFFIXES])
def test_orientation_6_is_applied_the_photo_is_read_upright(tmp_path, suffix):
    """Orientation 6: stored 60x40 (WxH), shown turned 90 degrees clockwise: 40 wide, 60 high, the
    stored top-left corner at the top right."""
    stored = stored_pixels()
    path = save(tmp_path / f"phone{suffix}", stored, orientation=6, **({"quality": 95} if suffix == ".jpg" else {}))
    image = read_image(path)
    assert image.shape == (3, 60, 40) and image.dtype == torch.uint8
    expected = torch.rot90(chw(stored), k=-1, dims=(1, 2))  # clockwise
    if suffix == ".jpg":
        assert (image.int() - expected.int()).abs().float().mean() < 3
        assert image[0, 2:8, -8:-2].float().mean() > 200 and image[1, 2:8, 2:8].float().mean() > 200  # red TR, green TL
    else:
        assert torch.equal(image, expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pillows_exif_transpose(tmp_path, orientation):
    path = save(tmp_path / "x.png", stored_pixels(), orientation=orientation)
    with Image.open(path) as reference:
        expected = chw(np.asarray(ImageOps.exif_transpose(reference).convert("RGB")))
    assert torch.equal(read_image(path), expected)
    assert read_image(path).shape[1:] == ((40, 60) if orientation <= 4 else (60, 40))


@pytest.mark.parametrize("suffix", [".bmp", ".tif", ".tiff", ".gif", ".webp"])
def test_formats_torchvision_cannot_read_come_through_pillow(tmp_path, suffix):
    stored = stored_pixels()
    image = read_image(save(tmp_path / f"x{suffix}", stored))
    assert image.shape == (3, 40, 60) and image.dtype == torch.uint8
    if suffix != ".gif":  # GIF quantises to a palette, which keeps these three colours anyway
        assert torch.equal(image, chw(stored))
    assert image[:, 0, 0].tolist() == [255, 0, 0] and image[:, -1, 0].tolist() == [0, 255, 0]


@pytest.mark.parametrize(
    ("mode", "suffix", "value", "expected_rgb"),
    [
        ("L", ".png", 123, [123, 123, 123]),
        ("LA", ".png", (123, 7), [123, 123, 123]),
        ("P", ".png", None, [255, 0, 0]),
        ("RGBA", ".png", (10, 20, 30, 0), [10, 20, 30]),  # alpha dropped, not composited
        ("RGBA", ".tif", (10, 20, 30, 0), [10, 20, 30]),
        ("CMYK", ".jpg", None, None),
        ("I;16", ".png", 123 * 256 + 200, [123, 123, 123]),  # 16-bit: the high byte
        ("I;16", ".tif", 123 * 256 + 200, [123, 123, 123]),
    ],
)
def test_every_mode_becomes_rgb_uint8(tmp_path, mode, suffix, value, expected_rgb):
    if mode == "P":
        picture = Image.new("RGB", (6, 4), (255, 0, 0)).convert("P")
    elif mode == "CMYK":
        picture = Image.new("RGB", (6, 4), (200, 100, 50)).convert("CMYK")
    else:
        picture = Image.new(mode, (6, 4), value)
    picture.save(tmp_path / f"x{suffix}")
    image = read_image(tmp_path / f"x{suffix}")
    assert image.shape == (3, 4, 6) and image.dtype == torch.uint8
    if expected_rgb is not None:
        assert image[:, 0, 0].tolist() == expected_rgb and bool((image == image[:, :1, :1]).all())
    else:  # CMYK JPEG: about the colour it was made from
        assert (image[:, 0, 0].int() - torch.tensor([200, 100, 50])).abs().max() < 20


def test_an_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (5, 3), color) for color in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    image = read_image(tmp_path / "a.gif")
    assert image.shape == (3, 3, 5) and image[:, 1, 1].tolist() == [255, 0, 0]


def test_unreadable_files_raise_an_error_naming_the_file_in_words(tmp_path):
    jpeg = save(tmp_path / "ok.jpg", stored_pixels()).read_bytes()
    png = save(tmp_path / "ok.png", stored_pixels()).read_bytes()
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "folder.png").mkdir()
    expected = {
        "zero.jpg": "zero.jpg is an empty file (0 bytes)",
        "text.jpg": "text.jpg: Unsupported image file (not a JPEG, PNG, WEBP, GIF, BMP or TIFF image)",
        "cut.jpg": "cut.jpg: the file is truncated",
        "cut.png": "cut.png: the file is truncated",
        "folder.png": "folder.png: it is a folder, not an image file",
    }
    for name, words in expected.items():
        with pytest.raises(UnreadableImageError) as info:
            read_image(tmp_path / name)
        message = str(info.value)
        assert words in message and str(tmp_path / name) in message
        assert ".cpp" not in message and "decode_" not in message  # no C++ source location
        assert isinstance(info.value, ValueError)
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*missing\.jpg"):
        read_image(tmp_path / "missing.jpg")


# ---------------------------------------------------------------------------------------------
# The COCO dataset reads through it: annotations in the displayed frame.


def rotated_coco(tmp_path, json_size):
    """A JPEG stored 60x40 (WxH) with a bright 20x10 block at stored x 40..60, y 0..10, tagged
    orientation 6; shown 40x60, the block is at x 30..40, y 40..60. One box on it, in the displayed
    frame; the json's width and height as given."""
    stored = np.full((40, 60, 3), 30, np.uint8)
    stored[0:10, 40:60] = 230
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    save(img_dir / "phone.jpg", stored, orientation=6, quality=95)
    width, height = json_size
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "phone.jpg", "width": width, "height": height}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [30, 40, 10, 20], "area": 200, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "block"}],
    }))
    return ann_file, img_dir


def test_coco_boxes_of_a_rotated_photo_cover_the_right_pixels(tmp_path):
    ann_file, img_dir = rotated_coco(tmp_path, json_size=(40, 60))
    dataset = CocoDetection(ann_file, img_dir)
    check_image_files(dataset)  # the displayed size matches the json
    image, target = dataset[0]
    assert image.shape == (3, 60, 40)
    x1, y1, x2, y2 = (int(v) for v in target["boxes"][0].tolist())
    assert (x1, y1, x2, y2) == (30, 40, 40, 60)
    inside = image[:, y1 + 1 : y2 - 1, x1 + 1 : x2 - 1].float().mean()
    outside = image[:, :, : x1 - 1].float().mean()
    assert inside > 200 and outside < 60


def test_coco_json_in_the_stored_frame_is_refused_with_a_hint(tmp_path):
    ann_file, img_dir = rotated_coco(tmp_path, json_size=(60, 40))
    with pytest.raises(BadImageError, match=r"image 7: .*phone\.jpg is 40x60 \(WxH\) but the json says 60x40; .*EXIF"):
        CocoDetection(ann_file, img_dir)[0]


def test_coco_image_deleted_after_start_up_is_a_bad_image(tmp_path):
    ann_file, img_dir = rotated_coco(tmp_path, json_size=(40, 60))
    dataset = CocoDetection(ann_file, img_dir)
    (img_dir / "phone.jpg").unlink()
    with pytest.raises(BadImageError, match=r"ann\.json: image 7: image file not found: .*phone\.jpg"):
        dataset.load_image(0)
