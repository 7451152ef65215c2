"""Where the command line meets the library: values taken as typed, and the files, images, devices
and paths a user gets wrong reported in one line with exit status 2, with nothing of theirs lost."""

import argparse
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import retinanet.cli as cli
from retinanet.cli import main
from retinanet.config import load_config

from conftest import train_overrides

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")


def run(argv: list[str], caplog) -> tuple[int, list[str]]:
    """main(argv) as the `retinanet` script runs it: (exit status, messages logged at ERROR)."""
    caplog.clear()
    code = main([str(token) for token in argv])
    return code, [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


def assert_one_line_naming(lines: list[str], *texts: str) -> None:
    assert len(lines) == 1 and "\n" not in lines[0], lines
    for text in texts:
        assert text in lines[0], (text, lines[0])


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> str:
    """A config file that changes no default: the runs here are set by KEY=VALUE overrides."""
    path = tmp_path_factory.mktemp("config") / "defaults.yaml"
    path.write_text("{}\n")
    return str(path)


@pytest.fixture(scope="module")
def trained_run(synthetic_root, config_file, tmp_path_factory):
    """A 2-iteration run, trained as a user starts one: its folder."""
    out = tmp_path_factory.mktemp("seams") / "exp"
    assert main(["train", config_file, *train_overrides(synthetic_root, out, max_iter=2)]) == 0
    return out


@pytest.fixture(scope="module")
def checkpoint(trained_run) -> Path:
    return trained_run / "checkpoints" / "model_final.pth"


# ----------------------------------------------------------------------------------------------
# Values given through --output-dir and string keys are taken as typed.


def test_output_dir_with_a_hash_trains_into_that_folder_and_keeps_the_other_run(config_file, synthetic_root,
                                                                                 trained_run):
    def checkpoints() -> dict[str, tuple[int, int]]:  # a file written again is a new inode (save_atomic)
        files = (trained_run / "checkpoints").iterdir()
        return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in files}

    before = checkpoints()
    literal = trained_run.parent / "exp #2"
    argv = ["train", config_file, *train_overrides(synthetic_root, "unused", max_iter=2), "--output-dir", literal,
            "--overwrite"]
    assert main([str(token) for token in argv]) == 0
    assert checkpoints() == before  # neither deleted nor trained again
    assert (literal / "checkpoints" / "model_final.pth").is_file()
    assert load_config(literal / "config.yaml").train.output_dir == str(literal)


