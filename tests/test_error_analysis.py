"""Error analysis: TIDE's error types and dAP on hand-made cases, AP50 and the PR curves equal to
pycocotools', the pictures with and without matplotlib, `eval --analyze`, `analyze-errors`, and the
TensorBoard pictures of a training run."""

import contextlib
import io
import json
import logging
import random
import sys

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import train_overrides
from retinanet.cli import main
from retinanet.engine.error_analysis import (BKG, BOTH, CLS, DUPE, FALSE_NEG, FALSE_POS, LOC, MAIN_ERRORS, MISS,
                                             analyze_errors, match_detections, pr_curve_counts,
                                             precision_recall_curves, tide_errors)

CATEGORIES = [(1, "cat"), (2, "dog")]
# An object every hand-made case finds with a true positive scoring 0.9, so that the AP before the
# fix is not 0: cat has this object and the case's own.
FOUND = ("cat", [200, 200, 100, 100])
FOUND_DETECTION = ("cat", [200, 200, 100, 100], 0.9)
OBJECT = ("cat", [0, 0, 100, 100])  # the object each case's error is about


def ground_truth(objects_per_image, categories=CATEGORIES, size=600):
    """COCO ground truth: objects_per_image[i] = [(class name, [x, y, w, h]) or (name, box, iscrowd)]."""
    cat_id = {name: cat_id for cat_id, name in categories}
    images, annotations = [], []
    for image_index, objects in enumerate(objects_per_image):
        images.append({"id": image_index + 1, "file_name": f"{image_index}.png", "width": size, "height": size})
        for name, box, *crowd in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_index + 1, "category_id": cat_id[name],
                                "bbox": box, "area": box[2] * box[3], "iscrowd": crowd[0] if crowd else 0})
    dataset = {"images": images, "annotations": annotations,
               "categories": [{"id": cat_id, "name": name} for cat_id, name in categories]}
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detections(detections_per_image, categories=CATEGORIES):
    """COCO results: detections_per_image[i] = [(class name, [x, y, w, h], score)]."""
    cat_id = {name: cat_id for cat_id, name in categories}
    return [{"image_id": image_index + 1, "category_id": cat_id[name], "bbox": box, "score": score}
            for image_index, dets in enumerate(detections_per_image) for name, box, score in dets]


def tide(objects, dets, class_names=("cat", "dog")):
    coco = ground_truth([objects])
    return tide_errors(coco, detections([dets]), [1], list(class_names))


# ----------------------------------------------------------------------------------------------
# TIDE by hand. IoUs with OBJECT [0, 0, 100, 100]: [0, 0, 80, 100] 0.8, [0, 0, 30, 100] 0.3,
# [0, 0, 90, 100] 0.9. cat has 2 objects unless said otherwise; AP is COCO's 101-point AP, so a
# class whose first detection is a false positive and second a true positive, with 2 objects,
# has precision 0.5 up to recall 0.5: AP = 51 * 0.5 / 101.


def test_wrong_class_at_iou_08_is_a_classification_error_whose_fix_gives_ap_1():
    """The issue's case: one object, one detection of the wrong class on it. dog has no object, so
    only cat counts: AP50 0; corrected to cat, the detection is cat's true positive: AP50 1."""
    summary = tide([OBJECT], [("dog", [0, 0, 80, 100], 0.8)])
    assert summary["AP50"] == 0.0
    assert summary["counts"] == {CLS: 1, LOC: 0, BOTH: 0, DUPE: 0, BKG: 0, MISS: 0}
    assert summary["dAP"][CLS] == pytest.approx(1.0)
    assert all(summary["dAP"][error] == 0.0 for error in MAIN_ERRORS if error != CLS)
    assert summary["per_class"]["cat"]["dAP"][CLS] == pytest.approx(1.0)
    assert summary["per_class"]["dog"]["AP50"] is None  # no dog object: undefined, as in pycocotools


