"""Detector and the infer command: same detections as the model itself, files in and out, bad inputs."""

import json
import logging
import warnings

import pytest
import torch
from PIL import Image
from torchvision.io import encode_png

from retinanet.checkpoint import load_model
from retinanet.cli import main
from retinanet.config import dump_config
from retinanet.inference import (
    INFER_SCORE_THRESH,
    Detector,
    collect_images,
    infer_command,
    infer_score_thresh,
    read_image,
)

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
        assert record["drawn"] == name  # a PNG stays PNG
        drawn = read_image(tmp_path / "out" / name)
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
    assert sorted(p.name for p in (tmp_path / "out").glob("good*")) == ["good0.png", "good1.png"]


def test_collect_images_errors_name_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        collect_images([str(tmp_path / "missing.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image found"):
        collect_images([str(tmp_path / "empty"), str(tmp_path / "*.jpg")])
    (tmp_path / "x").mkdir()
    a = write_png(tmp_path / "x" / "a.png", noise_image(8, 8, 0))
    assert [image.path for image in collect_images([str(a), str(tmp_path / "x")])] == [a]  # listed twice, kept once


# ---------------------------------------------------------------------------------------------
# Real photo folders: nested folders, every format, EXIF orientation, the threshold rule.


def save_pil(path, pixels, orientation=None):
    """Write (H, W, 3) uint8 `pixels` with PIL (format by suffix), with an EXIF orientation if given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    Image.fromarray(pixels).save(path, **kwargs)
    return path


def noise_pixels(height, width, seed):
    return noise_image(height, width, seed).permute(1, 2, 0).numpy()


FORMAT_SIGNATURES = {".jpg": b"\xff\xd8\xff", ".png": b"\x89PNG"}


def test_infer_searches_folders_recursively_and_keeps_paths_and_formats(checkpoint, tmp_path, caplog):
    """photos/a/x.jpg and photos/b/x.jpg -> out/a/x.jpg and out/b/x.jpg; BMP, TIFF, GIF and WEBP are
    read and drawn as PNG; hidden files and folders are left out."""
    path, _ = checkpoint
    photos, out = tmp_path / "photos", tmp_path / "out"
    inputs = {"top.png": "top.png", "a/x.jpg": "a/x.jpg", "b/x.jpg": "b/x.jpg", "c/y.bmp": "c/y.png",
              "d/z.tif": "d/z.png", "d/deeper/v.tiff": "d/deeper/v.png", "e/w.gif": "e/w.png", "e/w.webp": "e/w_1.png"}
    for seed, name in enumerate(inputs):
        save_pil(photos / name, noise_pixels(48, 64, seed))
    save_pil(photos / ".cache" / "thumb.jpg", noise_pixels(8, 8, 0))
    (photos / "a" / "._x.jpg").write_bytes(b"AppleDouble resource fork, not an image")

    with caplog.at_level(logging.INFO):
        assert infer_command(str(path), [str(photos)], str(out / "flat"), device="cpu") == (1, 0)
    assert "5 subfolders not searched (--recursive searches them)" in caplog.text

    assert main(["infer", str(photos), "--recursive", "--checkpoint", str(path), "--output", str(out / "deep"),
                 "--device", "cpu"]) == 0
    records = json.loads((out / "deep" / "detections.json").read_text())
    assert {record["file"]: record["drawn"] for record in records} == {
        str(photos / name): drawn for name, drawn in inputs.items()}
    assert json.loads((out / "deep" / "skipped.json").read_text()) == []
    for record in records:
        drawn = out / "deep" / record["drawn"]
        assert drawn.read_bytes().startswith(FORMAT_SIGNATURES[drawn.suffix])
        assert read_image(drawn).shape == (3, 48, 64) == (3, record["height"], record["width"])


def test_infer_reads_a_bmp_named_on_the_command_line(checkpoint, tmp_path):
    photo = save_pil(tmp_path / "scan.bmp", noise_pixels(40, 56, 3))
    assert infer_command(str(checkpoint[0]), [str(photo)], str(tmp_path / "out"), device="cpu") == (1, 0)
    assert json.loads((tmp_path / "out" / "detections.json").read_text())[0]["drawn"] == "scan.png"


def test_infer_reports_and_draws_a_phone_photo_upright(checkpoint, tmp_path):
    """Stored 96x64 (WxH) with EXIF orientation 6: every viewer shows it 64 wide and 96 high."""
    stored = noise_pixels(64, 96, 4)
    photo = save_pil(tmp_path / "in" / "phone.jpg", stored, orientation=6)
    counts = infer_command(str(checkpoint[0]), [str(photo)], str(tmp_path / "out"), score_thresh=0.01, device="cpu")
    assert counts == (1, 0)
    (record,) = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert (record["width"], record["height"]) == (64, 96)
    boxes = torch.tensor([d["box"] for d in record["detections"]])
    assert len(boxes) > 0 and bool((boxes[:, 2] <= 64).all() and (boxes[:, 3] <= 96).all())
    with Image.open(tmp_path / "out" / "phone.jpg") as drawn:
        assert drawn.size == (64, 96) and drawn.getexif().get(0x0112, 1) == 1


def scores_of(output_dir):
    return [d["score"] for r in json.loads((output_dir / "detections.json").read_text()) for d in r["detections"]]


def test_infer_threshold_of_an_override_is_used_not_replaced(checkpoint, tmp_path):
    path, _ = checkpoint
    (tmp_path / "in").mkdir()
    photo = write_png(tmp_path / "in" / "a.png", noise_image(96, 128, 1))
    argv = ["infer", str(photo), "--checkpoint", str(path), "--device", "cpu", "--output"]
    assert main([*argv, str(tmp_path / "default")]) == 0
    assert min(scores_of(tmp_path / "default")) > 0.3
    assert main([*argv, str(tmp_path / "override"), "model.inference.score_thresh=0.2"]) == 0
    scores = scores_of(tmp_path / "override")
    assert min(scores) > 0.2 and any(score < 0.3 for score in scores)  # 0.2 applied, not infer's 0.3
    assert main([*argv, str(tmp_path / "both"), "--score-thresh", "0.5", "model.inference.score_thresh=0.2"]) == 2
    assert not (tmp_path / "both").exists()


def test_infer_score_thresh_rule(tmp_path, checkpoint):
    assert infer_score_thresh(None)[0] == INFER_SCORE_THRESH == 0.3
    assert infer_score_thresh(None, None, ["model.inference.score_thresh=0.2"]) == (
        None, "model.inference.score_thresh=0.2")
    assert infer_score_thresh(0.5, None, ["model.inference.score_thresh=0.5"]) == (0.5, "--score-thresh")
    with pytest.raises(ValueError, match=r"--score-thresh 0\.5 and model\.inference\.score_thresh=0\.2 disagree"):
        infer_score_thresh(0.5, None, ["model.inference.score_thresh=0.2"])
    with pytest.raises(ValueError, match=r"--score-thresh must be in \[0, 1\)"):
        infer_score_thresh(30.0)
    _, cfg = load_model(checkpoint[0])
    resolved = tmp_path / "config.yaml"  # what training writes: every key, score_thresh 0.05 included
    resolved.write_text(dump_config(cfg))
    assert infer_score_thresh(None, resolved)[0] == 0.3
    cfg.model.inference.score_thresh = 0.25
    chosen = tmp_path / "chosen.yaml"
    chosen.write_text(dump_config(cfg))
    assert infer_score_thresh(None, chosen) == (None, f"model.inference.score_thresh in {chosen}")
    assert infer_score_thresh(0.4, chosen) == (0.4, f"--score-thresh, in place of 0.25 in {chosen}")


def test_infer_help_states_the_default_threshold_and_recursion(capsys):
    with pytest.raises(SystemExit):
        main(["infer", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Default: 0.3, unless a KEY=VALUE override model.inference.score_thresh=V" in help_text
    assert "--recursive" in help_text and "bmp/tif/tiff" in help_text
