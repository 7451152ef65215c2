"""The iteration-based training loop, with checkpointing, evaluation and logging as explicit steps."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import load_checkpoint, loss_normalizer, make_checkpoint, model_weights, save_atomic
from ..config import Config, dump_config
from ..data import build_datasets, build_train_loader, build_val_loader, head_class_names
from ..modeling import RetinaNetLoss, build_model
from . import distributed as dist_utils
from .solver import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
LAST_CHECKPOINT = "last_checkpoint"  # text file naming the newest complete checkpoint


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient became NaN/Inf; raised before the bad update reaches the weights."""


@dataclass
class TrainState:
    """Everything that changes during training and must be saved to resume exactly."""

    model: nn.Module  # unwrapped (no DDP; with train.compile its network is compiled in place)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    iteration: int = 0  # iterations completed
    class_names: list[str] = field(default_factory=list)
    # Buffers the forward pass itself updates (BatchNorm statistics, the loss normaliser).
    running_buffers: list[torch.Tensor] = field(init=False)

    def __post_init__(self):
        self.running_buffers = [
            buffer for module in self.model.modules()
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, RetinaNetLoss))
            for name, buffer in module.named_buffers(recurse=False)
            if name.startswith("running_") or name == "num_batches_tracked"
        ]


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# One step.