# (ground truth besides FOUND, detections besides FOUND_DETECTION, error, counts, AP50 before, AP50 after its fix)
CASES = {
    "cls": ([OBJECT], [("dog", [0, 0, 80, 100], 0.95)], CLS, {CLS: 1}, 51 / 101, 1.0),
    # First detection a false positive, then the true positive; recall 0.5 at precision 0.5.
    "loc": ([OBJECT], [("cat", [0, 0, 30, 100], 0.95)], LOC, {LOC: 1}, 25.5 / 101, 1.0),
    # TP (0.97), its duplicate (0.95), TP (0.9): precision 1, 0.5, 2/3 at recall 0.5, 0.5, 1; the
    # envelope gives 1 up to recall 0.5 (51 points) and 2/3 above (50 points).
    "dupe": ([OBJECT], [("cat", [0, 0, 100, 100], 0.97), ("cat", [0, 0, 90, 100], 0.95)], DUPE, {DUPE: 1},
             (51 + 50 * 2 / 3) / 101, 1.0),
    # cat has FOUND only: the false positive first, then the true positive at recall 1: AP 0.5.
    "bkg": ([], [("cat", [400, 400, 50, 50], 0.95)], BKG, {BKG: 1}, 0.5, 1.0),
    # Nothing on OBJECT: recall 0.5 at precision 1.
    "miss": ([OBJECT], [], MISS, {MISS: 1}, 51 / 101, 1.0),
    # A dog detection at IoU 0.3 with the cat OBJECT, far from the only dog object (found at 0.9):
    # dog's AP 0.5 (false positive first), cat's 51/101 (OBJECT missed). Fixed, dog's AP is 1.
    "both": ([OBJECT, ("dog", [400, 0, 100, 100])], [("dog", [0, 0, 30, 100], 0.95), ("dog", [400, 0, 100, 100], 0.9)],
             BOTH, {BOTH: 1, MISS: 1}, (0.5 + 51 / 101) / 2, (1.0 + 51 / 101) / 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_error_type_on_a_hand_made_case(case):
    objects, dets, error, counts, before, after = CASES[case]
    summary = tide([FOUND] + objects, [FOUND_DETECTION] + dets)
    assert summary["counts"] == {e: counts.get(e, 0) for e in MAIN_ERRORS}
    assert summary["AP50"] == pytest.approx(before, abs=1e-12)
    assert summary["dAP"][error] == pytest.approx(after - before, abs=1e-12)
    for other in MAIN_ERRORS:
        if other != error and not counts.get(other):
            assert summary["dAP"][other] == 0.0, other


def test_fp_and_fn_bounds_by_hand():
    """The loc case: [FP 0.95, TP 0.9], 2 cat objects, AP 25.5/101. FP bound: the TP ranked first,
    precision 1 up to recall 0.5: 51/101. FN bound: only the found object counts, the TP second at
    recall 1 with precision 0.5: AP 0.5."""
    summary = tide([FOUND, OBJECT], [FOUND_DETECTION, ("cat", [0, 0, 30, 100], 0.95)])
    assert summary["dAP"][FALSE_POS] == pytest.approx(51 / 101 - 25.5 / 101, abs=1e-12)
    assert summary["dAP"][FALSE_NEG] == pytest.approx(0.5 - 25.5 / 101, abs=1e-12)


def test_boundaries_follow_the_paper():
    """t_b <= IoU < t_f with the right class is Loc (0.1 included, 0.5 is a match); IoU < 0.1 with
    every object is background; a wrong class at IoU 0.5 is Cls."""
    at = {0.1: [0, 0, 10, 100], 0.09: [0, 0, 9, 100], 0.5: [0, 0, 50, 100]}
    assert tide([OBJECT], [("cat", at[0.1], 0.9)])["counts"][LOC] == 1
    assert tide([OBJECT], [("cat", at[0.09], 0.9)])["counts"][BKG] == 1
    assert tide([OBJECT], [("cat", at[0.5], 0.9)])["AP50"] == pytest.approx(1.0)
    assert tide([OBJECT], [("dog", at[0.5], 0.9)])["counts"][CLS] == 1
    assert tide([OBJECT], [("dog", at[0.1], 0.9)])["counts"][BOTH] == 1


def test_only_the_best_detection_that_could_find_an_object_is_fixed_into_it():
    """tidecv's BestGTMatch: a Loc error (0.95) and a Cls error (0.9) on the same missed object.
    Fixing Loc makes the Loc detection its true positive; fixing Cls only removes the Cls detection
    (the object's best candidate is the Loc one). The object is not a Miss: a fix would find it."""
    summary = tide([OBJECT], [("cat", [0, 0, 30, 100], 0.95), ("dog", [0, 0, 80, 100], 0.9)])
    assert summary["counts"] == {CLS: 1, LOC: 1, BOTH: 0, DUPE: 0, BKG: 0, MISS: 0}
    assert summary["AP50"] == 0.0
    assert summary["dAP"][LOC] == pytest.approx(1.0)
    assert summary["dAP"][CLS] == 0.0  # cat's list keeps its false positive and has no true positive


def test_a_detection_on_a_crowd_region_is_neither_counted_nor_an_error():
    coco = ground_truth([[FOUND, ("cat", [0, 0, 100, 100], 1)]])
    summary = tide_errors(coco, detections([[FOUND_DETECTION, ("cat", [10, 10, 50, 50], 0.95)]]), [1], ["cat", "dog"])
    assert summary["AP50"] == pytest.approx(1.0) and summary["num_objects"] == 1 and summary["num_detections"] == 1
    assert sum(summary["counts"].values()) == 0


def test_no_detection_and_no_object():
    summary = tide([OBJECT], [])
    assert summary["AP50"] == 0.0 and summary["counts"][MISS] == 1
    assert summary["dAP"][MISS] is None  # fixed, no object is left: AP undefined
    empty = tide([], [("cat", [0, 0, 10, 10], 0.5)])
    assert empty["AP50"] is None and empty["counts"][BKG] == 1


# ----------------------------------------------------------------------------------------------
# Against pycocotools.


def random_case(seed: int, num_images: int = 12):
    """Jittered, relabelled, duplicated and spurious detections of random objects, 3 classes."""
    rng = random.Random(seed)
    categories = [(1, "cat"), (3, "dog"), (5, "bird")]
    objects_per_image, dets_per_image = [], []
    for _ in range(num_images):
        objects = [(rng.choice(["cat", "dog", "bird"]), [rng.uniform(0, 400), rng.uniform(0, 400),
                                                        rng.uniform(8, 150), rng.uniform(8, 150)])
                   for _ in range(rng.randint(0, 6))]
        dets = []
        for name, (x, y, w, h) in objects:
            for _ in range(rng.randint(0, 3)):
                label = name if rng.random() < 0.75 else rng.choice(["cat", "dog", "bird"])
                jitter = rng.choice([1, 4, 15, 40])
                box = [x + rng.gauss(0, jitter), y + rng.gauss(0, jitter), max(1.0, w + rng.gauss(0, jitter)),
                       max(1.0, h + rng.gauss(0, jitter))]
                dets.append((label, box, rng.random()))
        for _ in range(rng.randint(0, 4)):
            box = [rng.uniform(0, 400), rng.uniform(0, 400), rng.uniform(8, 100), rng.uniform(8, 100)]
            dets.append((rng.choice(["cat", "dog", "bird"]), box, rng.random()))
        if objects and rng.random() < 0.3:  # a crowd region over the first object
            objects.append((objects[0][0], objects[0][1], 1))
        objects_per_image.append(objects)
        dets_per_image.append(dets)
    return ground_truth(objects_per_image, categories), detections(dets_per_image, categories), categories


def cocoeval(coco, results):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco, coco.loadRes(json.loads(json.dumps(results))), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap50_and_pr_curves_equal_pycocotools(seed):
    coco, results, categories = random_case(seed)
    names = [name for _, name in categories]
    image_ids = sorted(coco.imgs)
    reference = cocoeval(coco, results)
    precision = reference.eval["precision"]  # (IoU, recall, class, area, maxDets)

    summary = tide_errors(coco, results, image_ids, names)
    assert summary["AP50"] == pytest.approx(reference.stats[1], abs=1e-12)
    for k, name in enumerate(names):
        assert summary["per_class"][name]["AP50"] == pytest.approx(precision[0, :, k, 0, -1].mean(), abs=1e-12)
    assert sum(summary["counts"].values()) > 20 and all(summary["counts"].values())

    curves = precision_recall_curves(coco, results, image_ids, names)
    assert curves["recall"] == pytest.approx(list(reference.params.recThrs))
    for k, name in enumerate(names):
        assert curves["classes"][name]["precision50"] == list(precision[0, :, k, 0, -1])
        assert curves["classes"][name]["precision75"] == list(precision[5, :, k, 0, -1])
        assert curves["classes"][name]["AP"] == pytest.approx(precision[:, :, k, 0, -1].mean(), abs=1e-12)


def test_tensorboard_pr_counts_at_iou_05():
    """The loc case: cat's true positive scores 0.9, its false positive 0.95, 2 objects."""
    coco = ground_truth([[FOUND, OBJECT]])
    matching = match_detections(coco, detections([[FOUND_DETECTION, ("cat", [0, 0, 30, 100], 0.95)]]), [1])
    cat, dog = pr_curve_counts(matching)
    assert dog is None  # no dog object
    assert cat.true_positives[[0, 90, 91]].tolist() == [1, 1, 0]
    assert cat.false_positives[[0, 95, 96]].tolist() == [1, 1, 0]
    assert cat.false_negatives[[0, 91]].tolist() == [1, 2]  # the missed object is a false negative everywhere
    assert cat.precision[[0, 91]].tolist() == [0.5, 0.0] and cat.recall[[0, 91]].tolist() == [0.5, 0.0]


# ----------------------------------------------------------------------------------------------
# Files and pictures.


def test_analysis_files_and_pictures(tmp_path):
    coco, results, categories = random_case(0)
    summary = analyze_errors(coco, results, sorted(coco.imgs), [name for _, name in categories], tmp_path)
    assert json.loads((tmp_path / "tide.json").read_text()) == summary
    assert set(json.loads((tmp_path / "pr_curves.json").read_text())["classes"]) == {"cat", "dog", "bird"}
    assert (tmp_path / "tide.png").stat().st_size > 10_000
    assert sorted(p.name for p in (tmp_path / "pr_curves").iterdir()) == ["00_cat.png", "01_dog.png", "02_bird.png"]


def test_no_detection_at_all_still_gives_the_analysis(tmp_path):
    summary = analyze_errors(ground_truth([[FOUND, OBJECT]]), [], [1], ["cat", "dog"], tmp_path)
    assert summary["AP50"] == 0.0 and summary["counts"][MISS] == 2 and summary["num_detections"] == 0
    curves = json.loads((tmp_path / "pr_curves.json").read_text())["classes"]
    assert curves["dog"] is None and set(curves["cat"]["precision50"]) == {0.0}
    assert [p.name for p in (tmp_path / "pr_curves").iterdir()] == ["00_cat.png"]


def test_without_matplotlib_the_numbers_are_written_and_the_log_says_how_to_get_pictures(tmp_path, monkeypatch, caplog):
    monkeypatch.delitem(sys.modules, "retinanet.engine.error_plots", raising=False)
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # import matplotlib raises ImportError
    coco, results, categories = random_case(0)
    with caplog.at_level(logging.INFO):
        analyze_errors(coco, results, sorted(coco.imgs), [name for _, name in categories], tmp_path)
    assert (tmp_path / "tide.json").is_file() and (tmp_path / "pr_curves.json").is_file()
    assert not list(tmp_path.rglob("*.png"))
    assert "pip install 'retinanet[plots]'" in caplog.text
    assert "Bkg" in caplog.text  # the table is in the log all the same


def write_eval_folder(tmp_path):
    """An annotation file and the folder `retinanet eval` would have written for random_case(1)."""
    coco, results, _ = random_case(1)
    ann_file = tmp_path / "instances_val.json"
    ann_file.write_text(json.dumps(coco.dataset))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "coco_results.json").write_text(json.dumps(results))
    return ann_file, tmp_path / "eval"


def test_analyze_errors_command_from_the_files_eval_writes(tmp_path):
    ann_file, eval_dir = write_eval_folder(tmp_path)
    assert main(["analyze-errors", str(eval_dir), "--ann-file", str(ann_file)]) == 0
    summary = json.loads((eval_dir / "analysis" / "tide.json").read_text())
    coco, results, _ = random_case(1)
    assert summary["AP50"] == pytest.approx(cocoeval(coco, results).stats[1], abs=1e-12)
    assert (eval_dir / "analysis" / "tide.png").is_file()
    out = tmp_path / "elsewhere"
    assert main(["analyze-errors", str(eval_dir / "coco_results.json"), "--ann-file", str(ann_file),
                 "--output-dir", str(out)]) == 0
    assert json.loads((out / "tide.json").read_text()) == summary


def test_analyze_errors_command_names_a_wrong_file(tmp_path, caplog):
    ann_file, eval_dir = write_eval_folder(tmp_path)
    assert main(["analyze-errors", str(tmp_path / "nowhere"), "--ann-file", str(ann_file)]) == 2
    assert "nowhere" in caplog.text
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 9, "height": 9}],
                                 "annotations": [], "categories": [{"id": 1, "name": "cat"}]}))
    caplog.clear()
    assert main(["analyze-errors", str(eval_dir), "--ann-file", str(other)]) == 2
    assert "is not in" in caplog.text and "other.json" in caplog.text


