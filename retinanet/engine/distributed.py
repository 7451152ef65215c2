"""Process-group setup for torchrun (env:// rendezvous, so multi-node works the standard way)."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class MainProcessFailed(RuntimeError):
    """Raised on the other processes when a step that only the main process runs failed there."""


def init_distributed(device: str = "auto") -> torch.device:
    """Join the process group when launched by torchrun; return this process's device.

    NCCL on GPU, gloo on CPU. With a single process (no WORLD_SIZE, or 1) nothing is initialised.

    Raises:
        ValueError: train.device=cuda on a machine without a usable GPU (see check_device).
    """
    check_device(device, f"train.device={device}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if get_world_size_from_env() > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", init_method="env://", timeout=datetime.timedelta(minutes=30)
        )
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def check_device(device: str | None, named: str) -> None:
    """Refuse a device this machine cannot run on, before any work is done on it.

    Args:
        device: "cpu", "cuda", "cuda:N", another torch device name; None and "auto" pick one and
            always pass.
        named: how the user gave it, for the message ("train.device=cuda", "--device gpu").
    Raises:
        ValueError naming it: not a device name, a GPU asked for where CUDA has none (or fewer), or
        another device type this torch build or machine lacks.
    """
    if device is None or device == "auto":
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{named}: not a device; use cpu, cuda or cuda:N (GPU N)") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{named}: no CUDA GPU is usable on this machine (torch.cuda.is_available() is "
                             "False: no GPU, no driver or a CPU-only torch); use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{named}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif parsed.type != "cpu":
        try:
            torch.empty(0, device=parsed)
        except Exception as err:  # torch names the missing backend, over several lines
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{named}: this machine cannot run on it ({first_line}); use cpu or cuda") from None


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


def max_over_processes(values: list[float | torch.Tensor], device: torch.device) -> list[float]:
    """For each value (a number or a one-element tensor), its maximum over all processes (one small
    all-reduce; one host sync). Exact for integers below 2**24 (float32)."""
    # Python numbers are filled on the device: a host-to-device copy would be one more stream sync.
    stacked = torch.stack([
        v.to(device=device, dtype=torch.float32).reshape(()) if isinstance(v, torch.Tensor)
        else torch.full((), float(v), device=device)
        for v in values
    ])
    if is_distributed():
        dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
    return stacked.tolist()


def sum_over_processes(values: list[torch.Tensor], device: torch.device) -> list[float]:
    """For each one-element tensor, its sum over all processes, in float64 (one small all-reduce;
    one host sync). All processes must call this at the same point with the same number of values."""
    if not values:
        return []
    stacked = torch.stack([v.to(device=device, dtype=torch.float64).reshape(()) for v in values])
    if is_distributed():
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    return stacked.tolist()


def run_on_main(fn: Callable[[], T]) -> T | None:
    """Call `fn` on the main process only; every process learns whether it failed.

    All processes must call this at the same point (one broadcast).

    Returns:
        fn's result on the main process, None on the others.
    Raises:
        fn's own exception on the main process, MainProcessFailed (with its message) on the others,
        so that no process waits forever for one that has given up.
    """
    result, error = None, None
    if is_main_process():
        try:
            result = fn()
        except Exception as err:  # re-raised below, after the others have been told
            error = err
    if is_distributed():
        message = [f"{type(error).__name__}: {error}" if error is not None else None]
        dist.broadcast_object_list(message, src=0)
        if not is_main_process() and message[0] is not None:
            raise MainProcessFailed(f"rank 0 stopped the run: {message[0]}")
    if error is not None:
        raise error
    return result


def broadcast_object(obj: Any) -> Any:
    """The main process's `obj` (picklable), on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wait_for_all(timeout: datetime.timedelta) -> bool:
    """A barrier that gives up after `timeout`.

    Returns:
        True when every process arrived; False when the time ran out or the barrier failed (a
        process died), so a dead process cannot keep the others waiting forever.
    """
    if not is_distributed():
        return True
    work = dist.barrier(async_op=True)
    deadline = time.monotonic() + timeout.total_seconds()
    while not work.is_completed():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    try:
        work.wait()
    except RuntimeError:  # the barrier itself failed: a peer is gone
        return False
    return True


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
