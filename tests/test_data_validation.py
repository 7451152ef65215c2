"""Start-up validation of COCO data (issue 11): evaluation fields, ids, empty sets, paths leaving
img_dir, bad image files (checked up front, or skipped during training), spare classifier outputs."""

import itertools
import json
import logging

import pytest
import torch

from conftest import train_overrides
from retinanet.config import ConfigError, load_config
from retinanet.data.coco import BadImageError, CocoDetection, TrainSample, check_image_files
from retinanet.data.loader import build_datasets, build_train_loader, build_val_dataset, head_class_names
from retinanet.data.transforms import build_train_transforms
from retinanet.engine.evaluator import coco_metrics
from test_data_coco import CATS, write_coco, write_image


def rewrite_annotations(ann_file, edit):
    """Apply `edit(annotation) -> annotation` to every annotation of the json file."""
    dataset = json.loads(ann_file.read_text())
    dataset["annotations"] = [edit(dict(ann)) for ann in dataset["annotations"]]
    ann_file.write_text(json.dumps(dataset))


def without(*keys):
    return lambda ann: {key: value for key, value in ann.items() if key not in keys}


def perfect_detections(dataset):
    """One score-1 COCO result per ground-truth box (xywh as in the file)."""
    return [
        {"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": ann["bbox"], "score": 1.0}
        for ann in dataset.coco.dataset["annotations"]
    ]


# ---------------------------------------------------------------------------------------------
# Fields pycocotools' evaluation needs.


def test_missing_area_and_iscrowd_are_filled_and_evaluation_runs(tmp_path, caplog):
    ann_file, img_dir = write_coco(
        tmp_path, [(1, "a.png", 32, 32), (2, "b.png", 32, 32)],
        [(1, 2, [2, 3, 10, 5]), (1, 7, [12, 12, 8, 8]), (2, 90, [0, 0, 16, 20])], CATS,
    )
    rewrite_annotations(ann_file, without("area", "iscrowd"))
    with caplog.at_level(logging.WARNING, logger="retinanet.data.coco"):
        dataset = CocoDetection(ann_file, img_dir)
    filled = [r.getMessage() for r in caplog.records if "'area'" in r.getMessage()]
    assert len(filled) == 1
    assert str(ann_file) in filled[0] and "3 of 3 annotations had no 'area'" in filled[0]
    assert "3 no 'iscrowd'" in filled[0]
    assert [dataset.coco.anns[i]["area"] for i in (1, 2, 3)] == [50.0, 64.0, 320.0]  # w * h
    assert all(dataset.coco.anns[i]["iscrowd"] == 0 for i in (1, 2, 3))
    metrics = coco_metrics(dataset.coco, perfect_detections(dataset), dataset.image_ids, dataset.class_names)
    assert metrics["AP"] == pytest.approx(1.0)


def test_present_area_and_iscrowd_are_kept_without_warning(tmp_path, caplog):
    ann_file, img_dir = write_coco(tmp_path, [(1, "a.png", 16, 16)], [(1, 2, [0, 0, 4, 4], 1)], CATS)
    with caplog.at_level(logging.WARNING, logger="retinanet.data.coco"):
        dataset = CocoDetection(ann_file, img_dir)
    assert dataset.coco.anns[1]["area"] == 1.0 and dataset.coco.anns[1]["iscrowd"] == 1  # as written
    assert "'area'" not in caplog.text and "'id'" not in caplog.text


def test_annotations_without_id_get_unused_ids(tmp_path, caplog):
    ann_file, img_dir = write_coco(
        tmp_path, [(1, "a.png", 32, 32)], [(1, 2, [0, 0, 4, 4]), (1, 2, [8, 8, 4, 4]), (1, 7, [2, 2, 9, 9])], CATS
    )
    rewrite_annotations(ann_file, lambda ann: ann if ann["id"] == 2 else without("id")(ann))
    with caplog.at_level(logging.WARNING, logger="retinanet.data.coco"):
        dataset = CocoDetection(ann_file, img_dir)
    assert sorted(dataset.coco.anns) == [2, 3, 4]  # the kept id 2, then max + 1, max + 2
    assert "2 annotations had no 'id'; gave them ids 3..4" in caplog.text and str(ann_file) in caplog.text
    metrics = coco_metrics(dataset.coco, perfect_detections(dataset), dataset.image_ids, dataset.class_names)
    assert metrics["AP"] == pytest.approx(1.0)


