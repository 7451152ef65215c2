"""configs/ablations/: the paper's Table 1 as configs and sweep files; every one loads and trains."""

import sys

import pytest
import torch

from conftest import CONFIGS, ROOT, train_overrides

sys.path.insert(0, str(ROOT / "tools"))
import sweep  # noqa: E402  (tools/ is not a package)

from retinanet import load_config  # noqa: E402
from retinanet.engine.trainer import train  # noqa: E402

ABLATIONS = CONFIGS / "ablations"
CONFIG_FILES = sorted(ABLATIONS.glob("*.yaml"))
SWEEP_FILES = sorted(ABLATIONS.glob("*.sweep.yml"))
OVERLAY = ABLATIONS / "synthetic_cpu.yaml"
# Table 1 of the paper (SPEC.md), row by row: what the sweep files must say.
PAPER_AP = {
    "table1a_alpha": [0.0, 10.8, 30.2, 31.1, 30.8, 28.7, 25.1],
    "table1b_focal": [31.1, 31.4, 31.9, 32.9, 33.7, 34.0, 32.2],
    "table1c_anchors": [30.3, 31.9, 31.8, 32.4, 34.2, 34.0, 33.8],
    "table1d_ohem": [31.1, 31.8, 30.6, 32.8, 31.0, 27.6, 31.1, 28.3, 24.0, 36.0],
    "table1e_speed": [30.5, 32.5, 34.3, 35.1, 35.7, 31.9, 34.4, 36.0, 37.1, 37.8],
}


def all_rows() -> list[sweep.Row]:
    return [row for path in SWEEP_FILES for row in sweep.read_sweep_file(path)]


def test_one_config_and_one_sweep_per_family():
    names = {path.name for path in CONFIG_FILES}
    for family in PAPER_AP:
        assert f"{family}.yaml" in names and (ABLATIONS / f"{family}.sweep.yml").is_file()
    assert len(SWEEP_FILES) == len(PAPER_AP) + 1  # and the synthetic analogue of 1e


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_ablation_config_loads(path):
    cfg = load_config(path)
    if path.name.startswith("table1"):
        # The paper's ablation setting (sec. 5.1): ResNet-50 (101 for OHEM), 600 px.
        assert cfg.model.backbone.depth == (101 if "ohem" in path.name else 50)
        assert cfg.model.input.min_size_train == [600] and cfg.model.input.min_size_test == 600


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_sweep_files_hold_the_papers_rows(path):
    rows = sweep.read_sweep_file(path)
    family = path.name.split(".")[0]
    if family in PAPER_AP:
        assert [row.paper_ap for row in rows] == PAPER_AP[family]
    for row in rows:
        load_config(row.config, row.overrides)  # at the paper's setting
        load_config(row.config, sweep.overlay_overrides(OVERLAY) + row.overrides)  # shrunk to a CPU


def test_rows_set_what_they_name():
    rows = {row.name: load_config(row.config, row.overrides) for row in all_rows()}
    assert rows["alpha_0.999"].model.loss.cls == "ce" and rows["alpha_0.999"].model.loss.focal_alpha == 0.999
    assert rows["gamma_5_alpha_0.25"].model.loss.focal_gamma == 5
    anchors = rows["4x3"].model.anchors
    assert len(anchors.scales) == 4 and anchors.aspect_ratios == [0.5, 1.0, 2.0]
    assert anchors.scales[2] == pytest.approx(2 ** 0.5)  # octave scales 2^(k/4)
    ohem = rows["ohem_1to3_256_nms0.5"].model.loss
    assert (ohem.cls, ohem.ohem_anchors_per_image, ohem.ohem_nms_thresh, ohem.ohem_fg_fraction) == ("ohem", 256, 0.5, 0.25)
    assert rows["fl"].model.loss.cls == "focal" and rows["fl"].model.backbone.depth == 101
    assert rows["R101_800"].model.input.min_size_test == 800 and rows["R101_800"].model.backbone.depth == 101


# What makes each sweep's rows differ, trained beyond the configs themselves: 1:3 OHEM after NMS, four scales.
TRAINED_ROWS = ["ohem_1to3_512_nms0.5", "4x3", "alpha_0.25"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [p.name for p in CONFIG_FILES] + TRAINED_ROWS)
def test_every_ablation_config_trains(name, synthetic_root, tmp_path):
    """Two iterations of each config (and of a few rows), shrunk to the suite's tiny model."""
    rows = {row.name: row for row in all_rows()}
    config, extra = (ABLATIONS / name, []) if name.endswith(".yaml") else (rows[name].config, rows[name].overrides)
    cfg = load_config(config, extra + train_overrides(synthetic_root, tmp_path, max_iter=2) + ["model.backbone.weights="])
    metrics = train(cfg)
    assert 0 <= metrics["AP"] <= 1
    assert (tmp_path / "checkpoints" / "model_final.pth").is_file()
    assert torch.isfinite(torch.tensor(metrics["AP"]))
