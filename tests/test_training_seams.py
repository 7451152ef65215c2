"""What a training run logs and how it ends: the logged LR and losses, signals, the run folder's log."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, default_stop_signals, train_overrides
from retinanet import load_config
from retinanet.engine.run_dir import RunDirError, remove_previous_run
from retinanet.engine.solver import lr_factor, scaled_lr
from retinanet.engine.trainer import train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(output_dir) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "loss" in record]


def wait_for(path, text: str, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Until `text` appears in the file at `path`; fails when `process` ends first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before logging {text!r}"
        time.sleep(0.1)
    pytest.fail(f"{text!r} not in {path} after {timeout_s} s")


@pytest.mark.slow
def test_logged_lr_is_the_lr_the_logged_iteration_trained_with(synthetic_root, tmp_path):
    """Iteration i (1-based) runs at scaled_lr * lr_factor(i - 1); the scheduler's step after it
    already holds iteration i + 1's, which the log showed before (one step late: at a drop, and 0
    on the last line of a cosine schedule)."""
    out = tmp_path / "run"
    cfg = load_config(None, train_overrides(synthetic_root, out, max_iter=5) + [
        "solver.steps=[3]", "solver.warmup_iters=2"])
    train(cfg)
    logged = {record["iteration"]: record["lr"] for record in read_metrics(out)}
    assert sorted(logged) == [1, 2, 3, 4, 5]
    for iteration, lr in logged.items():
        assert lr == pytest.approx(scaled_lr(cfg.solver) * lr_factor(iteration - 1, cfg.solver), rel=1e-9), iteration
    log = (out / "log.txt").read_text()
    assert "iter 3/5" in log and f"lr {logged[3]:.3g}" in log.split("iter 3/5")[1].splitlines()[0]

    cosine_out = tmp_path / "cosine"
    cosine = load_config(None, train_overrides(synthetic_root, cosine_out, max_iter=3) + ["solver.scheduler=cosine"])
    train(cosine)
    last = read_metrics(cosine_out)[-1]
    assert last["iteration"] == 3 and last["lr"] > 0
    assert last["lr"] == pytest.approx(scaled_lr(cosine.solver) * lr_factor(2, cosine.solver), rel=1e-9)


@pytest.mark.slow
def test_two_process_run_logs_the_losses_of_the_global_batch(synthetic_root, tmp_path):
    """Under DDP every process logs the mean over all processes' shares (reduced at log periods),
    equal to a one-process run on the same global batches; not rank 0's share alone."""
    config = tmp_path / "empty.yaml"
    config.write_text("")

    def overrides(out):
        # Per-process BatchNorm statistics would make the runs differ: frozen BN and GroupNorm.
        # The runs' rounding differences grow with every step (past 1e-4 by iteration 3): one log
        # period of two iterations, the second after one step.
        return train_overrides(synthetic_root, out, max_iter=2) + [
            "model.backbone.norm=frozen_bn", "model.head.norm=gn", "train.log_period=2", "solver.optimizer=sgd"]

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    subprocess.run([sys.executable, "-m", "retinanet", "train", str(config), *overrides(single)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "retinanet", "train", str(config),
         *overrides(ddp)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected, logged = read_metrics(single), read_metrics(ddp)
    assert [r["iteration"] for r in logged] == [r["iteration"] for r in expected] == [2]
    for want, got in zip(expected, logged):
        for key in ("loss", "loss_cls", "loss_box"):
            assert got[key] == pytest.approx(want[key], rel=1e-4), (got["iteration"], key)
    log_lines = [line for line in (ddp / "log.txt").read_text().splitlines() if "iter 2/2" in line]
    assert len(log_lines) == 1 and f"loss {logged[-1]['loss']:.4f}" in log_lines[0]


@pytest.mark.slow
def test_a_signal_ignored_at_start_stays_ignored(synthetic_root, tmp_path):
    """nohup (SIGHUP) and a shell's background job (SIGINT) start the run with the signal ignored:
    sending it must not stop training."""
    out, config = tmp_path / "run", tmp_path / "empty.yaml"
    config.write_text("")

    def ignore_hup_and_int():
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "retinanet", "train", str(config), *train_overrides(synthetic_root, out, 12)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=ignore_hup_and_int,
        )
        try:
            wait_for(out / "log.txt", "iter 2/12", process)
            process.send_signal(signal.SIGHUP)
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=120) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
        finally:
            if process.poll() is None:
                process.kill()
    assert (out / "checkpoints" / "model_final.pth").is_file()
    assert "received" not in (out / "log.txt").read_text()


