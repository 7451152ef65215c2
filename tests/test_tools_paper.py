"""tools/sweep.py (resumable sweeps and their table) and tools/loss_cdf.py (the paper's Figure 4)."""

import json
import signal
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, ROOT, tiny_overrides, train_overrides

sys.path.insert(0, str(ROOT / "tools"))
import loss_cdf  # noqa: E402  (tools/ is not a package)
import sweep  # noqa: E402

from retinanet import build_model, load_config  # noqa: E402
from retinanet.config import to_dict  # noqa: E402
from retinanet.engine import trainer  # noqa: E402

# ----------------------------------------------------------------------------------------------
# loss_cdf: the curves.


def test_equal_losses_give_the_diagonal():
    fraction, cumulative = loss_cdf.cumulative_loss_curve(torch.full((1000,), 0.3), num_points=11)
    assert fraction == pytest.approx([i / 10 for i in range(11)])
    assert cumulative == pytest.approx(fraction)


def test_cumulative_loss_by_hand():
    # Sorted: 0, 0, 0, 4: the three easiest carry nothing, the hardest all of it.
    _, cumulative = loss_cdf.cumulative_loss_curve(torch.tensor([0.0, 4.0, 0.0, 0.0]), num_points=5)
    assert cumulative == [0.0, 0.0, 0.0, 0.0, 1.0]
    # Sorted 1, 3: half of the samples hold a quarter of the loss.
    _, cumulative = loss_cdf.cumulative_loss_curve(torch.tensor([3.0, 1.0]), num_points=3)
    assert cumulative == pytest.approx([0.0, 0.25, 1.0])
    with pytest.raises(ValueError, match="no samples"):
        loss_cdf.cumulative_loss_curve(torch.zeros(0))


def test_sampled_losses_are_the_criterions_at_gamma_zero():
    """With every anchor kept, the gamma = 0 losses of foreground and background anchors add up to the
    criterion's classification loss (CE without alpha, times the foreground count): the tool labels
    the anchors as the criterion does."""
    cfg = load_config(None, tiny_overrides(size=128) + ["model.loss.focal_gamma=0", "model.loss.focal_alpha=-1"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 96)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 50.0]]), "labels": torch.tensor([0, 2])},
               {"boxes": torch.tensor([[5.0, 5.0, 40.0, 90.0]]), "labels": torch.tensor([1])}]
    losses = loss_cdf.sample_losses(model, [(images, targets)], gammas=(0.0, 2.0))
    with torch.no_grad():
        batch, _, _, scaled = model.preprocessor(images, targets)
        cls_per_level, box_per_level, anchors_per_level = model.forward_batch(batch)
        expected = model.criterion(
            torch.cat(cls_per_level, 1), torch.cat(box_per_level, 1), torch.cat(anchors_per_level), scaled
        )["loss_cls"]
    num_foreground = losses["foreground"][0.0].numel()
    assert num_foreground > 0
    total = losses["foreground"][0.0].sum() + losses["background"][0.0].sum()
    torch.testing.assert_close(total / num_foreground, expected, rtol=1e-4, atol=0)
    assert (losses["background"][2.0] <= losses["background"][0.0]).all()  # FL <= CE


# ----------------------------------------------------------------------------------------------
# sweep: rows, budget, table.


def test_grid_rows_are_the_product_of_the_values():
    rows = sweep.grid_rows(["configs/quickstart.yaml"], ["model.loss.focal_gamma=[0, 2]", "model.anchors.scales=[[1.0], [1.0, 1.5]]"])
    assert [row.name for row in rows] == [
        "quickstart_focal_gamma=0_scales=1.0", "quickstart_focal_gamma=0_scales=1.0-1.5",
        "quickstart_focal_gamma=2_scales=1.0", "quickstart_focal_gamma=2_scales=1.0-1.5",
    ]
    assert rows[1].overrides == ["model.loss.focal_gamma=0", "model.anchors.scales=[1.0, 1.5]"]
    assert load_config(rows[1].config, rows[1].overrides).model.anchors.scales == [1.0, 1.5]
    with pytest.raises(sweep.SweepError, match="KEY="):
        sweep.grid_rows(["configs/quickstart.yaml"], ["no_equals_sign"])


def test_budget_scales_the_schedule():
    cfg = load_config(CONFIGS / "ablations" / "base.yaml")  # 90k, steps 60k / 80k, warm-up 500
    assert sweep.budget_overrides(cfg, 900) == ["solver.max_iter=900", "solver.steps=[600, 800]", "solver.warmup_iters=225"]
    assert sweep.budget_overrides(cfg, 9000)[2] == "solver.warmup_iters=500"


def test_table_lists_every_row_with_the_papers_ap():
    entries = [
        {"name": "a", "status": "done", "metrics": {"AP": 0.1234, "AP50": 0.3, "AP75": None}, "train_seconds": 12.3,
         "paper_ap": 34.0},
        {"name": "b", "status": "not run", "paper_ap": None},
    ]
    table = sweep.format_table(entries, "T", 200)
    assert "| a | 12.3 | 30.0 | – | 12 | 34.0 |" in table
    assert "| b | not run | – | – | – | – |" in table
    assert "200 iterations per run." in table


def test_overlay_becomes_overrides_that_reproduce_it():
    path = CONFIGS / "ablations" / "synthetic_cpu.yaml"
    overrides = sweep.overlay_overrides(path)
    assert "model.backbone.depth=18" in overrides and 'data.synthetic.root="datasets/synthetic"' in overrides
    assert load_config(None, overrides) == load_config(path)


