import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_overrides, train_overrides
from retinanet import build_model, load_config
from retinanet.checkpoint import load_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_step_equals_one_process_on_the_same_total_batch(tmp_path):
    script = str(ROOT / "tests" / "ddp_step.py")
    subprocess.run([sys.executable, script, str(tmp_path / "single.pth")], check=True, timeout=300)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), script, str(tmp_path / "ddp.pth")],
        check=True, timeout=300,
    )
    single = torch.load(tmp_path / "single.pth", weights_only=True)["model"]
    ddp = torch.load(tmp_path / "ddp.pth", weights_only=True)["model"]
    assert single.keys() == ddp.keys()
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, atol=1e-6, rtol=1e-5, msg=key)

    # The step really moved the weights (a step that did nothing would also compare equal).
    torch.manual_seed(0)
    initial = build_model(load_config(None, tiny_overrides(3, 64) + ["model.backbone.norm=frozen_bn", "model.head.norm=gn"])).state_dict()
    changed = [k for k in single if single[k].is_floating_point() and not torch.equal(initial[k], single[k])]
    assert len(changed) > 20


@pytest.mark.slow
def test_rank0_saves_on_nan_before_torchrun_tears_the_processes_down(synthetic_root, tmp_path):
    """Rank 1 alone meets a NaN; rank 0's save is slow. Rank 1 must wait for that save: if it left
    first, torchrun would kill rank 0 mid-save, leaving no checkpoint and an orphan temp file."""
    out, config = tmp_path / "run", tmp_path / "empty.yaml"
    config.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
         "--monitor-interval", "0.2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
         str(ROOT / "tests" / "ddp_train_fault.py"), str(config), str(synthetic_root), str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0  # a NaN is a failure
    assert "non-finite loss at iteration 2" in result.stderr, result.stderr[-3000:]
    checkpoints = out / "checkpoints"
    saved_files = sorted(p.name for p in checkpoints.iterdir())
    assert saved_files == ["last_checkpoint", "model_0000001.pth"], result.stderr[-3000:]  # no orphan temp file
    saved = load_checkpoint(checkpoints / "model_0000001.pth")
    assert saved["iteration"] == 1
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert not (out / "run.lock").exists()  # rank 0 ended normally and released the folder

    # A new run into that folder: rank 0 refuses before training, and rank 1 is told instead of
    # waiting for it in a collective.
    again = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "retinanet", "train", str(config),
         *train_overrides(synthetic_root, out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert again.returncode != 0
    assert "already holds a training run" in again.stderr and "rank 0 stopped the run" in again.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last_checkpoint", "model_0000001.pth"]
