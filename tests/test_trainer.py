"""The training loop: resume exactness, NaN stop, signals, atomic checkpoints, learning."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, train_overrides
from retinanet import load_config
from retinanet.engine import trainer as trainer_module
from retinanet.checkpoint import load_checkpoint
from retinanet.engine.solver import lr_factor
from retinanet.engine.trainer import NonFiniteLossError, TrainingStopped, find_last_checkpoint, train


def read_losses(output_dir):
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in rows if "loss" in r}


def final_weights(output_dir):
    return load_checkpoint(output_dir / "checkpoints" / "model_final.pth")["model"]


def stop_after(monkeypatch, num_steps, how):
    """Make the real train_step misbehave at step `num_steps`: a SIGTERM or a NaN loss."""
    real_step = trainer_module.train_step
    calls = {"n": 0}

    def step(model, state, images, targets, *args):
        calls["n"] += 1
        if how == "nan" and calls["n"] == num_steps:
            images = [image.float() * float("nan") for image in images]
        result = real_step(model, state, images, targets, *args)
        if how == "sigterm" and calls["n"] == num_steps:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(trainer_module, "train_step", step)


@pytest.mark.slow
def test_resume_after_sigterm_equals_uninterrupted_run(synthetic_root, tmp_path, monkeypatch):
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    extra = ["model.input.min_size_train=[56,64]", "solver.clip_grad_norm=5.0"]  # exercise RNG and clipping
    train(load_config(None, train_overrides(synthetic_root, full_dir) + extra))

    stop_after(monkeypatch, 3, "sigterm")  # arrives during iteration 3: seen by all at the end of 4
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM at iteration 4") as stopped:
        train(load_config(None, train_overrides(synthetic_root, split_dir) + extra))
    assert stopped.value.exit_code == 143  # a failure for `train && eval`
    assert load_checkpoint(find_last_checkpoint(split_dir))["iteration"] == 4
    assert not (split_dir / "checkpoints" / "model_final.pth").exists()
    monkeypatch.undo()
    train(load_config(None, train_overrides(synthetic_root, split_dir) + extra), resume=True)

    full, split = read_losses(full_dir), read_losses(split_dir)
    assert sorted(split) == list(range(1, 7))
    assert [split[i] for i in range(1, 7)] == [full[i] for i in range(1, 7)]  # exact on CPU
    full_w, split_w = final_weights(full_dir), final_weights(split_dir)
    assert all(torch.equal(full_w[k], split_w[k]) for k in full_w)


@pytest.mark.slow
def test_nan_loss_stops_before_the_update_and_its_advice_works(synthetic_root, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    stop_after(monkeypatch, 3, "nan")
    with pytest.raises(NonFiniteLossError, match="non-finite loss at iteration 3.*--resume solver.base_lr="):
        train(load_config(None, train_overrides(synthetic_root, out)))
    saved = load_checkpoint(find_last_checkpoint(out))
    assert saved["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    monkeypatch.undo()
    # The advice: a lower solver.base_lr, then --resume. The resumed iterations use the new LR.
    lower = load_config(None, train_overrides(synthetic_root, out) + ["solver.base_lr=0.0003"])
    train(lower, resume=True)
    assert load_checkpoint(out / "checkpoints" / "model_final.pth")["iteration"] == 6
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {row["iteration"]: row["lr"] for row in rows if "lr" in row}
    # iteration i trains with the LR of scheduler step i - 1
    assert [lrs[i] for i in range(3, 7)] == pytest.approx([0.0003 * lr_factor(i - 1, lower.solver) for i in range(3, 7)])


def test_kill_during_checkpoint_write_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL a process that writes large checkpoints in a loop, at several moments."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from retinanet.checkpoint import save_atomic
        i = 0
        while True:
            i += 1
            save_atomic({{"model": {{"w": torch.full((4_000_000,), float(i))}}, "config": {{}}, "iteration": i}},
                        {str(tmp_path / "model.pth")!r})
            print(i, flush=True)
    """)
    for delay in (0.3, 0.7, 1.3):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline()  # at least one checkpoint is complete
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        checkpoint = load_checkpoint(tmp_path / "model.pth")
        assert torch.all(checkpoint["model"]["w"] == checkpoint["iteration"])
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "model.pth"]
    assert all(name.endswith(".tmp") for name in leftovers)  # a torn temp file is never the checkpoint