def test_a_result_stays_valid_when_the_schema_gains_a_key_at_its_default(tmp_path):
    row = sweep.Row("r", str(CONFIGS / "quickstart.yaml"), ["model.loss.focal_gamma=1"])
    cfg, _ = sweep.row_config(row, [], None, tmp_path)
    saved = to_dict(cfg)
    del saved["model"]["loss"]["ohem_nms_thresh"]  # as written before the key existed
    saved["model"]["loss"]["removed_since"] = 1.0
    (tmp_path / sweep.RESULT_FILE).write_text(json.dumps({"config": saved, "metrics": {"AP": 0.5}}))
    assert sweep.finished_result(row, cfg, tmp_path)["metrics"] == {"AP": 0.5}
    cfg.model.loss.ohem_nms_thresh = 0.5  # not the default: the old run did not have it
    with pytest.raises(sweep.SweepError, match=r"ohem_nms_thresh: 0.7 -> 0.5"):
        sweep.finished_result(row, cfg, tmp_path)
    cfg, _ = sweep.row_config(row, ["train.eval_period=7", "data.num_workers=3"], None, tmp_path / "elsewhere")
    assert sweep.finished_result(row, cfg, tmp_path) is not None  # periods, workers, folder: same result


# ----------------------------------------------------------------------------------------------
# sweep: a real one, stopped and continued.


REAL_TRAIN_STEP = trainer.train_step


def _stop_at(iteration: int, calls: list):
    """trainer.train_step that reports a SIGTERM (as a scheduler's or Ctrl-C's) after `iteration` steps."""

    def step(model, state, *args):
        losses, stop = REAL_TRAIN_STEP(model, state, *args)
        calls.append(state.iteration)
        return losses, signal.SIGTERM if state.iteration == iteration else stop

    return step


@pytest.mark.slow
def test_sweep_skips_finished_rows_and_continues_an_interrupted_one(synthetic_root, tmp_path, monkeypatch):
    config = str(CONFIGS / "ablations" / "table1b_focal.yaml")
    common = train_overrides(synthetic_root, tmp_path / "unused", max_iter=4) + [
        "model.backbone.weights=", "train.checkpoint_period=2",
    ]
    row_a = sweep.Row("gamma_2", config, ["model.loss.focal_gamma=2"], paper_ap=34.0)
    row_b = sweep.Row("gamma_0", config, ["model.loss.focal_gamma=0", "model.loss.focal_alpha=0.75"], paper_ap=31.1)
    out = tmp_path / "sweep"
    trained = []
    real_train = sweep.train
    monkeypatch.setattr(sweep, "train", lambda cfg, **kw: trained.append(Path(cfg.train.output_dir).name) or real_train(cfg, **kw))

    sweep.run_sweep([row_a], out, common, title="T")
    assert trained == ["gamma_2"]
    result_a = out / "gamma_2" / sweep.RESULT_FILE
    stamps = {path: path.stat().st_mtime_ns for path in (result_a, out / "gamma_2" / "checkpoints" / "model_final.pth")}

    # One more row; it is stopped after its second iteration (a checkpoint is saved, as on Ctrl-C).
    steps: list[int] = []
    monkeypatch.setattr(trainer, "train_step", _stop_at(2, steps))
    with pytest.raises(trainer.TrainingStopped):
        sweep.run_sweep([row_a, row_b], out, common, title="T")
    assert trained == ["gamma_2", "gamma_0"] and steps == [1, 2]
    table = json.loads((out / sweep.TABLE_JSON).read_text())["rows"]
    assert [(row["name"], row["status"]) for row in table] == [("gamma_2", "done earlier"), ("gamma_0", "not run")]

    # Again: the first row is not retrained, the second continues from iteration 2.
    monkeypatch.setattr(trainer, "train_step", _stop_at(-1, steps))
    entries = sweep.run_sweep([row_a, row_b], out, common, title="T")
    assert trained == ["gamma_2", "gamma_0", "gamma_0"] and steps == [1, 2, 3, 4]
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps
    assert entries[1]["resumed_from"] == "model_0000002.pth" and entries[1]["status"] == "done"
    table = json.loads((out / sweep.TABLE_JSON).read_text())["rows"]
    assert [(row["name"], row["status"]) for row in table] == [("gamma_2", "done earlier"), ("gamma_0", "done")]
    assert all(0 <= row["metrics"]["AP"] <= 1 for row in table)
    markdown = (out / sweep.TABLE_MD).read_text()
    assert "| gamma_2 |" in markdown and "| 34.0 |" in markdown and "| 31.1 |" in markdown

    # A finished row whose config has changed since is an error, not a silently reused result.
    with pytest.raises(sweep.SweepError, match="another config.*focal_gamma"):
        sweep.run_sweep([sweep.Row("gamma_2", config, ["model.loss.focal_gamma=1"])], out, common)

    # Figure 4 of the finished run's checkpoint, end to end.
    figure = tmp_path / "figure" / "figure4.png"
    assert loss_cdf.main([str(out / "gamma_2" / "checkpoints" / "model_final.pth"), "--images", "8",
                          "--out", str(figure)]) == 0
    data = json.loads(figure.with_suffix(".json").read_text())
    assert data["foreground"]["num_samples"] > 0 and data["background"]["num_samples"] > 1000
    for group in ("foreground", "background"):
        assert set(data[group]["curves"]) == {"0.0", "0.5", "1.0", "2.0"}
        for curve in data[group]["curves"].values():
            values = curve["cumulative_loss"]
            assert values[0] == 0 and values[-1] == pytest.approx(1)
            assert all(b >= a for a, b in zip(values, values[1:]))
    assert figure.with_suffix(".csv").read_text().startswith("group,gamma,fraction_of_samples,cumulative_loss")
    pytest.importorskip("matplotlib")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