@pytest.mark.parametrize("folder", ["2024", "~", "null", "a: b", "[x]"])
def test_output_dir_is_never_read_as_yaml(folder, tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(cli, "train", lambda cfg, **kwargs: trained.append(cfg.train.output_dir) or {})
    monkeypatch.chdir(tmp_path)
    assert main(["train", "quickstart", "--output-dir", folder]) == 0
    assert trained == [folder]


@pytest.mark.parametrize("value", ["2024", "~", "null", "exp #2", "true", "1e-3", "[a, b]"])
def test_a_string_key_takes_its_value_as_typed(value):
    assert load_config(None, [f"train.output_dir={value}"]).train.output_dir == value
    assert load_config(None, [f"data.train.img_dir={value}"]).data.train.img_dir == value


def test_other_keys_stay_typed_and_quoted_strings_are_unquoted():
    cfg = load_config(None, ["solver.max_iter=2024", "solver.steps=[10, 20]", "train.channels_last=true",
                             "train.output_dir='my run'", "model.backbone.weights="])
    assert (cfg.solver.max_iter, cfg.solver.steps, cfg.train.channels_last) == (2024, [10, 20], True)
    assert cfg.train.output_dir == "my run" and cfg.model.backbone.weights == ""


# ----------------------------------------------------------------------------------------------
# Bad images met by eval and by training.


def _copy_split(synthetic_root: Path, split: str, dest: Path) -> tuple[Path, Path, dict]:
    """A copy of a synthetic split: (ann_file, img_dir, its json)."""
    img_dir = dest / split
    shutil.copytree(synthetic_root / split, img_dir)
    ann_file = dest / f"instances_{split}.json"
    shutil.copy(synthetic_root / "annotations" / f"instances_{split}.json", ann_file)
    return ann_file, img_dir, json.loads(ann_file.read_text())


@pytest.mark.parametrize("num_workers", [0, 1])
def test_eval_names_a_truncated_image_in_one_line(synthetic_root, checkpoint, tmp_path, caplog, num_workers):
    ann_file, img_dir, dataset = _copy_split(synthetic_root, "val", tmp_path)
    bad = img_dir / dataset["images"][3]["file_name"]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    code, lines = run(["eval", "--checkpoint", checkpoint, f"data.val.ann_file={ann_file}",
                       f"data.val.img_dir={img_dir}", f"data.num_workers={num_workers}",
                       "--output-dir", tmp_path / "eval"], caplog)
    assert code == 2
    assert_one_line_naming(lines, str(bad))
    assert "Traceback" not in lines[0]


def test_training_stops_on_an_image_of_the_wrong_size_saves_and_names_it(config_file, synthetic_root, tmp_path,
                                                                          caplog):
    ann_file, img_dir, dataset = _copy_split(synthetic_root, "train", tmp_path)
    for image in dataset["images"]:  # every image: the first batch meets one
        image["width"] += 1
    ann_file.write_text(json.dumps(dataset))
    out = tmp_path / "run"
    code, lines = run(["train", config_file, *train_overrides(synthetic_root, out, max_iter=2),
                       f"data.train.ann_file={ann_file}", f"data.train.img_dir={img_dir}"], caplog)
    assert code == 2
    assert "\n" not in lines[-1] and "but the json says" in lines[-1] and str(img_dir) in lines[-1], lines
    assert (out / "checkpoints" / "model_0000000.pth").is_file()  # what it had is saved
    assert not any(record.exc_info for record in caplog.records)  # no traceback on the way out


# ----------------------------------------------------------------------------------------------
# A file where a folder is needed.


def test_train_refuses_a_file_as_output_dir(config_file, synthetic_root, tmp_path, caplog):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code, lines = run(["train", config_file, *train_overrides(synthetic_root, "unused", max_iter=2),
                       "--output-dir", afile], caplog)
    assert code == 2
    assert_one_line_naming(lines, str(afile), "not a folder")
    assert afile.read_text() == "mine"


def test_infer_refuses_a_file_as_output_folder(synthetic_root, checkpoint, tmp_path, caplog):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code, lines = run(["infer", "--checkpoint", checkpoint, synthetic_root / "val", "--output", afile,
                       "--device", "cpu"], caplog)
    assert code == 2
    assert_one_line_naming(lines, str(afile), "not a folder")
    assert afile.read_text() == "mine"


def test_eval_refuses_a_synthetic_root_holding_other_files(checkpoint, tmp_path, caplog):
    notsyn = tmp_path / "notsyn"
    notsyn.mkdir()
    (notsyn / "notes.txt").write_text("mine")
    code, lines = run(["eval", "--checkpoint", checkpoint, f"data.synthetic.root={notsyn}", "data.val.ann_file=",
                       "--output-dir", tmp_path / "eval"], caplog)
    assert code == 2
    assert_one_line_naming(lines, f"data.synthetic.root={notsyn}")
    assert sorted(path.name for path in notsyn.iterdir()) == ["notes.txt"]

    code, lines = run(["eval", "--checkpoint", checkpoint, f"data.synthetic.root={notsyn / 'notes.txt'}",
                       "data.val.ann_file=", "--output-dir", tmp_path / "eval"], caplog)
    assert code == 2
    assert_one_line_naming(lines, str(notsyn / "notes.txt"), "not a folder")


# ----------------------------------------------------------------------------------------------
# Backbone weights that are no PyTorch file.


def test_backbone_weights_that_are_not_a_pytorch_file(config_file, synthetic_root, tmp_path, caplog):
    truncated = tmp_path / "truncated.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    pickled = tmp_path / "pickled.pth"
    torch.save(argparse.Namespace(weights=1), pickled)  # a pickled object: refused by weights_only
    for bad, why in ((truncated, "zip archive"), (pickled, "pickled argparse.Namespace")):
        out = tmp_path / bad.stem
        code, lines = run(["train", config_file, *train_overrides(synthetic_root, out, max_iter=2),
                           f"model.backbone.weights={bad}"], caplog)
        assert code == 2, bad
        assert_one_line_naming(lines, str(bad), "model.backbone.weights", why)
        assert "weights_only" not in lines[0]  # torch's advice to run the file's code


# ----------------------------------------------------------------------------------------------
# A GPU asked for where there is none.


@NO_GPU
def test_eval_with_cuda_on_a_machine_without_one(checkpoint, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(cli, "build_val_dataset", lambda cfg: pytest.fail("went on to the data"))
    code, lines = run(["eval", "--checkpoint", checkpoint, "train.device=cuda", "--output-dir", tmp_path], caplog)
    assert code == 2
    assert_one_line_naming(lines, "train.device=cuda")


@NO_GPU
def test_train_with_cuda_on_a_machine_without_one(config_file, synthetic_root, tmp_path, caplog):
    out = tmp_path / "run"
    code, lines = run(["train", config_file, *train_overrides(synthetic_root, out), "train.device=cuda"], caplog)
    assert code == 2
    assert_one_line_naming(lines, "train.device=cuda")
    assert not out.exists()


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=NO_GPU), "gpu", "cuda:x"])
def test_infer_refuses_a_device_it_cannot_use(synthetic_root, checkpoint, tmp_path, caplog, device):
    out = tmp_path / "out"
    code, lines = run(["infer", "--checkpoint", checkpoint, synthetic_root / "val", "--output", out,
                       "--device", device], caplog)
    assert code == 2
    assert_one_line_naming(lines, f"--device {device}")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Export into a folder, convert onto its input.


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_to_a_folder_is_refused_before_tracing(checkpoint, tmp_path, caplog, monkeypatch, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnx")
    monkeypatch.setattr(torch.jit, "trace", lambda *args, **kwargs: pytest.fail("traced"))
    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: pytest.fail("traced"))
    folder = tmp_path / "expdir"
    folder.mkdir()
    code, lines = run(["export", "--checkpoint", checkpoint, "--format", fmt, folder], caplog)
    assert code == 2
    assert_one_line_naming(lines, str(folder), "is a folder")
    assert list(folder.iterdir()) == []