def test_duplicate_annotation_ids_are_refused(tmp_path):
    ann_file, img_dir = write_coco(
        tmp_path, [(1, "a.png", 32, 32)],
        [(1, 2, [0, 0, 4, 4]), (1, 2, [8, 8, 4, 4]), (1, 7, [2, 2, 9, 9]), (1, 7, [1, 1, 3, 3])], CATS,
    )
    rewrite_annotations(ann_file, lambda ann: {**ann, "id": {1: 7, 2: 7, 3: 4, 4: 4}[ann["id"]]})
    with pytest.raises(ValueError, match=r"ann\.json: 2 annotations reuse an id already taken \(first: 7, 4\)"):
        CocoDetection(ann_file, img_dir)


# ---------------------------------------------------------------------------------------------
# Empty datasets.


def test_empty_images_list_names_the_file(tmp_path):
    ann_file, img_dir = write_coco(tmp_path, [], [], CATS, name="instances_val.json")
    with pytest.raises(ValueError, match=r"instances_val\.json: the dataset is empty \(its 'images' list"):
        CocoDetection(ann_file, img_dir)


def test_filter_empty_leaving_no_image_names_the_file(tmp_path):
    ann_file, img_dir = write_coco(
        tmp_path, [(1, "a.png", 8, 8), (2, "b.png", 8, 8)], [(1, 2, [0, 0, 0, 4]), (2, 2, [0, 0, 8, 8], 1)], CATS,
    )
    assert len(CocoDetection(ann_file, img_dir)) == 2
    with pytest.raises(ValueError, match=r"ann\.json: the dataset is empty: none of its 2 images .*filter_empty"):
        CocoDetection(ann_file, img_dir, filter_empty=True)


# ---------------------------------------------------------------------------------------------
# file_name must stay inside img_dir.


@pytest.mark.parametrize("file_name", ["../val/x.jpg", "/etc/passwd", "sub/../../val/x.jpg"])
def test_file_name_leaving_img_dir_is_refused(tmp_path, file_name):
    ann_file, img_dir = write_coco(tmp_path, [(1, "a.png", 8, 8), (17, file_name, 8, 8)], [], CATS, write_files=False)
    write_image(img_dir / "a.png", 8, 8)
    write_image(tmp_path / "val" / "x.jpg", 8, 8)  # exists: only the path check can refuse it
    with pytest.raises(ValueError, match=rf"ann\.json: image 17: file_name '{file_name}' leads outside img_dir"):
        CocoDetection(ann_file, img_dir)


def test_symlinks_and_normalised_names_inside_img_dir_are_accepted(tmp_path):
    real_dir = tmp_path / "real"
    write_image(real_dir / "a.png", 8, 8, value=10)
    write_image(real_dir / "sub" / "b.png", 8, 8, value=20)
    write_image(tmp_path / "elsewhere" / "c.png", 8, 8, value=30)
    (real_dir / "c.png").symlink_to(tmp_path / "elsewhere" / "c.png")  # the user's own link: accepted
    linked_dir = tmp_path / "linked"
    linked_dir.symlink_to(real_dir, target_is_directory=True)
    images = [(1, "a.png", 8, 8), (2, "sub/../sub/b.png", 8, 8), (3, "c.png", 8, 8),
              (4, str(linked_dir / "a.png"), 8, 8), (5, str(real_dir / "sub" / "b.png"), 8, 8)]
    ann_file, _ = write_coco(tmp_path, images, [], CATS, write_files=False)
    dataset = CocoDetection(ann_file, linked_dir)
    assert [int(dataset.load_image(i)[0, 0, 0]) for i in range(5)] == [10, 20, 30, 10, 20]


# ---------------------------------------------------------------------------------------------
# Bad image files.