@pytest.mark.slow
def test_ctrl_c_with_spawned_workers_stops_like_with_forked_ones(synthetic_root, tmp_path):
    """Ctrl-C reaches the whole process group: a spawned worker used to die of it, and the broken
    loader made the stop a failure (exit 2, FileNotFoundError). Now: the stop, exit 130, resumable."""
    out, config = tmp_path / "run", tmp_path / "empty.yaml"
    config.write_text("")
    args = [sys.executable, "-m", "retinanet", "train", str(config), *train_overrides(synthetic_root, out, 400),
            "data.num_workers=1", "data.start_method=spawn"]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                                   preexec_fn=default_stop_signals)
        try:
            wait_for(out / "log.txt", "iter 3/400", process)
            os.killpg(process.pid, signal.SIGINT)
            returncode = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    err = (tmp_path / "stderr.txt").read_text()
    assert returncode == 130, err[-3000:]
    assert "stopped by SIGINT at iteration" in err and "continue with --resume" in err
    assert "training failed" not in err
    stopped_at = int(err.split("stopped by SIGINT at iteration ")[1].split(",")[0])
    assert (out / "checkpoints" / f"model_{stopped_at:07d}.pth").is_file()

    # Resumable: continue to a few iterations past the stop (the max_iter change is applied).
    resumed = subprocess.run(
        [*args[:-2], "data.num_workers=0", f"solver.max_iter={stopped_at + 2}", "--resume"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'model_{stopped_at:07d}.pth'} at iteration {stopped_at}" in resumed.stderr


@pytest.mark.slow
def test_resume_changes_and_overwrite_notice_go_to_log_txt(synthetic_root, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, train_overrides(synthetic_root, out, max_iter=2) + ["solver.base_lr=0.001"])
    train(cfg)
    first_log = (out / "log.txt").read_text()

    # A refused start logs nothing into that run's log.txt.
    with pytest.raises(RunDirError):
        train(cfg)
    assert (out / "log.txt").read_text() == first_log

    changed = load_config(None, train_overrides(synthetic_root, out, max_iter=3) + ["solver.base_lr=0.002"])
    train(changed, resume=True)
    log = (out / "log.txt").read_text()
    assert "--resume: solver.base_lr changed from 0.001 to 0.002; applied from iteration 2" in log
    assert "--resume: solver.max_iter changed from 2 to 3; applied from iteration 2" in log

    train(cfg, overwrite=True)
    log = (out / "log.txt").read_text()
    assert f"--overwrite: deleted the previous run's checkpoints and metrics in {out}" in log
    assert "changed from" not in log  # the old run's log.txt was deleted


def test_overwrite_deletes_the_eval_folder_of_the_old_checkpoints(tmp_path):
    """`retinanet eval --checkpoint RUN/checkpoints/model_final.pth` writes to RUN/checkpoints/eval/
    by default: results of the old run's checkpoints, which --overwrite deletes with them."""
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "eval" / "analysis").mkdir(parents=True)
    for name in ("model_final.pth", "eval/coco_results.json", "eval/metrics.json", "eval/analysis/tide.json"):
        (checkpoints / name).write_text("x")
    (tmp_path / "notes.txt").write_text("mine")
    removed = remove_previous_run(tmp_path)
    assert checkpoints / "eval" in removed
    assert not (checkpoints / "eval").exists() and not (checkpoints / "model_final.pth").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"  # nothing else
