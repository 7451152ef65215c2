"""Process-group setup for torchrun (env:// rendezvous, so multi-node works the standard way)."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init_distributed(device: str = "auto") -> torch.device:
    """Join the process group when launched by torchrun; return this process's device.

    NCCL on GPU, gloo on CPU. With a single process (no WORLD_SIZE, or 1) nothing is initialised.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if get_world_size_from_env() > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", init_method="env://", timeout=datetime.timedelta(minutes=30)
        )
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def get_world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def any_true(flags: list[bool | torch.Tensor], device: torch.device) -> list[bool]:
    """For each flag, whether it is true on any process (one small all-reduce; one host sync)."""
    # Python flags are filled on the device: a host-to-device copy would be one more stream sync.
    values = torch.stack([
        f.to(device=device, dtype=torch.float32).reshape(()) if isinstance(f, torch.Tensor)
        else torch.full((), float(f), device=device)
        for f in flags
    ])
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
