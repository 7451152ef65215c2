"""Data errors found at start-up through the command line as typed: annotation fields of the wrong
type or value, category ids and names, YOLO class names as written, and analyze-data reading the
training set alone. Each error is one line naming the file and the entry, exit status 2, before
any training; valid data reads to the same samples as before."""

import json
import logging
import shutil

import pytest
import torch
from torchvision.io import write_png

from conftest import tiny_overrides
from retinanet.cli import main
from retinanet.data.coco import CocoDetection
from retinanet.engine.evaluator import coco_metrics, label_to_category_ids
from retinanet.engine.run_dir import CHECKPOINTS_DIR, METRICS_LOG

SIZE = 64


def split_files(root, split):
    return root / "annotations" / f"instances_{split}.json", root / split


def train_argv(root, output_dir, *overrides, train_ann=None, val_ann=None):
    """The audit's `retinanet train quickstart ...` on the synthetic data, either annotation file
    replaced, `overrides` appended."""
    train_json, train_dir = split_files(root, "train")
    val_json, val_dir = split_files(root, "val")
    return ["train", "quickstart", *tiny_overrides(size=SIZE), "--output-dir", str(output_dir), "data.synthetic.root=",
            f"data.train.ann_file={train_ann or train_json}", f"data.train.img_dir={train_dir}",
            f"data.val.ann_file={val_ann or val_json}", f"data.val.img_dir={val_dir}",
            "solver.max_iter=2", "solver.steps=[1]", "solver.warmup_iters=1", "solver.ims_per_batch=2",
            "data.num_workers=0", "train.device=cpu", *overrides]


def edited_copy(source, target, edit):
    """`target`: the json `source` after `edit(dataset)` (in place)."""
    dataset = json.loads(source.read_text())
    edit(dataset)
    target.write_text(json.dumps(dataset))
    return target


def error_lines(caplog):
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


def assert_user_error(argv, caplog, *expected):
    """main(argv) exits 2 with one error line that holds every `expected` text."""
    caplog.clear()
    assert main([str(token) for token in argv]) == 2
    lines = error_lines(caplog)
    assert len(lines) == 1 and "\n" not in lines[0], lines
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def assert_nothing_trained(output_dir):
    assert not (output_dir / METRICS_LOG).exists()
    assert not list((output_dir / CHECKPOINTS_DIR).glob("*.pth"))


# ---------------------------------------------------------------------------------------------
# Annotation fields (issue: bad values passed start-up and failed pycocotools after training).


def set_field(key, value, index=2):
    def edit(dataset):
        dataset["annotations"][index][key] = value
    return edit


def set_bbox_value(value, index=2):
    def edit(dataset):
        dataset["annotations"][index]["bbox"][1] = value
    return edit


# (edit of the third annotation, what the error line says after "annotation <id>")
BAD_ANNOTATIONS = {
    "area null": (set_field("area", None), ": 'area' must be a number (pixels^2), got None"),
    "area text": (set_field("area", "big"), ": 'area' must be a number (pixels^2), got 'big'"),
    "area NaN": (set_field("area", float("nan")), ": 'area' must be a number (pixels^2), got nan"),
    "area boolean": (set_field("area", True), ": 'area' must be a number (pixels^2), got True"),
    "iscrowd null": (set_field("iscrowd", None), ": 'iscrowd' must be 0 or 1, got None"),
    "iscrowd 2": (set_field("iscrowd", 2), ": 'iscrowd' must be 0 or 1, got 2"),
    "iscrowd text": (set_field("iscrowd", "0"), ": 'iscrowd' must be 0 or 1, got '0'"),
    "bbox text": (set_bbox_value("12"), ": bbox has non-numbers: ["),
    "bbox null": (set_bbox_value(None), ": bbox has non-numbers: ["),
    "image_id text": (set_field("image_id", "1"), ": 'image_id' must be an integer, got '1'"),
    "image_id fraction": (set_field("image_id", 1.5), ": 'image_id' must be an integer, got 1.5"),
    "image_id float": (set_field("image_id", 1.0), ": 'image_id' must be an integer, got 1.0"),
    "image_id boolean": (set_field("image_id", True), ": 'image_id' must be an integer, got True"),
    "category_id text": (set_field("category_id", "1"), ": 'category_id' must be an integer, got '1'"),
    "category_id boolean": (set_field("category_id", True), ": 'category_id' must be an integer, got True"),
}


@pytest.mark.parametrize("case", list(BAD_ANNOTATIONS))
def test_bad_annotation_field_in_the_val_json_stops_train_before_training(synthetic, tmp_path, caplog, case):
    edit, expected = BAD_ANNOTATIONS[case]
    val_json, _ = split_files(synthetic, "val")
    bad = edited_copy(val_json, tmp_path / "val.json", edit)
    ann_id = json.loads(val_json.read_text())["annotations"][2]["id"]
    out = tmp_path / "run"
    assert_user_error(train_argv(synthetic, out, val_ann=bad), caplog, f"{bad}: annotation {ann_id}{expected}")
    assert_nothing_trained(out)