def corrupt(img_dir, zero_bytes=(), truncated=(), not_image=()):
    """Turn the named files into a zero-byte file, a JPEG cut in half, or text."""
    for name in zero_bytes:
        (img_dir / name).write_bytes(b"")
    for name in truncated:
        data = (img_dir / name).read_bytes()
        (img_dir / name).write_bytes(data[: len(data) // 2])
    for name in not_image:
        (img_dir / name).write_text("not an image")


def test_check_image_files_reports_every_bad_file_at_once(tmp_path):
    ann_file, img_dir = write_coco(
        tmp_path, [(1, "ok.jpg", 16, 12), (2, "zero.jpg", 16, 12), (3, "cut.jpg", 16, 12), (4, "text.jpg", 16, 12),
                   (5, "size.png", 16, 12), (6, "ok2.png", 8, 8)], [], CATS,
    )
    corrupt(img_dir, zero_bytes=["zero.jpg"], truncated=["cut.jpg"], not_image=["text.jpg"])
    write_image(img_dir / "size.png", 10, 16)  # the json says 16x12 (WxH)
    dataset = CocoDetection(ann_file, img_dir)  # construction only checks that the files exist
    with pytest.raises(ValueError) as info:
        check_image_files(dataset, num_threads=2)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{ann_file}: 4 of 6 images cannot be used:"
    assert lines[1] == f"  image 2: {img_dir / 'zero.jpg'} is an empty file (0 bytes)"
    assert lines[2].startswith(f"  image 3: cannot decode {img_dir / 'cut.jpg'}: ") and "truncated" in lines[2]
    assert lines[3].startswith(f"  image 4: cannot decode {img_dir / 'text.jpg'}: ") and "Unsupported" in lines[3]
    assert lines[4] == f"  image 5: {img_dir / 'size.png'} is 16x10 (WxH) but the json says 16x12; " \
                       "the boxes would not match the pixels"
    assert len(lines) == 5
    (tmp_path / "clean").mkdir()
    check_image_files(CocoDetection(*write_coco(tmp_path / "clean", [(1, "a.jpg", 8, 8)], [], CATS)))  # passes


def bad_images_dataset(tmp_path, on_bad_image):
    """Seven images in two aspect groups, three of them bad:
    index 0 landscape ok, 1 landscape zero-byte, 2 landscape truncated JPEG, 3 portrait ok,
    4 landscape ok, 5 portrait not-an-image, 6 landscape ok."""
    images = [(10, "a.jpg", 16, 8), (11, "zero.jpg", 16, 8), (12, "cut.jpg", 16, 8), (13, "p.jpg", 8, 16),
              (14, "b.jpg", 16, 8), (15, "text.jpg", 8, 16), (16, "c.jpg", 16, 8)]
    annotations = [(image_id, 2, [1, 1, 4, 4]) for image_id, *_ in images]
    tmp_path.mkdir(parents=True, exist_ok=True)
    ann_file, img_dir = write_coco(tmp_path, images, annotations, CATS)
    for index, (_, file_name, width, height) in enumerate(images):
        write_image(img_dir / file_name, height, width, value=10 * index)  # pixel value = 10 * index
    corrupt(img_dir, zero_bytes=["zero.jpg"], truncated=["cut.jpg"], not_image=["text.jpg"])
    return CocoDetection(ann_file, img_dir, transforms=build_train_transforms(0.5), on_bad_image=on_bad_image)


def test_on_bad_image_error_names_the_file(tmp_path):
    dataset = bad_images_dataset(tmp_path, "error")
    assert dataset[TrainSample(0, 0, 1)][1]["image_id"] == 10
    with pytest.raises(BadImageError, match=r"ann\.json: image 11: .*zero\.jpg is an empty file \(0 bytes\)"):
        dataset[TrainSample(1, 0, 1)]
    with pytest.raises(BadImageError, match=r"ann\.json: image 12: cannot decode .*cut\.jpg: .*truncated"):
        dataset[TrainSample(2, 0, 1)]


def test_on_bad_image_skip_takes_the_next_good_image_of_the_same_group(tmp_path, caplog):
    dataset = bad_images_dataset(tmp_path, "skip")
    with caplog.at_level(logging.WARNING, logger="retinanet.data.coco"):
        got = {index: dataset[TrainSample(index, 0, 7)] for index in range(7)}
        again = dataset[TrainSample(2, 1, 7)]
    image_ids = {index: target["image_id"] for index, (_, target) in got.items()}
    # 1 and 2 (landscape) -> 4, the next landscape one (3 is portrait); 5 (portrait) wraps to 3.
    assert image_ids == {0: 10, 1: 14, 2: 14, 3: 13, 4: 14, 5: 13, 6: 16}
    assert int(got[1][0][0, 0, 0]) == int(got[2][0][0, 0, 0]) == 40  # the pixels of item 4
    assert torch.equal(again[1]["boxes"], got[2][1]["boxes"])
    assert dataset.num_skipped == 4 and dataset.bad_indices == {1, 2, 5}
    warned = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warned) == 3  # once per file, though item 2 was drawn twice
    assert any("image 11:" in m and "zero.jpg is an empty file" in m for m in warned)
    assert any("image 12:" in m and "cut.jpg" in m for m in warned)
    # A fresh copy (a restarted worker, a resumed run) picks the same substitute and transforms.
    fresh = bad_images_dataset(tmp_path / "again", "skip")
    for index in range(7):
        image, target = fresh[TrainSample(index, 0, 7)]
        assert torch.equal(image, got[index][0]) and torch.equal(target["boxes"], got[index][1]["boxes"])


def test_on_bad_image_skip_with_no_good_image_left(tmp_path):
    ann_file, img_dir = write_coco(tmp_path, [(1, "a.jpg", 8, 8), (2, "b.jpg", 8, 8)], [], CATS)
    corrupt(img_dir, zero_bytes=["a.jpg", "b.jpg"])
    with pytest.raises(RuntimeError, match=r"ann\.json: none of the 2 images can be decoded"):
        CocoDetection(ann_file, img_dir, on_bad_image="skip")[0]
    with pytest.raises(ValueError, match=r"on_bad_image must be one of \['error', 'skip'\], got 'drop'"):
        CocoDetection(ann_file, img_dir, on_bad_image="drop")


def test_train_loader_resume_replays_the_substitutes(tmp_path):
    cfg = load_config(overrides=["data.num_workers=0"])
    dataset = bad_images_dataset(tmp_path, "skip")

    def image_ids(start_batch, num_batches):
        loader = build_train_loader(cfg.data, dataset, 2, seed=3, start_batch=start_batch)
        return [(t["image_id"], t["boxes"].tolist()) for _, targets in itertools.islice(loader, num_batches)
                for t in targets]

    full = image_ids(0, 8)
    assert {image_id for image_id, _ in full} <= {10, 13, 14, 16}
    assert image_ids(5, 3) == full[5 * 2 :]


def synthetic_split_overrides(root, **extra):
    return [
        f"data.synthetic.root={root}", "data.synthetic.num_train=6", "data.synthetic.num_val=3",
        "data.synthetic.image_size=32", "model.num_classes=3", "data.num_workers=0",
        *(f"data.{key}={value}" for key, value in extra.items()),
    ]


def test_build_datasets_policy_and_start_up_check(tmp_path):
    root = tmp_path / "syn"
    train, val = build_datasets(load_config(overrides=synthetic_split_overrides(root, on_bad_image="skip")))
    assert train.on_bad_image == "skip" and val.on_bad_image == "error"  # evaluation never skips
    train_bad, val_bad = root / "train" / train._file_names[1], root / "val" / val._file_names[2]
    val_good_bytes = val_bad.read_bytes()
    train_bad.write_bytes(b"")
    val_bad.write_bytes(val_good_bytes[:40])
    with pytest.raises(ValueError) as info:
        build_datasets(load_config(overrides=synthetic_split_overrides(root, check_images="true")))
    message = str(info.value)
    assert f"instances_train.json: 1 of 6 images cannot be used:\n  image {train.image_ids[1]}: {train_bad} is " \
           "an empty file (0 bytes)" in message
    assert f"instances_val.json: 1 of 3 images cannot be used:\n  image {val.image_ids[2]}: cannot decode {val_bad}" \
           in message
    assert message.endswith("or set data.on_bad_image=skip to train without the bad training images "
                            "(evaluation never skips an image: it would change the AP)")
    with pytest.raises(ValueError, match=r"instances_val\.json: 1 of 3 images cannot be used"):
        build_val_dataset(load_config(overrides=synthetic_split_overrides(root, check_images="true")))  # eval
    val_bad.write_bytes(val_good_bytes)
    train, _ = build_datasets(load_config(overrides=synthetic_split_overrides(root, check_images="true",
                                                                              on_bad_image="skip")))
    assert train.bad_indices == {1}  # found up front: workers skip it without decoding it


def test_on_bad_image_is_a_choice():
    with pytest.raises(ConfigError, match=r"data\.on_bad_image: 'drop' is not one of \['error', 'skip'\]"):
        load_config(overrides=["data.on_bad_image=drop"])
    assert load_config().data.on_bad_image == "error" and load_config().data.check_images is False


# ---------------------------------------------------------------------------------------------
# model.num_classes above the number of categories.


def test_head_class_names_pads_spare_outputs():
    assert head_class_names(["cat", "dog"], 4) == ["cat", "dog", "unused_2", "unused_3"]
    assert head_class_names(["cat"], 1) == ["cat"]
    with pytest.raises(ValueError, match=r"2 categories do not fit model\.num_classes = 1"):
        head_class_names(["cat", "dog"], 1)


@pytest.mark.slow
def test_training_with_spare_classifier_outputs(synthetic_root, tmp_path):
    from retinanet.checkpoint import load_checkpoint
    from retinanet.engine.trainer import train

    metrics = train(load_config(None, train_overrides(synthetic_root, tmp_path, max_iter=2) + ["model.num_classes=4"]))
    assert set(metrics["per_class_AP"]) == {"circle", "square", "triangle"}
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "model_final.pth")
    assert checkpoint["class_names"] == ["circle", "square", "triangle", "unused_3"]
