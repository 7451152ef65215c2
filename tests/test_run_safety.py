"""Never lose a run, never overwrite a user's file, never silently change what resume means.

The output folder's lock, the refusal to start over a run, unreadable checkpoints, folder and disk
checks before the first iteration, orphan temp files, a full disk during a save, what --resume does
with a changed config value, and SIGHUP through the CLI. (The DDP save-before-exit test is in
test_distributed.py.)
"""

import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, default_stop_signals, train_overrides
from retinanet import load_config
from retinanet.checkpoint import load_checkpoint, save_atomic
from retinanet.config import ALL_KEYS, get_key
from retinanet.engine import run_dir
from retinanet.engine.run_dir import RunDirError, acquire_run_lock
from retinanet.engine.solver import lr_factor, scaled_lr
from retinanet.engine.trainer import (APPLY, IGNORE, REFUSE, ResumeConfigError, build_state, checkpoint_to_resume,
                                      prepare_output_dir, resume_policy, save_checkpoint, train)


def run_cfg(synthetic_root, out, *extra, max_iter=2):
    return load_config(None, train_overrides(synthetic_root, out, max_iter=max_iter) + list(extra))


def fake_run(cfg, iteration: int) -> Path:
    """The folder a run of `cfg` leaves after a checkpoint at `iteration`, made without training."""
    torch.manual_seed(0)
    state = build_state(cfg, torch.device("cpu"), ["a", "b", "c"])
    state.iteration = iteration
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text("the first run's config\n")
    return save_checkpoint(state, cfg, out)


