"""A tiny training run through the CLI under torchrun, in which rank 1 alone meets a NaN loss at
its FAULT_STEP-th step while rank 0's checkpoint writes take SAVE_DELAY_S longer.

Used by test_distributed.py. The step's all-reduce stops both ranks at that iteration and rank 0
saves the last good state. If rank 1 left without waiting for that save, torchrun would tear
rank 0 down in the middle of it (no checkpoint, an orphan temp file).

usage: torchrun --nproc-per-node 2 tests/ddp_train_fault.py CONFIG SYNTHETIC_ROOT OUTPUT_DIR
"""

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import train_overrides  # noqa: E402
from retinanet import cli  # noqa: E402
from retinanet.engine import trainer  # noqa: E402

FAULT_STEP = 2
SAVE_DELAY_S = 3.0  # longer than torchrun takes to notice a failed worker (--monitor-interval 0.2)


def inject_faults(rank: int) -> None:
    real_step, real_save = trainer.train_step, torch.save
    calls = {"n": 0}

    def step(model, state, images, targets, *args):
        calls["n"] += 1
        if rank == 1 and calls["n"] == FAULT_STEP:
            images = [image.float() * float("nan") for image in images]
        return real_step(model, state, images, targets, *args)

    def slow_save(checkpoint, file):  # inside save_atomic: its temp file exists meanwhile
        time.sleep(SAVE_DELAY_S)
        real_save(checkpoint, file)

    trainer.train_step = step
    torch.save = slow_save


def main(config: str, synthetic_root: str, output_dir: str) -> int:
    inject_faults(int(os.environ.get("RANK", 0)))
    return cli.main(["train", config, *train_overrides(synthetic_root, output_dir, max_iter=20)])


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