@pytest.mark.parametrize("value", ["a7", 1.5, True, [1]])
def test_annotation_id_that_is_not_an_integer_is_named_by_its_place(synthetic, tmp_path, caplog, value):
    val_json, _ = split_files(synthetic, "val")
    bad = edited_copy(val_json, tmp_path / "val.json", set_field("id", value, index=3))
    out = tmp_path / "run"
    assert_user_error(train_argv(synthetic, out, val_ann=bad), caplog,
                      f"{bad}: annotations[3]: 'id' must be an integer, got {value!r}")
    assert_nothing_trained(out)


def test_the_first_bad_annotation_in_file_order_is_named(synthetic, tmp_path, caplog):
    train_json, _ = split_files(synthetic, "train")
    annotations = json.loads(train_json.read_text())["annotations"]

    def edit(dataset):
        dataset["annotations"][5]["iscrowd"] = None
        dataset["annotations"][1]["image_id"] = "x"
    bad = edited_copy(train_json, tmp_path / "train.json", edit)
    assert_user_error(train_argv(synthetic, tmp_path / "run", train_ann=bad), caplog,
                      f"{bad}: annotation {annotations[1]['id']}: 'image_id' must be an integer, got 'x'")


def test_analyze_errors_refuses_a_bad_area_naming_the_annotation(synthetic, tmp_path, caplog):
    val_json, _ = split_files(synthetic, "val")
    bad = edited_copy(val_json, tmp_path / "val.json", set_field("area", None, index=0))
    ann_id = json.loads(val_json.read_text())["annotations"][0]["id"]
    (tmp_path / "eval").mkdir()
    assert_user_error(["analyze-errors", str(tmp_path / "eval"), "--ann-file", str(bad)], caplog,
                      f"{bad}: annotation {ann_id}: 'area' must be a number (pixels^2)")


def with_crowd_regions(dataset):
    for index, ann in enumerate(dataset["annotations"]):
        ann["iscrowd"] = int(index % 4 == 1)


def respelled(dataset):
    """The same annotations written as other valid JSON: iscrowd as true / 1.0 / false / 0.0,
    whole-number areas as integers."""
    for index, ann in enumerate(dataset["annotations"]):
        ann["iscrowd"] = [[False, 0.0], [True, 1.0]][ann["iscrowd"]][index % 2]
        assert float(ann["area"]).is_integer()  # the synthetic areas are pixel counts
        ann["area"] = int(ann["area"])


def test_valid_spellings_read_to_the_same_samples_and_metrics(synthetic, tmp_path):
    val_json, val_dir = split_files(synthetic, "val")
    base = edited_copy(val_json, tmp_path / "base.json", with_crowd_regions)
    other_json = edited_copy(base, tmp_path / "respelled.json", respelled)
    original, other = CocoDetection(base, val_dir), CocoDetection(other_json, val_dir)
    assert other.class_names == original.class_names == ["circle", "square", "triangle"]
    assert other.category_ids == original.category_ids and list(other.image_ids) == list(original.image_ids)
    assert sum(len(original.load_target(index)["crowd_boxes"]) for index in range(len(original))) > 0
    for index in range(len(original)):
        want, got = original.load_target(index), other.load_target(index)
        assert {k: str(v) for k, v in got.items()} == {k: str(v) for k, v in want.items()}
    for ann_id, ann in original.coco.anns.items():
        assert other.coco.anns[ann_id] == ann  # equal values: 1 == 1.0 == True
    written = json.loads(base.read_text())["annotations"]
    detections = [{"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": ann["bbox"], "score": 0.9}
                  for ann in written[::2]]
    assert coco_metrics(other.coco, detections, other.image_ids, other.class_names) == coco_metrics(
        original.coco, detections, original.image_ids, original.class_names)


# ---------------------------------------------------------------------------------------------
# Categories: integer ids, non-empty unique names.


def set_category(key, value, index=1, drop=False):
    def edit(dataset):
        if drop:
            dataset["categories"][index].pop(key)
        else:
            dataset["categories"][index][key] = value
    return edit


