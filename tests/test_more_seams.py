"""More seams met through the command line as typed: an LR schedule the run never reaches (a
warning at start-up), `infer -r` through symlinked folders (followed, each real folder once) and a
training set without one box (refused at start-up: one line naming the file, exit status 2)."""

import json
import logging
import os
import shutil

import pytest

from test_data_seams import assert_nothing_trained, assert_user_error, edited_copy, split_files, train_argv
from retinanet.cli import main
from retinanet.config import load_config, schedule_warnings
from retinanet.data.coco import CocoDetection
from retinanet.engine.run_dir import CHECKPOINTS_DIR



def messages(caplog, level):
    return [record.getMessage() for record in caplog.records if record.levelno == level]


# ---------------------------------------------------------------------------------------------
# An LR schedule the run never reaches (issue: steps beyond max_iter, or a warm-up as long as the
# run, were accepted silently: the LR never dropped, or never left warm-up).


@pytest.mark.parametrize("overrides, expected", [
    (["solver.max_iter=4", "solver.steps=[100]"], ["solver.steps=[100]", "solver.max_iter=4", "the LR never drops"]),
    (["solver.max_iter=4", "solver.steps=[3]", "solver.warmup_iters=10"],
     ["solver.warmup_iters=10", "solver.max_iter=4", "the warm-up never ends"]),
])
def test_a_schedule_beyond_the_run_is_warned_at_start_up_and_the_run_goes_on(synthetic, tmp_path, caplog,
                                                                             overrides, expected):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    assert main([str(token) for token in train_argv(synthetic, out, *overrides)]) == 0  # a warning, not an error
    warnings = [line for line in messages(caplog, logging.WARNING) if expected[0] in line]
    assert len(warnings) == 1, messages(caplog, logging.WARNING)
    for text in expected:
        assert text in warnings[0], (text, warnings[0])
    assert (out / CHECKPOINTS_DIR / "model_final.pth").is_file()
    assert expected[0] in (out / "log.txt").read_text()  # in the run's own log too


def test_the_1x_schedule_cut_to_5000_iterations_is_warned():
    (line,) = schedule_warnings(load_config("configs/retinanet_R50_FPN_1x.yaml", ["solver.max_iter=5000"]).solver)
    assert "solver.steps=[60000, 80000] with solver.max_iter=5000: the LR never drops" in line


def test_a_step_beyond_the_run_is_named_alone():
    (line,) = schedule_warnings(load_config("configs/retinanet_R50_FPN_1x.yaml", ["solver.max_iter=70000"]).solver)
    assert "solver.max_iter=70000: the LR never drops at [80000]" in line


@pytest.mark.parametrize("overrides", [
    [],  # the packaged schedule
    ["solver.max_iter=101", "solver.steps=[100]", "solver.warmup_iters=100"],  # the last iteration is 100
    ["solver.scheduler=cosine", "solver.max_iter=40", "solver.warmup_iters=10"],  # steps unused
])
def test_a_schedule_within_the_run_is_not_warned(overrides):
    assert schedule_warnings(load_config("quickstart", overrides).solver) == []


# ---------------------------------------------------------------------------------------------
# infer -r through symlinked folders (issue: they were skipped silently, while the run without -r
# counted them as "subfolders not searched").


@pytest.fixture
def linked_folder(synthetic, tmp_path):
    """A folder with one image, a symlink to the validation images and a symlink to itself (a cycle)."""
    folder = tmp_path / "ph"
    (folder / "deep").mkdir(parents=True)
    shutil.copy(synthetic / "val" / "000000.jpg", folder / "x.jpg")
    os.symlink(synthetic / "val", folder / "linkdir")
    os.symlink(folder, folder / "loop")
    os.symlink(folder, folder / "deep" / "up")  # a link to an ancestor two levels up
    return folder


def infer_argv(checkpoint_path, inputs, output, *options):
    return ["infer", *map(str, inputs), "--checkpoint", str(checkpoint_path), "--output", str(output),
            "--device", "cpu", *options]


def test_infer_recursive_follows_symlinked_folders_once_and_keeps_their_paths(varied_checkpoint, linked_folder,
                                                                              synthetic, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    assert main(infer_argv(varied_checkpoint[0], [linked_folder], out, "-r")) == 0
    val_names = sorted(path.name for path in (synthetic / "val").iterdir())
    expected = ["x.jpg"] + [f"linkdir/{name}" for name in val_names]
    records = json.loads((out / "detections.json").read_text())
    assert sorted(record["drawn"] for record in records) == sorted(expected)
    for relative in expected:
        assert (out / relative).is_file(), relative
    assert not (out / "loop").exists() and not (out / "deep").exists()
    skipped = [line for line in messages(caplog, logging.INFO) if "not searched" in line]
    assert len(skipped) == 2 and all("searched already" in line for line in skipped), skipped
    assert any(line.startswith(str(linked_folder / "loop")) for line in skipped), skipped
    assert any(line.startswith(str(linked_folder / "deep" / "up")) for line in skipped), skipped


def test_infer_without_recursive_still_counts_the_linked_folders(varied_checkpoint, linked_folder, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    assert main(infer_argv(varied_checkpoint[0], [linked_folder], out)) == 0
    assert [record["drawn"] for record in json.loads((out / "detections.json").read_text())] == ["x.jpg"]
    assert f"{linked_folder}: 3 subfolders not searched (--recursive searches them)" in messages(caplog, logging.INFO)


# ---------------------------------------------------------------------------------------------
# A training set without one box (issue: it trained to the end, exit 0, with only an INFO line
# "8 images, 0 boxes").


def no_annotations(dataset):
    dataset["annotations"] = []


def crowd_only(dataset):
    for annotation in dataset["annotations"]:
        annotation["iscrowd"] = 1


def all_degenerate(dataset):
    for annotation in dataset["annotations"]:
        annotation["bbox"][2] = 0


@pytest.mark.parametrize("edit, expected", [
    (no_annotations, "its 8 images hold no annotation"),
    (crowd_only, "crowd regions (iscrowd=1)"),
    (all_degenerate, "dropped by sanitizing"),
])
def test_a_training_set_without_a_box_is_refused_at_start_up(synthetic, tmp_path, caplog, edit, expected):
    train_json, _ = split_files(synthetic, "train")
    bad = edited_copy(train_json, tmp_path / "train.json", edit)
    out = tmp_path / "run"
    assert_user_error(train_argv(synthetic, out, train_ann=bad), caplog, f"{bad}: no boxes to learn from", expected)
    assert_nothing_trained(out)


def test_an_evaluation_set_without_a_box_is_not_refused_by_that_check(synthetic, tmp_path):
    train_json, train_dir = split_files(synthetic, "train")
    empty = edited_copy(train_json, tmp_path / "empty.json", no_annotations)
    assert len(CocoDetection(empty, train_dir)) == 8  # keep_ground_truth=True: an evaluation set
    with pytest.raises(ValueError, match="no boxes to learn from"):
        CocoDetection(empty, train_dir, keep_ground_truth=False)  # how the training set is built