def test_convert_refuses_to_write_over_its_input(tmp_path, caplog):
    weights = tmp_path / "retinanet_torchvision.pth"
    torch.save({"head.classification_head.cls_logits.weight": torch.zeros(1)}, weights)
    original = weights.read_bytes()
    link = tmp_path / "link.pth"
    link.symlink_to(weights)
    for output in (weights, link):
        code, lines = run(["convert", "--from", "torchvision", weights, output], caplog)
        assert code == 2
        assert_one_line_naming(lines, str(weights), "another file")
    assert weights.read_bytes() == original


# ----------------------------------------------------------------------------------------------
# A user's config built on a packaged one.


def test_a_user_config_can_name_a_packaged_config_as_its_base(tmp_path, caplog, monkeypatch):
    mine = tmp_path / "elsewhere" / "mine.yaml"
    mine.parent.mkdir()
    mine.write_text(yaml.safe_dump({"_base_": "quickstart.yaml", "solver": {"max_iter": 7}}))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(mine)
    assert cfg.solver.max_iter == 7 and cfg.model.backbone.depth == 18  # quickstart's, and its own base's
    assert cfg.solver.base_lr == load_config("quickstart").solver.base_lr
    # The CLI gets past the _base_ to the user's bad value.
    code, lines = run(["train", mine, "solver.base_lr=-1"], caplog)
    assert code == 2
    assert_one_line_naming(lines, "solver.base_lr")

    # A file of that name beside the config wins over the packaged one.
    (mine.parent / "quickstart.yaml").write_text(yaml.safe_dump({"model": {"num_classes": 9}}))
    assert load_config(mine).model.num_classes == 9

    mine.write_text(yaml.safe_dump({"_base_": "nope.yaml"}))
    code, lines = run(["train", mine], caplog)
    assert code == 2
    assert_one_line_naming(lines, "mine.yaml", "_base_: nope.yaml")