@pytest.mark.parametrize("edit, expected", [
    (set_category("id", "2"), "'id' must be an integer, got '2'"),
    (set_category("id", 2.0), "'id' must be an integer, got 2.0"),
    (set_category("id", True), "'id' must be an integer, got True"),
    (set_category("name", None, drop=True), "category 3: 'name' must be a non-empty string, it has none"),
    (set_category("name", None), "category 3: 'name' must be a non-empty string, got None"),
    (set_category("name", 7), "category 3: 'name' must be a non-empty string, got 7"),
    (set_category("name", " "), "category 3: 'name' must be a non-empty string, got ' '"),
], ids=["id text", "id float", "id boolean", "name missing", "name null", "name number", "name blank"])
def test_bad_category_is_named_at_start_up(synthetic, tmp_path, caplog, edit, expected):
    train_json, _ = split_files(synthetic, "train")
    bad = edited_copy(train_json, tmp_path / "train.json", edit)
    out = tmp_path / "run"
    assert_user_error(train_argv(synthetic, out, train_ann=bad), caplog, f"{bad}: ", expected)
    assert_nothing_trained(out)


def duplicate_name(dataset):
    dataset["categories"][2]["name"] = dataset["categories"][0]["name"]


def test_duplicate_category_names_are_refused_by_train(synthetic, tmp_path, caplog):
    train_json, _ = split_files(synthetic, "train")
    categories = json.loads(train_json.read_text())["categories"]
    bad = edited_copy(train_json, tmp_path / "train.json", duplicate_name)
    out = tmp_path / "run"
    assert_user_error(train_argv(synthetic, out, train_ann=bad), caplog,
                      f"{bad}: categories {categories[0]['id']} and {categories[2]['id']} are both named "
                      f"{categories[0]['name']!r}")
    assert_nothing_trained(out)


def test_duplicate_category_names_are_refused_by_eval_before_inference(synthetic, varied_checkpoint, tmp_path,
                                                                       caplog, monkeypatch):
    import retinanet.cli as cli

    predicted = []
    monkeypatch.setattr(cli, "evaluate", lambda *args, **kwargs: predicted.append(1))
    path, _ = varied_checkpoint
    val_json, val_dir = split_files(synthetic, "val")
    bad = edited_copy(val_json, tmp_path / "val.json", duplicate_name)
    assert_user_error(["eval", "--checkpoint", str(path), f"data.val.ann_file={bad}", f"data.val.img_dir={val_dir}",
                       "data.synthetic.root=", "train.device=cpu", "data.num_workers=0",
                       "--output-dir", str(tmp_path / "eval")], caplog, f"{bad}: categories ", "are both named")
    assert not predicted


def test_label_mapping_by_name_needs_unique_dataset_names(caplog):
    # A model whose names differ from the dataset's in order maps by name ...
    assert label_to_category_ids(["b", "a"], ["a", "b"], [3, 5]) == [5, 3]
    # ... but not onto a dataset naming two categories alike: that would drop category 3 silently.
    with caplog.at_level(logging.WARNING, logger="retinanet.engine.evaluator"):
        assert label_to_category_ids(["b", "a", "c"], ["a", "a", "b"], [3, 4, 5]) == [3, 4, 5]
    assert "labels are mapped by position" in caplog.text


# ---------------------------------------------------------------------------------------------
# YOLO class names as written.


