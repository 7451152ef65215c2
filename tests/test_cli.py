"""The command line as typed: KEY=VALUE anywhere on the line, and user errors as one line + exit 2."""

import logging
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.io import write_png

from retinanet.checkpoint import load_checkpoint, make_checkpoint, save_atomic
from retinanet.cli import build_parser, main, split_overrides
from retinanet.config import load_config

from conftest import tiny_overrides, train_overrides


def test_overrides_are_taken_from_anywhere_but_option_values():
    parser = build_parser()
    argv = ["export", "model.num_classes=4", "out.onnx", "--image-size", "64", "96", "--checkpoint",
            "train.x=1.pth", "model.inference.score_thresh=0.2", "--format", "onnx", "--", "data.y=z"]
    rest, overrides = split_overrides(parser, argv)
    assert overrides == ["model.num_classes=4", "model.inference.score_thresh=0.2"]
    assert rest == ["export", "out.onnx", "--image-size", "64", "96", "--checkpoint", "train.x=1.pth",
                    "--format", "onnx", "--", "data.y=z"]
    # '--output-dir=x' carries its own value; a file that merely contains '=' is not an override.
    rest, overrides = split_overrides(parser, ["infer", "a=b.jpg", "--output-dir=model.x=1", "solver.amp=bf16"])
    assert overrides == ["solver.amp=bf16"] and rest == ["infer", "a=b.jpg", "--output-dir=model.x=1"]


@pytest.fixture(scope="module")
def trained_run(synthetic_root, tmp_path_factory):
    """A 2-iteration run started with the options before, between and after the overrides."""
    out = tmp_path_factory.mktemp("cli") / "run"
    overrides = train_overrides(synthetic_root, "unused", max_iter=2)
    config = out.parent / "tiny.yaml"
    config.write_text(yaml.safe_dump({"solver": {"max_iter": 7}}))
    argv = ["train", *overrides[:3], str(config), "--output-dir", str(out), *overrides[3:], "solver.max_iter=2"]
    assert main(argv) == 0
    return out


def test_train_takes_options_and_overrides_in_any_order(trained_run):
    saved = load_config(trained_run / "config.yaml")
    assert saved.train.output_dir == str(trained_run)  # --output-dir after the config file
    assert saved.solver.max_iter == 2  # the override after the options beats the file
    assert saved.model.backbone.depth == 18  # overrides before the config file
    assert load_checkpoint(trained_run / "checkpoints" / "model_final.pth")["iteration"] == 2


@pytest.mark.parametrize("order", ["config-first", "no-config", "overrides-first"])
def test_eval_takes_overrides_anywhere_with_or_without_a_config(trained_run, tmp_path, order):
    checkpoint = str(trained_run / "checkpoints" / "model_final.pth")
    override = "model.inference.score_thresh=0.5"
    out = ["--output-dir", str(tmp_path)]
    argv = {
        "config-first": ["eval", str(trained_run / "config.yaml"), "--checkpoint", checkpoint, override, *out],
        "no-config": ["eval", "--checkpoint", checkpoint, override, *out],
        "overrides-first": ["eval", override, *out, "--checkpoint", checkpoint],
    }[order]
    assert main(argv) == 0
    assert (tmp_path / "metrics.json").is_file()


def _error_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


def user_error_cases(tmp_path: Path, checkpoint: str) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, text the one error line must contain)."""
    not_a_checkpoint = tmp_path / "weights.pth"
    torch.save(torch.zeros(3), not_a_checkpoint)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a zip file at all")
    four_classes = tmp_path / "four.pth"
    cfg = load_config(None, tiny_overrides(num_classes=4))
    save_atomic(make_checkpoint({}, cfg), four_classes)
    photo = tmp_path / "photo.png"
    write_png(torch.zeros(3, 8, 8, dtype=torch.uint8), str(photo))
    torchvision_like = tmp_path / "tv.pth"
    torch.save({"head.classification_head.cls_logits.weight": torch.zeros(1)}, torchvision_like)
    return {
        "tensor file": (["eval", "--checkpoint", str(not_a_checkpoint)], str(not_a_checkpoint)),
        "not a pytorch file": (["infer", str(photo), "--checkpoint", str(garbage), "--output", str(tmp_path / "o")],
                               str(garbage)),
        "missing checkpoint": (["export", "x.pt", "--checkpoint", str(tmp_path / "nope.pth"), "--format", "onnx"],
                               "nope.pth"),
        "other class count": (["eval", "--checkpoint", checkpoint, "model.num_classes=5"], "num_classes"),
        "weights of another model": (["eval", "--checkpoint", str(four_classes)], str(four_classes)),
        "torchvision weights": (["eval", "--checkpoint", str(torchvision_like)], "retinanet convert"),
        "missing config": (["train", "configs/nope.yaml"], "nope.yaml"),
        "bad value": (["train", "configs/quickstart.yaml", "solver.base_lr=-1"], "solver.base_lr"),
        "unknown key": (["eval", "--checkpoint", checkpoint, "solver.lr=0.1"], "solver.base_lr"),
        "convert a non-torchvision file": (["convert", "--from", "torchvision", str(not_a_checkpoint),
                                            str(tmp_path / "c.pth")], str(not_a_checkpoint)),
        "missing image": (["infer", str(tmp_path / "nope.jpg"), "--checkpoint", checkpoint, "--output",
                           str(tmp_path / "o")], "nope.jpg"),
    }


def test_user_errors_print_one_line_and_exit_2(trained_run, tmp_path, caplog, capsys):
    checkpoint = str(trained_run / "checkpoints" / "model_final.pth")
    for name, (argv, expected) in user_error_cases(tmp_path, checkpoint).items():
        caplog.clear()
        assert main(argv) == 2, name
        lines = _error_lines(caplog)
        assert len(lines) == 1 and "\n" not in lines[0], (name, lines)
        assert expected in lines[0], (name, lines[0])
        assert "Traceback" not in capsys.readouterr().err, name


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "eval", "--checkpoint", str(tmp_path / "nope.pth")])


def test_overrides_on_a_command_that_takes_none_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--from", "torchvision", "a.pth", "b.pth", "model.num_classes=3"])
    assert exit_info.value.code == 2
    assert "takes no KEY=VALUE" in capsys.readouterr().err


def test_eval_refuses_an_unwritable_output_folder_before_inference(trained_run, tmp_path, caplog, monkeypatch):
    import retinanet.cli as cli

    blocker = tmp_path / "results"
    blocker.write_text("a file where the folder should be")
    predicted = []
    monkeypatch.setattr(cli, "evaluate", lambda *args, **kwargs: predicted.append(1))
    checkpoint = str(trained_run / "checkpoints" / "model_final.pth")
    assert main(["eval", "--checkpoint", checkpoint, "--output-dir", str(blocker)]) == 2
    assert not predicted and str(blocker) in _error_lines(caplog)[0]