def snapshot(folder: Path) -> dict:
    """{relative path: (size, mtime_ns)} of every file under `folder`."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


# ----------------------------------------------------------------------------------------------
# The lock.


def test_a_second_run_into_a_locked_folder_is_refused_and_a_dead_runs_lock_is_taken_over(
        synthetic_root, tmp_path, caplog):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from retinanet.engine.run_dir import acquire_run_lock
        acquire_run_lock(Path({str(out)!r}))
        print("locked", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError) as refused:
            train(run_cfg(synthetic_root, out))
        message = str(refused.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message and "started 20" in message
        assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # nothing written
    finally:
        holder.kill()  # SIGKILL: the lock stays behind, stale
        holder.wait()
    caplog.set_level(logging.WARNING)
    lock = acquire_run_lock(out)
    assert f"taking over the lock of run pid {holder.pid}" in caplog.text
    assert json.loads((out / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (out / "run.lock").exists()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere-42", "started": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(RunDirError, match=r"pid 1 on host elsewhere-42.*delete .*run\.lock"):
        acquire_run_lock(tmp_path)


# ----------------------------------------------------------------------------------------------
# A folder that holds a run.


def test_a_new_run_over_checkpoints_is_refused_without_resume_or_overwrite(synthetic_root, tmp_path):
    cfg = run_cfg(synthetic_root, tmp_path / "run")
    fake_run(cfg, iteration=4)
    before = snapshot(tmp_path / "run")
    with pytest.raises(RunDirError, match=r"already holds a training run .*model_0000004\.pth.*--resume.*--overwrite"):
        train(cfg)
    assert snapshot(tmp_path / "run") == before
    assert not (tmp_path / "run" / "run.lock").exists()  # released


def test_overwrite_deletes_the_old_runs_outputs_and_nothing_else(synthetic_root, tmp_path, caplog):
    """(train --overwrite through the CLI, to the first iterations: test_sighup_...)"""
    out = tmp_path / "run"
    cfg = run_cfg(synthetic_root, out)
    fake_run(cfg, iteration=4)
    for name in ("metrics.jsonl", "metrics.json", "coco_results.json", "tensorboard/events.out.tfevents.1.host",
                 "notes.txt", "tensorboard/notes.txt"):
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text("earlier")
    caplog.set_level(logging.WARNING)
    assert prepare_output_dir(out, cfg, resume=False, overwrite=True) == (None, None)  # from scratch
    assert "--overwrite: deleted the previous run's checkpoints and metrics" in caplog.text
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "config.yaml", "notes.txt", "tensorboard/notes.txt"]  # the user's own files stay


def test_temp_files_of_interrupted_saves_are_removed_at_start(synthetic_root, tmp_path):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True)
    orphans = [checkpoints / ".model_0000004.pth.k2j3x.tmp", checkpoints / ".model_final.pth.a1b2.tmp",
               checkpoints / ".last_checkpoint.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"torn")
    keep = checkpoints / "notes.txt"
    keep.write_text("mine")
    prepare_output_dir(out, run_cfg(synthetic_root, out), resume=False, overwrite=False)
    assert not any(orphan.exists() for orphan in orphans) and keep.read_text() == "mine"


# ----------------------------------------------------------------------------------------------
# --resume with checkpoints it cannot read.


def test_resume_stops_on_a_checkpoint_it_cannot_open_instead_of_an_older_one_or_scratch(synthetic_root, tmp_path):
    cfg = run_cfg(synthetic_root, tmp_path / "run")
    fake_run(cfg, iteration=2)
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "model_0000004.pth").mkdir()  # newer, and cannot be opened as a file
    (checkpoints / "last_checkpoint").write_text("model_0000004.pth")
    before = snapshot(tmp_path / "run")
    with pytest.raises(RunDirError, match=r"cannot open .*model_0000004\.pth \(Is a directory\)"):
        train(cfg, resume=True)
    assert snapshot(tmp_path / "run") == before  # config.yaml and checkpoints untouched


def test_resume_stops_when_no_checkpoint_is_usable(synthetic_root, tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "model_0000004.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RunDirError, match=r"no usable checkpoint: .*model_0000004\.pth"):
        train(run_cfg(synthetic_root, tmp_path / "run"), resume=True)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_resume_names_a_checkpoint_without_read_permission(synthetic_root):
    """As in the fault campaign: chmod 000. Root reads anything, so as root the check runs in a
    child that drops to nobody after its imports."""
    folder = Path(tempfile.mkdtemp(prefix="perm-"))
    try:
        folder.chmod(0o755)
        cfg = run_cfg(synthetic_root, folder / "run")
        path = fake_run(cfg, iteration=2)
        for parent in (folder / "run", path.parent):
            parent.chmod(0o755)
        path.chmod(0o000)
        script = textwrap.dedent(f"""
            import os, sys
            sys.path.insert(0, {str(ROOT)!r})
            from pathlib import Path
            from retinanet.engine.trainer import checkpoint_to_resume
            if os.getuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            try:
                checkpoint_to_resume(Path({str(folder / "run")!r}))
            except Exception as err:
                print(type(err).__name__, err)
        """)
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert "RunDirError --resume: cannot open" in result.stdout, result.stdout + result.stderr
        assert "model_0000002.pth (Permission denied)" in result.stdout
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Folders and disk checked before the first iteration; a full disk during a save.


def test_an_unwritable_checkpoints_folder_is_found_before_anything_is_written(synthetic_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("a file where the folder should be")
    with pytest.raises(RunDirError, match=r"run/checkpoints: the run cannot write there \(a file stands where"):
        train(run_cfg(synthetic_root, out))
    assert not (out / "config.yaml").exists() and not (out / "metrics.jsonl").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_found_before_anything_is_written(synthetic_root, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints").chmod(0o555)
    try:
        with pytest.raises(RunDirError, match=r"checkpoints: the run cannot write there \(Permission denied\)"):
            train(run_cfg(synthetic_root, out))
    finally:
        (out / "checkpoints").chmod(0o755)


def test_a_disk_too_small_for_the_checkpoints_is_refused_before_the_first_iteration(
        synthetic_root, tmp_path, monkeypatch):
    real_usage = shutil.disk_usage
    monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda path: real_usage(path)._replace(free=50 * 2**20))
    out = tmp_path / "run"
    with pytest.raises(RunDirError, match=r"checkpoints: 50 MiB free on its disk, but this run needs about \d+ MiB"):
        train(run_cfg(synthetic_root, out))
    assert not (out / "metrics.jsonl").exists()


def test_a_full_disk_during_a_save_names_the_folder_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "model.pth"
    save_atomic({"model": {"w": torch.zeros(10)}, "config": {}}, path)
    real_save = torch.save

    def save_to_full_device(obj, f):
        with open("/dev/full", "wb") as full:  # every write: ENOSPC, as on a full disk
            real_save(obj, full)

    monkeypatch.setattr(torch, "save", save_to_full_device)
    with pytest.raises(OSError) as full:
        save_atomic({"model": {"w": torch.ones(100_000)}, "config": {}}, path)
    assert full.value.errno == errno.ENOSPC
    assert f"{path.parent}: no space left on the device" in str(full.value) and "unexpected pos" not in str(full.value)

    def torch_write_failure(obj, f):  # what torch raises when it sees the short write itself
        f.write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    real_usage = shutil.disk_usage
    monkeypatch.setattr(torch, "save", torch_write_failure)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=1000))
    with pytest.raises(OSError, match="no space left on the device") as full:
        save_atomic({"model": {"w": torch.ones(100_000)}, "config": {}}, path)
    assert full.value.errno == errno.ENOSPC
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(10))
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pth"]  # no temp file left


# ----------------------------------------------------------------------------------------------
# What --resume does with a changed config value.


def test_every_config_key_has_a_resume_policy():
    leaves = [key for key in ALL_KEYS if not hasattr(get_key(load_config(None), key), "__dataclass_fields__")]
    assert {resume_policy(key) for key in leaves} <= {APPLY, REFUSE, IGNORE}
    applied = ["solver.base_lr", "solver.steps", "solver.gamma", "solver.warmup_iters", "solver.warmup_factor",
               "solver.scheduler", "solver.max_iter", "solver.clip_grad_norm", "train.checkpoint_period",
               "train.log_period", "train.eval_period", "train.keep_checkpoints", "data.num_workers",
               "model.inference.score_thresh", "data.val.ann_file"]
    refused = ["model.num_classes", "model.backbone.depth", "model.anchors.sizes", "model.loss.focal_gamma",
               "solver.optimizer", "solver.ims_per_batch", "solver.weight_decay", "solver.weight_decay_norm",
               "data.train.ann_file", "data.hflip_prob", "train.seed"]
    assert [resume_policy(k) for k in applied] == [APPLY] * len(applied)
    assert [resume_policy(k) for k in refused] == [REFUSE] * len(refused)
    assert resume_policy("train.output_dir") == IGNORE


def test_resume_refuses_another_model_optimizer_or_batch_and_leaves_the_run_untouched(synthetic_root, tmp_path):
    cfg = run_cfg(synthetic_root, tmp_path / "run")
    fake_run(cfg, iteration=2)
    before = snapshot(tmp_path / "run")
    changed = run_cfg(synthetic_root, tmp_path / "run", "model.num_classes=5", "model.backbone.depth=34",
                      "solver.optimizer=sgd", "solver.ims_per_batch=8", "solver.base_lr=0.002")
    with pytest.raises(ResumeConfigError) as refused:
        train(changed, resume=True)
    message = str(refused.value)
    for line in ("model.num_classes: 3 -> 5", "model.backbone.depth: 18 -> 34", "solver.optimizer: 'adamw' -> 'sgd'",
                 "solver.ims_per_batch: 4 -> 8", "--overwrite"):
        assert line in message
    assert "base_lr" not in message  # applied, not refused
    with pytest.raises(ResumeConfigError, match=r"iteration 2, past solver.max_iter=1: set solver.max_iter >= 2"):
        train(run_cfg(synthetic_root, tmp_path / "run", "solver.max_iter=1", "solver.steps=[1]"), resume=True)
    assert snapshot(tmp_path / "run") == before  # config.yaml written only after the checks


@pytest.mark.slow
def test_resume_with_a_new_lr_schedule_uses_it_from_the_saved_iteration(synthetic_root, tmp_path, caplog):
    out = tmp_path / "run"
    first = run_cfg(synthetic_root, out, "solver.warmup_iters=2", "solver.steps=[3]", max_iter=3)
    fake_run(first, iteration=2)
    resumed = run_cfg(synthetic_root, out, "solver.base_lr=0.0004", "solver.warmup_iters=4", "solver.steps=[3]",
                      max_iter=3)
    caplog.set_level(logging.WARNING)
    train(resumed, resume=True)
    assert "solver.base_lr changed from 0.001 to 0.0004; applied from iteration 2" in caplog.text

    # The LR with which an uninterrupted run with the new values trains iteration 3 (after 2 scheduler
    # steps): the schedule alone decides it.
    uninterrupted = build_state(resumed, torch.device("cpu"), ["a", "b", "c"])
    for _ in range(2):
        uninterrupted.optimizer.step()
        uninterrupted.scheduler.step()
    expected = uninterrupted.optimizer.param_groups[0]["lr"]
    assert expected != pytest.approx(scaled_lr(first.solver) * lr_factor(2, first.solver))  # the old schedule's
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["lr"] for row in logged if "lr" in row] == [expected]
    final = load_checkpoint(out / "checkpoints" / "model_final.pth")
    assert final["config"]["solver"]["base_lr"] == 0.0004 and "base_lr: 0.0004" in (out / "config.yaml").read_text()
    assert final["config_changes"] == [{"iteration": 2, "changes": {"solver.base_lr": [0.001, 0.0004],
                                                                    "solver.warmup_iters": [2, 4]}}]


# ----------------------------------------------------------------------------------------------
# Signals through the command line.


@pytest.mark.slow
def test_sighup_saves_a_checkpoint_and_exits_with_129(synthetic_root, tmp_path):
    """`retinanet train --overwrite` over an earlier run, then the SIGHUP of a closed SSH session."""
    out = tmp_path / "run"
    fake_run(run_cfg(synthetic_root, out, max_iter=50), iteration=40)
    config = tmp_path / "empty.yaml"
    config.write_text("")
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "retinanet", "train", str(config), "--overwrite"]
            + train_overrides(synthetic_root, out, max_iter=50),
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr_file, preexec_fn=default_stop_signals,
        )
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").exists():  # created once the signal handlers are in place
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGHUP)  # a closed SSH session
    proc.wait(timeout=240)
    stderr = log.read_text()
    assert proc.returncode == 128 + signal.SIGHUP, stderr[-3000:]
    assert "stopped by SIGHUP at iteration" in stderr and "--overwrite: deleted the previous run's" in stderr
    checkpoint = load_checkpoint(checkpoint_to_resume(out)[0])
    assert 1 <= checkpoint["iteration"] <= 2  # stops after the iteration the signal came in, or the next
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "last_checkpoint", f"model_{checkpoint['iteration']:07d}.pth"]  # the earlier run's model_0000040 is gone
    assert not (out / "run.lock").exists()