@pytest.fixture
def yolo_images(tmp_path):
    """y/images/train/a.png (32x32) with one box of class 1."""
    images = tmp_path / "y" / "images" / "train"
    images.mkdir(parents=True)
    write_png(torch.zeros(3, 32, 32, dtype=torch.uint8), str(images / "a.png"))
    labels = tmp_path / "y" / "labels" / "train"
    labels.mkdir(parents=True)
    (labels / "a.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    return images


def convert_yolo(images, names_file, output):
    return ["convert-dataset", "--from", "yolo", str(images), str(output), "--names", str(names_file)]


@pytest.mark.parametrize("file_name, text, names", [
    ("data.yaml", "names: [yes_sign, no]\n", ["yes_sign", "no"]),
    ("data.yaml", "nc: 4\nnames: [yes, no, on, off]\n", ["yes", "no", "on", "off"]),
    ("data.yaml", "names:\n  0: person\n  1: off\n", ["person", "off"]),
    ("data.yml", "names: [1, 2]\n", ["1", "2"]),
    ("data.yaml", "names:\n  0: 10\n  1: 20\n", ["10", "20"]),
    ("data.yaml", "\ufeffnames: [cat, dog]\n", ["cat", "dog"]),
    ("classes.txt", "\ufeffcat\r\ndog\r\n", ["cat", "dog"]),
    ("classes.names", "no\nyes\n", ["no", "yes"]),
], ids=["audit", "yaml 1.1 booleans", "dict", "numbers", "dict of numbers", "yaml BOM", "txt BOM", "names file"])
def test_yolo_names_are_read_as_written(yolo_images, tmp_path, caplog, file_name, text, names):
    names_file = tmp_path / file_name
    names_file.write_text(text, encoding="utf-8")
    output = tmp_path / "y.json"
    assert main(convert_yolo(yolo_images, names_file, output)) == 0
    categories = json.loads(output.read_text())["categories"]
    assert categories == [{"id": index + 1, "name": name} for index, name in enumerate(names)]
    dataset = CocoDetection(output, yolo_images)
    assert dataset.class_names == names
    assert dataset.load_target(0)["labels"].tolist() == [1]


@pytest.mark.parametrize("text, expected", [
    ("names: [cat, null]\n", "class 1: YAML reads this name as None, not text; quote it"),
    ("names: [cat, ~]\n", "class 1: YAML reads this name as None"),
    ("names: [true, dog]\n", "class 0: YAML reads this name as True, not text; quote it"),
    ("names: [cat, [a, b]]\n", "class 1: the name must be text, got ['a', 'b']"),
    ("names: [cat, '']\n", "class 1 has a blank name"),
    ("names: [cat, dog, cat]\n", "the name 'cat' is listed twice (classes 0 and 2)"),
    ("names:\n  0: cat\n  2: dog\n", "'names' keys must be the class indices 0..1, got [0, 2]"),
    ("names:\n  0: cat\n  true: dog\n", "'names' keys must be the class indices 0..1, got [0, True]"),
    ("names: [cat\n", "not valid YAML"),
], ids=["null", "tilde", "boolean", "list", "blank", "twice", "gap", "boolean key", "syntax"])
def test_yolo_names_that_cannot_be_class_names_are_refused(yolo_images, tmp_path, caplog, text, expected):
    names_file = tmp_path / "data.yaml"
    names_file.write_text(text)
    output = tmp_path / "y.json"
    assert_user_error(convert_yolo(yolo_images, names_file, output), caplog, f"{names_file}: ", expected)
    assert not output.exists()


def test_duplicate_line_in_a_names_file_is_refused(yolo_images, tmp_path, caplog):
    names_file = tmp_path / "classes.txt"
    names_file.write_text("cat\ndog\ncat\n")
    assert_user_error(convert_yolo(yolo_images, names_file, tmp_path / "y.json"), caplog,
                      f"{names_file}: the name 'cat' is listed twice (classes 0 and 2)")


# ---------------------------------------------------------------------------------------------
# analyze-data reads the training set only.


def analyze_argv(output, *data):
    return ["analyze-data", *tiny_overrides(size=SIZE), *data, "--output", str(output)]


def test_analyze_data_needs_and_reads_only_the_training_set(synthetic, tmp_path, caplog):
    train_json, train_dir = split_files(synthetic, "train")
    by_synthetic_root = [f"data.synthetic.root={synthetic}", "data.synthetic.num_train=8", "data.synthetic.num_val=4",
                         f"data.synthetic.image_size={SIZE}"]
    assert main(analyze_argv(tmp_path / "a", *by_synthetic_root)) == 0
    # The audit's command: training files only, no data.val.
    train_only = [f"data.train.ann_file={train_json}", f"data.train.img_dir={train_dir}"]
    caplog.clear()
    assert main(analyze_argv(tmp_path / "b", *train_only)) == 0, error_lines(caplog)
    # A val file that is not there is never opened.
    missing_val = [f"data.val.ann_file={tmp_path / 'missing.json'}", f"data.val.img_dir={tmp_path}"]
    assert main(analyze_argv(tmp_path / "c", *train_only, *missing_val)) == 0
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in "abc"]
    assert summaries[0]["dataset"]["ann_file"] == str(train_json)
    assert summaries[1] == summaries[0] and summaries[2] == summaries[0]
    # Without training files it still says which keys to set.
    assert_user_error(analyze_argv(tmp_path / "d", *missing_val), caplog,
                      "data.train.ann_file and data.train.img_dir must be set")


def test_analyze_data_checks_only_the_training_images(synthetic, tmp_path, caplog):
    root = tmp_path / "syn"
    shutil.copytree(synthetic, root)
    train_json, train_dir = split_files(root, "train")
    val_json, val_dir = split_files(root, "val")
    bad_train = sorted(train_dir.iterdir())[0]
    bad_train.write_bytes(b"")
    for image in val_dir.iterdir():  # never decoded: analyze-data does not read the val split
        image.write_bytes(b"")
    data = [f"data.train.ann_file={train_json}", f"data.train.img_dir={train_dir}",
            f"data.val.ann_file={val_json}", f"data.val.img_dir={val_dir}", "data.check_images=true"]
    caplog.clear()
    assert main(analyze_argv(tmp_path / "a", *data)) == 2
    [message] = error_lines(caplog)  # every bad image, one per line
    assert f"{train_json}: 1 of 8 images cannot be used" in message and str(bad_train) in message
    assert str(val_json) not in message
    assert main(analyze_argv(tmp_path / "b", *data, "data.on_bad_image=skip")) == 0
