"""One training step, run alone or under torchrun; writes the weights after the step (rank 0).

Used by test_distributed.py: `torchrun --nproc-per-node 2 tests/ddp_step.py OUT` must give the same
weights as `python tests/ddp_step.py OUT` on the same total batch of 4 images.
"""

import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import tiny_overrides  # noqa: E402
from retinanet import load_config  # noqa: E402
from retinanet.engine import distributed as dist_utils  # noqa: E402
from retinanet.engine.trainer import build_state, train_step  # noqa: E402


def main(out_path: str) -> None:
    device = dist_utils.init_distributed("cpu")
    rank, world_size = dist_utils.get_rank(), dist_utils.get_world_size()
    cfg = load_config(None, tiny_overrides(num_classes=3, size=64) + [
        "model.backbone.norm=frozen_bn", "model.head.norm=gn", "solver.optimizer=sgd", "solver.base_lr=0.05",
        "solver.warmup_iters=0", "solver.ims_per_batch=4", "solver.reference_batch_size=4",
    ])
    torch.manual_seed(0)
    state = build_state(cfg, device, ["a", "b", "c"])
    model = DistributedDataParallel(state.model) if world_size > 1 else state.model
    model.train()

    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=generator) for _ in range(4)]
    targets = [
        {"boxes": torch.tensor([[4.0 + i, 6.0, 40.0, 50.0 - i]] * (i + 1)), "labels": torch.tensor([i % 3] * (i + 1))}
        for i in range(4)
    ]
    share = 4 // world_size
    mine = slice(rank * share, (rank + 1) * share)
    losses, _ = train_step(model, state, images[mine], targets[mine])
    if rank == 0:
        torch.save({"model": state.model.state_dict(), "loss_cls": losses["loss_cls"]}, out_path)
    dist_utils.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