# ----------------------------------------------------------------------------------------------
# A 2-iteration training run: TensorBoard pictures at its evaluation, then `eval --analyze`.


@pytest.fixture(scope="module")
def trained_run(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("errors") / "run"
    config = out.parent / "tiny.yaml"
    config.write_text("train:\n  tb_images: 3\n")
    # score_thresh 0: an untrained model scores ~0.01; every image keeps detections to draw and count.
    overrides = train_overrides(synthetic_root, out, max_iter=2) + ["model.inference.score_thresh=0.0",
                                                                    "model.inference.detections_per_image=20"]
    assert main(["train", str(config), *overrides]) == 0
    return out


def test_training_evaluation_writes_tensorboard_images_and_pr_curves(trained_run, synthetic_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_run / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    val = json.loads((synthetic_root / "annotations" / "instances_val.json").read_text())
    first_ids = sorted(image["id"] for image in val["images"])[:3]  # train.tb_images: 3
    assert sorted(events.Tags()["images"]) == sorted(f"val_images/{image_id}" for image_id in first_ids)
    image = events.Images(f"val_images/{first_ids[0]}")[0]
    assert image.step == 2 and image.width > 2 * image.height  # ground truth | detections, side by side
    with_objects = {category["name"] for category in val["categories"]
                    if any(a["category_id"] == category["id"] for a in val["annotations"])}
    assert set(events.PluginTagToContent("pr_curves")) == {f"pr_curve/{name}" for name in with_objects}
    curve = events.Tensors(f"pr_curve/{sorted(with_objects)[0]}")[0]
    assert curve.step == 2


def test_eval_analyze_on_a_trained_checkpoint(trained_run, tmp_path):
    checkpoint = trained_run / "checkpoints" / "model_final.pth"
    assert main(["eval", "--checkpoint", str(checkpoint), "--analyze", "--output-dir", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    summary = json.loads((tmp_path / "analysis" / "tide.json").read_text())
    assert summary["AP50"] == pytest.approx(metrics["AP50"], abs=1e-12)
    assert summary["num_detections"] > 0 and sum(summary["counts"].values()) > 0
    assert (tmp_path / "analysis" / "tide.png").is_file()
    assert len(list((tmp_path / "analysis" / "pr_curves").glob("*.png"))) == len(summary["per_class"])