def test_warmup_and_multistep_schedule():
    cfg = load_config(None, ["solver.warmup_iters=10", "solver.warmup_factor=0.001", "solver.steps=[20,30]",
                             "solver.max_iter=40"])
    assert lr_factor(0, cfg.solver) == pytest.approx(0.001)
    assert lr_factor(5, cfg.solver) == pytest.approx(0.001 * 0.5 + 0.5)
    assert [lr_factor(i, cfg.solver) for i in (10, 19, 20, 29, 30)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    cosine = load_config(None, ["solver.scheduler=cosine", "solver.warmup_iters=0", "solver.max_iter=40"])
    assert [lr_factor(i, cosine.solver) for i in (0, 20, 40)] == pytest.approx([1.0, 0.5, 0.0])


def test_no_weight_decay_on_norms_when_configured():
    from retinanet import build_model
    from retinanet.engine.solver import build_optimizer

    cfg = load_config(None, ["model.backbone.depth=18", "model.backbone.norm=bn", "model.head.norm=gn",
                             "solver.weight_decay_norm=0.0", "solver.weight_decay_bias=0.0"])
    model = build_model(cfg)
    optimizer = build_optimizer(cfg.solver, model)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay_of[id(model.head.cls_subnet[1].weight)] == 0.0  # GroupNorm
    assert decay_of[id(model.head.cls_logits.bias)] == 0.0
    assert decay_of[id(model.head.cls_logits.weight)] == 1e-4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)  # 16 images at reference 16


@pytest.mark.slow
def test_short_training_run_learns(synthetic_root, tmp_path):
    out = tmp_path / "learn"
    cfg = load_config(None, train_overrides(synthetic_root, out, max_iter=150) + [
        "model.head.norm=gn", "model.loss.box=giou", "solver.base_lr=0.0015", "solver.warmup_iters=10",
        "solver.ims_per_batch=8", "solver.steps=[120]", "train.eval_period=1000",
        # Evaluated on the images it trained on: this checks that the loop learns, not generalisation.
        f"data.val.ann_file={synthetic_root / 'annotations' / 'instances_train.json'}",
        f"data.val.img_dir={synthetic_root / 'train'}",
    ])
    metrics = train(cfg)
    losses = read_losses(out)
    first, last = sum(losses[i] for i in range(1, 6)) / 5, sum(losses[i] for i in range(146, 151)) / 5
    assert last < 0.6 * first, (first, last)
    # An untrained model scores every anchor ~0.01 < 0.05 and detects nothing; even with the
    # threshold at 0, its 100 guesses per image stay far below the trained model.
    from retinanet import build_model
    from retinanet.data import build_datasets, build_val_loader
    from retinanet.engine.evaluator import evaluate

    cfg.model.inference.score_thresh = 0.0
    torch.manual_seed(0)
    _, val_set = build_datasets(cfg)
    untrained = evaluate(build_model(cfg), build_val_loader(val_set, 8, 0), val_set, "cpu")
    assert untrained["AP50"] < 0.02, untrained
    assert metrics["AP50"] > 0.06, metrics


@pytest.mark.slow
def test_bf16_amp_channels_last_cosine_and_sgd_train(synthetic_root, tmp_path):
    out = tmp_path / "amp"
    train(load_config(None, train_overrides(synthetic_root, out, max_iter=3) + [
        "solver.amp=bf16", "train.channels_last=true", "solver.scheduler=cosine", "solver.optimizer=sgd",
        "solver.clip_grad_norm=1.0",
    ]))
    checkpoint = load_checkpoint(out / "checkpoints" / "model_final.pth")
    assert checkpoint["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    losses = read_losses(out)
    assert sorted(losses) == [1, 2, 3] and all(0 < v < 100 for v in losses.values())
    saved_config = (out / "config.yaml").read_text()
    assert "amp: bf16" in saved_config and "channels_last: true" in saved_config


def test_log_txt_has_one_line_per_log_period_and_no_progress_bar(synthetic_root, tmp_path):
    """A redirected stderr (not a terminal, as here) gets no tqdm bar; log.txt holds the device and a
    line per log period with the losses, LR, time per iteration and ETA."""
    import subprocess
    import sys

    out = tmp_path / "run"
    overrides = train_overrides(synthetic_root, out, max_iter=4) + ["train.log_period=2"]
    result = subprocess.run([sys.executable, "-m", "retinanet", "train", "configs/quickstart.yaml", *overrides],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stderr and "it/s" not in result.stderr
    log = (out / "log.txt").read_text()
    assert "device cpu, 1 process(es)" in log
    assert "config: configs/quickstart.yaml with model.backbone.depth=18" in log
    period_lines = [line for line in log.splitlines() if " iter " in line and "eta " in line]
    assert [line.split(" iter ")[1].split()[0] for line in period_lines] == ["2/4", "4/4"]
    assert all("loss_cls" in line and "lr " in line and "time/iter" in line for line in period_lines)
