import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_overrides
from retinanet import build_model, load_config


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