def train_step(
    model: nn.Module,
    state: TrainState,
    images: list[torch.Tensor],
    targets: list[dict],
    amp: str = "off",
    clip_grad_norm: float = 0.0,
    stop_requested: bool = False,
) -> tuple[dict[str, torch.Tensor], bool]:
    """Forward, backward and (if every loss is finite on every process) the optimizer step.

    The one host sync per iteration is the finiteness check after backward: it is what lets a
    NaN stop training before the update reaches the weights (GradScaler syncs at the same place).
    The same all-reduce tells every process whether any of them was asked to stop (a signal), so
    that all of them stop after the same iteration.

    Returns:
        the detached loss tensors of this step (on the device, not synced), and whether any
        process requested a stop.
    """
    device = next(state.model.parameters()).device
    # A NaN batch would also poison the BatchNorm statistics during forward: keep a copy to put back.
    buffers_before = [buffer.clone() for buffer in state.running_buffers]
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp != "off" else nullcontext()
    with autocast:
        losses = model(images, targets)
    total = sum(losses.values())
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(total).backward()
    not_finite = ~torch.isfinite(total.detach())
    if clip_grad_norm > 0:
        state.scaler.unscale_(state.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(
            [p for p in state.model.parameters() if p.grad is not None], clip_grad_norm
        )
        if amp != "fp16":  # under fp16 the scaler skips steps with inf gradients by itself
            not_finite = not_finite | ~torch.isfinite(grad_norm)
    not_finite_anywhere, stop_anywhere = dist_utils.any_true([not_finite, stop_requested], device)
    if not_finite_anywhere:
        for buffer, saved in zip(state.running_buffers, buffers_before):
            buffer.copy_(saved)
        raise NonFiniteLossError(
            f"non-finite loss at iteration {state.iteration + 1}: "
            + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            + "; the update was not applied. Lower solver.base_lr, raise solver.warmup_iters or set "
            "solver.clip_grad_norm, then resume with --resume."
        )
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    state.iteration += 1
    return {k: v.detach() for k, v in losses.items()}, stop_anywhere


# ----------------------------------------------------------------------------------------------
# Checkpoints.


def checkpoint_dict(state: TrainState, cfg: Config, sampler_position: int) -> dict:
    return make_checkpoint(
        state.model.state_dict(), cfg, state.class_names,
        optimizer=state.optimizer.state_dict(),
        scheduler=state.scheduler.state_dict(),
        scaler=state.scaler.state_dict(),
        iteration=state.iteration,
        sampler_position=sampler_position,
        rng=rng_state(),
        loss_normalizer=state.model.criterion.running_num_foreground.detach().cpu().clone(),
    )


def save_checkpoint(state: TrainState, cfg: Config, output_dir: Path, name: str | None = None) -> Path | None:
    """Write model_<iteration>.pth atomically, then point last_checkpoint at it; prune old ones.

    Only the main process writes. The previous checkpoint stays until the new one is complete.
    """
    if not dist_utils.is_main_process():
        return None
    checkpoints = output_dir / "checkpoints"
    path = checkpoints / (name or f"model_{state.iteration:07d}.pth")
    # With one process per rank holding the same sampler position, the batches consumed are the
    # iterations completed.
    save_atomic(checkpoint_dict(state, cfg, sampler_position=state.iteration), path)
    tmp = checkpoints / f".{LAST_CHECKPOINT}.tmp"
    tmp.write_text(path.name)
    tmp.replace(checkpoints / LAST_CHECKPOINT)
    periodic = sorted(checkpoints.glob("model_[0-9]*.pth"))
    keep = max(cfg.train.keep_checkpoints, 1)
    for old in periodic[:-keep]:
        if old != path:
            old.unlink(missing_ok=True)
    logger.info("saved checkpoint %s (iteration %d)", path, state.iteration)
    return path


def find_last_checkpoint(output_dir: Path) -> Path | None:
    """The newest loadable checkpoint: the one last_checkpoint names, else the newest model_*.pth."""
    checkpoints = output_dir / "checkpoints"
    candidates = []
    pointer = checkpoints / LAST_CHECKPOINT
    if pointer.is_file():
        candidates.append(checkpoints / pointer.read_text().strip())
    candidates += sorted(checkpoints.glob("model_*.pth"), key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in candidates:
        if candidate.is_file():
            try:
                load_checkpoint(candidate)
                return candidate
            except ValueError as err:
                logger.warning("skipping unreadable checkpoint %s: %s", candidate, err)
    return None


def restore(state: TrainState, checkpoint: dict) -> None:
    state.model.load_state_dict(model_weights(checkpoint))
    normalizer = loss_normalizer(checkpoint)
    if normalizer is not None:
        state.model.criterion.running_num_foreground.copy_(normalizer)
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.scheduler.load_state_dict(checkpoint["scheduler"])
    state.scaler.load_state_dict(checkpoint["scaler"])
    state.iteration = int(checkpoint["iteration"])
    set_rng_state(checkpoint["rng"])


# ----------------------------------------------------------------------------------------------
# Logging.


class MetricsLogger:
    """metrics.jsonl + TensorBoard scalars, main process only."""

    def __init__(self, output_dir: Path, enabled: bool):
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"))
            self.jsonl = open(output_dir / "metrics.jsonl", "a")

    def log(self, iteration: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, iteration)
        self.jsonl.write(json.dumps({"iteration": iteration, **scalars}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


class StopRequested:
    """Turns SIGTERM / SIGINT into a flag the loop checks between iterations."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        logger.warning("received signal %d: saving a checkpoint and stopping after this iteration", signum)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# ----------------------------------------------------------------------------------------------
# The run.


def build_state(cfg: Config, device: torch.device, class_names: list[str]) -> TrainState:
    model = build_model(cfg, class_names).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist_utils.is_distributed() and (cfg.train.sync_bn or cfg.model.backbone.norm == "sync_bn"):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(cfg.solver, model)
    scheduler = build_scheduler(cfg.solver, optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.solver.amp == "fp16")
    return TrainState(model, optimizer, scheduler, scaler, class_names=list(class_names))


def run_evaluation(model: nn.Module, val_dataset, cfg: Config, device: torch.device, output_dir: Path) -> dict:
    from .evaluator import evaluate

    loader = build_val_loader(
        val_dataset, batch_size=max(1, cfg.solver.ims_per_batch // dist_utils.get_world_size()),
        num_workers=min(cfg.data.num_workers, 2), rank=dist_utils.get_rank(), world_size=dist_utils.get_world_size(),
    )
    was_training = model.training
    metrics = evaluate(model, loader, val_dataset, device, output_dir=output_dir)
    model.train(was_training)
    return metrics


def train(cfg: Config, resume: bool = False) -> dict:
    """Train `cfg` to solver.max_iter; returns the final evaluation metrics (rank 0)."""
    device = dist_utils.init_distributed(cfg.train.device)
    rank, world_size = dist_utils.get_rank(), dist_utils.get_world_size()
    if cfg.solver.ims_per_batch % world_size:
        raise ValueError(f"solver.ims_per_batch={cfg.solver.ims_per_batch} is not divisible by {world_size} processes")
    output_dir = Path(cfg.train.output_dir)
    if dist_utils.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(dump_config(cfg))
    seed_everything(cfg.train.seed, rank)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for determinism
        torch.use_deterministic_algorithms(True, warn_only=True)

    # Synthetic data is generated once, by the main process, before the others read it.
    if dist_utils.is_main_process():
        train_dataset, val_dataset = build_datasets(cfg)
    dist_utils.barrier()
    if not dist_utils.is_main_process():
        train_dataset, val_dataset = build_datasets(cfg)

    state = build_state(cfg, device, head_class_names(train_dataset.class_names, cfg.model.num_classes))
    if resume:
        last = find_last_checkpoint(output_dir)
        if last is None:
            logger.warning("--resume: no checkpoint in %s, starting from scratch", output_dir / "checkpoints")
        else:
            restore(state, load_checkpoint(last))
            logger.info("resumed from %s at iteration %d", last, state.iteration)
    if cfg.train.compile:
        state.model.compile_network()
    model: nn.Module = state.model
    if dist_utils.is_distributed():
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()

    loader = build_train_loader(
        cfg.data, train_dataset, cfg.solver.ims_per_batch // world_size, cfg.train.seed,
        rank=rank, world_size=world_size, start_batch=state.iteration,
    )
    metrics_logger = MetricsLogger(output_dir, enabled=dist_utils.is_main_process())
    final_metrics: dict = {}
    try:
        with StopRequested() as stop:
            final_metrics = _loop(cfg, state, model, loader, val_dataset, device, output_dir, metrics_logger, stop)
    except NonFiniteLossError:
        save_checkpoint(state, cfg, output_dir)  # weights are still the last good ones
        raise
    except Exception:
        # Anything else (data error, OOM, a bug): keep what was trained. The exception may have
        # come mid-step, so the state saved is the last one at an iteration boundary.
        logger.exception("training failed at iteration %d; saving a checkpoint to resume from", state.iteration)
        save_checkpoint(state, cfg, output_dir)
        raise
    finally:
        metrics_logger.close()
    return final_metrics


def _loop(cfg, state, model, loader, val_dataset, device, output_dir, metrics_logger, stop) -> dict:
    from tqdm import tqdm

    max_iter = cfg.solver.max_iter
    progress = tqdm(total=max_iter, initial=state.iteration, disable=not dist_utils.is_main_process(),
                    dynamic_ncols=True, desc="train")
    loss_sums: dict[str, torch.Tensor] = {}
    window_start, data_time, steps_in_window = time.perf_counter(), 0.0, 0
    metrics: dict = {}
    batches = iter(loader)
    while state.iteration < max_iter:
        fetch_start = time.perf_counter()
        images, targets = next(batches)
        data_time += time.perf_counter() - fetch_start
        losses, stop_anywhere = train_step(
            model, state, images, targets, cfg.solver.amp, cfg.solver.clip_grad_norm, stop.requested
        )
        for key, value in losses.items():
            loss_sums[key] = loss_sums.get(key, 0.0) + value
        steps_in_window += 1
        progress.update(1)
        iteration = state.iteration
        last = iteration == max_iter

        if iteration % cfg.train.log_period == 0 or last:
            elapsed = time.perf_counter() - window_start
            scalars = {k: float(v) / steps_in_window for k, v in loss_sums.items()}  # one sync per period
            scalars["loss"] = sum(scalars.values())
            scalars.update(lr=state.optimizer.param_groups[0]["lr"], time_per_iter=elapsed / steps_in_window,
                           data_time=data_time / steps_in_window)
            progress.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}")
            metrics_logger.log(iteration, scalars)
            loss_sums, window_start, data_time, steps_in_window = {}, time.perf_counter(), 0.0, 0
        if iteration % cfg.train.checkpoint_period == 0 and not last:
            save_checkpoint(state, cfg, output_dir)
        if (cfg.train.eval_period > 0 and iteration % cfg.train.eval_period == 0) or last:
            metrics = run_evaluation(state.model, val_dataset, cfg, device, output_dir)
            if metrics:
                metrics_logger.log(iteration, {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)})
        if stop_anywhere:
            save_checkpoint(state, cfg, output_dir)
            logger.warning("stopped at iteration %d; continue with --resume", iteration)
            progress.close()
            return metrics
    save_checkpoint(state, cfg, output_dir, name="model_final.pth")
    progress.close()
    return metrics
