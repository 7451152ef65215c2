import pytest

from conftest import CONFIGS
from retinanet import ConfigError, load_config
from retinanet.config import config_from_dict, dump_config, to_dict


def test_paper_configs_load_with_paper_numbers():
    cfg = load_config(CONFIGS / "retinanet_R50_FPN_1x.yaml")
    assert cfg.model.backbone.depth == 50
    assert (cfg.solver.base_lr, cfg.solver.ims_per_batch, cfg.solver.max_iter, cfg.solver.steps) == (0.01, 16, 90000, [60000, 80000])
    assert (cfg.model.matcher.fg_iou_thresh, cfg.model.matcher.bg_iou_thresh) == (0.5, 0.4)
    assert (cfg.model.loss.focal_alpha, cfg.model.loss.focal_gamma) == (0.25, 2.0)
    assert (cfg.model.inference.score_thresh, cfg.model.inference.topk_candidates, cfg.model.inference.nms_thresh,
            cfg.model.inference.detections_per_image) == (0.05, 1000, 0.5, 100)
    assert cfg.model.fpn.p6_from == "c5"
    r101 = load_config(CONFIGS / "retinanet_R101_FPN_1x.yaml")
    assert r101.model.backbone.depth == 101 and r101.solver.max_iter == 90000  # inherited through _base_


def test_overrides_are_typed():
    cfg = load_config(CONFIGS / "retinanet_R50_FPN_1x.yaml", ["model.num_classes=20", "solver.base_lr=2e-2",
                                                               "model.anchors.sizes=[16,32,64,128,256]", "train.channels_last=true"])
    assert cfg.model.num_classes == 20 and cfg.solver.base_lr == 0.02
    assert cfg.model.anchors.sizes == [16.0, 32.0, 64.0, 128.0, 256.0] and cfg.train.channels_last is True


def test_off_on_yes_no_stay_strings_in_files_and_overrides(tmp_path):
    """YAML 1.1 would read `amp: off` as False; the schema wants the string "off"."""
    path = tmp_path / "amp.yaml"
    path.write_text(f"_base_: {CONFIGS / 'retinanet_R50_FPN_1x.yaml'}\nsolver:\n  amp: off\n")
    assert load_config(path).solver.amp == "off"
    assert load_config(None, ["solver.amp=bf16", "solver.amp=off"]).solver.amp == "off"
    assert load_config(None, ["train.channels_last=True"]).train.channels_last is True


@pytest.mark.parametrize("override, message", [
    ("solver.lr=0.1", "unknown key 'solver.lr'; did you mean 'solver.base_lr'"),
    ("model.num_clases=3", "did you mean 'model.num_classes'"),
    ("model.score_thresh=0.1", "did you mean 'model.inference.score_thresh'"),
    ("model.num_classes=abc", "model.num_classes: expected int, got 'abc'"),
    ("train.channels_last=3", "train.channels_last: expected bool"),
    ("train.channels_last=yes", "train.channels_last: expected bool, got 'yes'"),  # YAML 1.2: no yes/no booleans
    ("model.loss.cls=focl", r"model.loss.cls: 'focl' is not one of \['focal', 'ce', 'ohem'\]"),
    ("model.backbone.depth=42", "model.backbone.depth: 42 is not one of"),
    ("model.matcher.bg_iou_thresh=0.7", "bg_iou_thresh <= fg_iou_thresh"),
    ("model.anchors.sizes=[32,64]", "one size per level"),
    ("solver", "expected KEY=VALUE"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "retinanet_R50_FPN_1x.yaml", [override])


def test_bad_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("_base_: " + str(CONFIGS / "retinanet_R50_FPN_1x.yaml") + "\nsolver:\n  warmup_iter: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'solver.warmup_iter'; did you mean 'solver.warmup_iters'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "cycle.yaml").write_text("_base_: cycle.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "cycle.yaml")


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_config(CONFIGS / "torchvision_r50_fpn.yaml", ["model.num_classes=5"])
    assert config_from_dict(to_dict(cfg)) == cfg
    (tmp_path / "dumped.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "dumped.yaml") == cfg
