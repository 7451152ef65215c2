"""The iteration-based training loop, with checkpointing, evaluation and logging as explicit steps."""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import random
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..checkpoint import (CheckpointError, config_of, load_checkpoint, loss_normalizer, make_checkpoint,
                          model_weights, save_atomic)
from ..config import Config, ConfigError, dump_config, flatten, schedule_warnings, to_dict
from ..data import build_datasets, build_train_loader, build_val_loader, head_class_names
from ..modeling import RetinaNetLoss, build_model
from . import distributed as dist_utils
from .error_analysis import PRCounts, evaluation_pictures, match_detections, pr_curve_counts, safe_file_name
from .evaluator import RESULTS_FILE, evaluate
from .run_dir import (CHECKPOINT_GLOB, CHECKPOINTS_DIR, CONFIG_FILE, LAST_CHECKPOINT, LOG_FILE, TENSORBOARD_DIR,
                      RunDirError, acquire_run_lock, check_free_space, check_new_run_allowed, check_writable,
                      estimate_checkpoint_bytes, remove_orphan_temp_files, remove_previous_run)
from .solver import build_optimizer, build_scheduler, lr_factor, scaled_lr

logger = logging.getLogger(__name__)

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Signals that stop a run cleanly (checkpoint, then TrainingStopped): a scheduler's or torchrun's
# SIGTERM, Ctrl-C, and the SIGHUP of a closed SSH session.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# How long the other processes wait for rank 0's last checkpoint before they exit anyway (rank 0
# may be dead). They must not exit first: torchrun tears every process down as soon as one exits
# with an error, which would kill rank 0 mid-save. 10 min covers ~1 GB to a slow network disk.
SAVE_WAIT_TIMEOUT = datetime.timedelta(minutes=10)

# What --resume does with a config value that differs from the checkpoint's; the longest matching
# prefix decides. APPLY: the run goes on with the new value from the checkpoint's iteration (logged;
# recorded in config.yaml and the next checkpoints); the LR schedule is rebuilt from the new solver
# values, so lr(i) is what an uninterrupted run with them has at i. REFUSE: the value would make it
# another run (another model, objective, optimizer state or data stream): the resume stops before
# writing anything and lists every such key. IGNORE: no effect on a resumed run.
APPLY, REFUSE, IGNORE = "apply", "refuse", "ignore"
RESUME_KEYS = {
    "model": REFUSE,  # architecture, anchors, matching, loss, input sizes
    "model.backbone.weights": IGNORE,  # the initial weights: the checkpoint's replace them
    "model.inference": APPLY,  # evaluation only
    "data": REFUSE,  # which images are trained on, in which order, with which augmentation
    "data.val": APPLY,  # evaluation only
    "data.num_workers": APPLY,
    "data.start_method": APPLY,  # how workers start; the samples do not depend on it
    "data.check_images": APPLY,
    "data.on_bad_image": APPLY,
    "solver": APPLY,  # base_lr, reference_batch_size, scheduler, steps, gamma, warmup_*, max_iter,
    # momentum, betas, clip_grad_norm, amp (the fp16 loss scale restarts when amp was off)
    "solver.optimizer": REFUSE,  # the saved state is another optimizer's
    "solver.ims_per_batch": REFUSE,  # the stream resumes at batch <iteration> counted in the old size
    # The parameter groups are split by weight decay: other values may regroup the parameters, and
    # the saved optimizer state would no longer match them.
    "solver.weight_decay": REFUSE,
    "solver.weight_decay_norm": REFUSE,
    "solver.weight_decay_bias": REFUSE,
    "train": APPLY,  # periods, keep_checkpoints, device, channels_last, compile, sync_bn, deterministic, tb_images
    "train.seed": REFUSE,  # data order and augmentation
    "train.output_dir": IGNORE,  # where the run is now, wherever it was started
}


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient became NaN/Inf; raised before the bad update reaches the weights."""


class TrainingStopped(Exception):
    """A signal stopped training; a checkpoint of the last completed iteration was saved first."""

    def __init__(self, signum: int, iteration: int):
        self.signum, self.iteration = signum, iteration
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at iteration {iteration}, after saving a checkpoint; "
            "continue with --resume"
        )

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number (SIGTERM: 143)."""
        return 128 + self.signum


class ResumeConfigError(ConfigError):
    """--resume with config values that would make the run another run (see RESUME_KEYS)."""


@dataclass
class TrainState:
    """Everything that changes during training and must be saved to resume exactly."""

    model: nn.Module  # unwrapped (no DDP; with train.compile its network is compiled in place)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    iteration: int = 0  # iterations completed
    class_names: list[str] = field(default_factory=list)
    # Config values changed on resume: [{"iteration": i, "changes": {key: [old, new]}}, ...].
    config_changes: list[dict] = field(default_factory=list)
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
    stop_signal: int = 0,
) -> tuple[dict[str, torch.Tensor], int]:
    """Forward, backward and (if every loss is finite on every process) the optimizer step.

    The one host sync per iteration is the finiteness check after backward: it is what lets a
    NaN stop training before the update reaches the weights (GradScaler syncs at the same place).
    The same all-reduce tells every process whether any of them was asked to stop (a signal), so
    that all of them stop after the same iteration.

    Args:
        stop_signal: the signal number this process received (0: none).
    Returns:
        the detached loss tensors of this step (on the device, not synced), and the largest signal
        number any process received (0: none).
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
    not_finite_anywhere, stop_anywhere = dist_utils.max_over_processes([not_finite, stop_signal], device)
    if not_finite_anywhere:
        for buffer, saved in zip(state.running_buffers, buffers_before):
            buffer.copy_(saved)
        raise NonFiniteLossError(
            f"non-finite loss at iteration {state.iteration + 1}: "
            + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            + "; the update was not applied and the last good state is saved. Resume with a lower "
            "solver.base_lr, a longer solver.warmup_iters or solver.clip_grad_norm set, e.g. `retinanet train "
            "CONFIG --resume solver.base_lr=...`: a resume applies new LR-schedule values from the saved iteration."
        )
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    state.iteration += 1
    return {k: v.detach() for k, v in losses.items()}, int(stop_anywhere)


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
        config_changes=state.config_changes,
    )


def save_checkpoint(state: TrainState, cfg: Config, output_dir: Path, name: str | None = None) -> Path | None:
    """Write model_<iteration>.pth atomically, then point last_checkpoint at it; prune old ones.

    Only the main process writes. The previous checkpoint stays until the new one is complete.
    """
    if not dist_utils.is_main_process():
        return None
    checkpoints = output_dir / CHECKPOINTS_DIR
    path = checkpoints / (name or f"model_{state.iteration:07d}.pth")
    # With one process per rank holding the same sampler position, the batches consumed are the
    # iterations completed.
    save_atomic(checkpoint_dict(state, cfg, sampler_position=state.iteration), path)
    tmp = checkpoints / f".{LAST_CHECKPOINT}.tmp"
    tmp.write_text(path.name)
    tmp.replace(checkpoints / LAST_CHECKPOINT)
    periodic = sorted(checkpoints.glob("model_[0-9]*.pth"))  # not model_final.pth
    keep = max(cfg.train.keep_checkpoints, 1)
    for old in periodic[:-keep]:
        if old != path:
            old.unlink(missing_ok=True)
    logger.info("saved checkpoint %s (iteration %d)", path, state.iteration)
    return path


def _resume_candidates(output_dir: Path) -> list[Path]:
    """Checkpoint paths, newest first: the one last_checkpoint names, then model_*.pth by time."""
    checkpoints = output_dir / CHECKPOINTS_DIR
    candidates = []
    pointer = checkpoints / LAST_CHECKPOINT
    try:
        name = pointer.read_text().strip() if pointer.is_file() else ""
    except OSError as err:
        logger.warning("--resume: cannot read %s (%s); taking the newest checkpoint by time", pointer, err.strerror)
        name = ""
    if name:
        candidates.append(checkpoints / name)
    by_time = sorted(checkpoints.glob(CHECKPOINT_GLOB), key=lambda p: p.lstat().st_mtime, reverse=True)
    candidates += [path for path in by_time if path not in candidates]
    return [path for path in candidates if path.exists() or path.is_symlink()]


def checkpoint_to_resume(output_dir: Path) -> tuple[Path, dict] | None:
    """The checkpoint --resume continues from, loaded: the one last_checkpoint names, else the
    newest model_*.pth. None when the folder holds no checkpoint at all.

    A file that opens but is not a checkpoint (damaged) is skipped, with a warning, for an older one.

    Raises:
        RunDirError: a checkpoint newer than any usable one cannot be opened (Permission denied, a
            folder in its place, ...), or none is usable; names each with its reason. Resuming from
            an older checkpoint would drop the newer one's iterations and later prune it; starting
            from scratch would overwrite them all.
    """
    candidates = _resume_candidates(output_dir)
    unopenable, damaged = [], []
    for path in candidates:
        try:
            with open(path, "rb"):
                pass
        except OSError as err:
            unopenable.append(f"{path} ({err.strerror or err})")
            continue
        try:
            checkpoint = load_checkpoint(path)
        except CheckpointError as err:
            logger.warning("--resume: skipping %s", err)
            damaged.append(str(err))
            continue
        if not unopenable:
            return path, checkpoint
        break
    if not candidates:
        return None
    if unopenable:
        raise RunDirError(
            f"--resume: cannot open {', '.join(unopenable)}; fix this (e.g. the file permissions) and resume "
            "again, move the file away to resume from an older checkpoint, or start again with --overwrite"
        )
    raise RunDirError(
        f"--resume: {output_dir / CHECKPOINTS_DIR} holds no usable checkpoint: {'; '.join(damaged)}; move them "
        "away or start again with --overwrite"
    )


def find_last_checkpoint(output_dir: Path) -> Path | None:
    """The path of the checkpoint --resume would continue from (see checkpoint_to_resume), or None."""
    found = checkpoint_to_resume(output_dir)
    return found[0] if found is not None else None


def restore(state: TrainState, checkpoint: dict, solver_cfg) -> None:
    """Load the training state of `checkpoint` into `state`, built from the run's config.

    Weights, optimizer state (momentum, Adam moments), loss normaliser, loss scale, iteration and
    RNG come from the checkpoint. The optimizer's hyperparameters and the LR schedule come from
    `solver_cfg` (cfg.solver), which may differ from the checkpoint's where RESUME_KEYS allows:
    the schedule is rebuilt at the checkpoint's iteration (see scheduler_at).
    """
    state.model.load_state_dict(model_weights(checkpoint))
    normalizer = loss_normalizer(checkpoint)
    if normalizer is not None:
        state.model.criterion.running_num_foreground.copy_(normalizer)
    configured = [{k: v for k, v in group.items() if k != "params"} for group in state.optimizer.param_groups]
    state.optimizer.load_state_dict(checkpoint["optimizer"])  # this also loads the saved lr, betas, ...
    for group, hyperparameters in zip(state.optimizer.param_groups, configured):
        group.update(hyperparameters)
    state.iteration = int(checkpoint["iteration"])
    state.scheduler = scheduler_at(state.optimizer, solver_cfg, state.iteration)
    if checkpoint["scaler"]:  # empty when saved with amp off: an fp16 resume starts a new loss scale
        state.scaler.load_state_dict(checkpoint["scaler"])
    state.config_changes = list(checkpoint.get("config_changes", []))
    set_rng_state(checkpoint["rng"])


def scheduler_at(optimizer: torch.optim.Optimizer, solver_cfg, iteration: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule of `solver_cfg` (build_scheduler's) positioned after `iteration` steps: each
    group's lr becomes scaled_lr * lr_factor(iteration), as in a run that had it from the start."""
    for group in optimizer.param_groups:
        group["initial_lr"] = scaled_lr(solver_cfg)
    # The constructor takes one step from last_epoch, which lands on `iteration`.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, solver_cfg), last_epoch=iteration - 1
    )


# ----------------------------------------------------------------------------------------------
# What a resume may change.


def config_differences(saved: Config, cfg: Config) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, new value) for every config value that differs, in schema order."""
    old, new = flatten(to_dict(saved)), flatten(to_dict(cfg))
    return [(key, old.get(key), value) for key, value in new.items() if old.get(key) != value]


def resume_policy(key: str) -> str:
    """APPLY, REFUSE or IGNORE: what --resume does with a changed value of `key` (RESUME_KEYS)."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        policy = RESUME_KEYS.get(".".join(parts[:end]))
        if policy is not None:
            return policy
    return REFUSE


def check_resume_config(saved: Config, cfg: Config, iteration: int, checkpoint: Path) -> dict[str, list]:
    """Check the run's config against the one saved in the checkpoint it resumes from.

    Returns:
        the changes to apply, {dotted key: [saved value, new value]} (each logged here).
    Raises:
        ResumeConfigError: listing every value RESUME_KEYS refuses to change (saved -> new) and
            what to do instead; or solver.max_iter is below the checkpoint's iteration.
    """
    differences = config_differences(saved, cfg)
    refused = [f"{key}: {old!r} -> {new!r}" for key, old, new in differences if resume_policy(key) == REFUSE]
    if refused:
        raise ResumeConfigError(
            f"{checkpoint}: --resume continues this run (iteration {iteration}) with the config it was started "
            f"with, and these values differ from it: {'; '.join(refused)}. They would make it another run (another "
            "model, optimizer or data stream): drop them to resume, or train with them from scratch with "
            "--overwrite (deletes this run's checkpoints) or another --output-dir"
        )
    if cfg.solver.max_iter < iteration:
        raise ResumeConfigError(
            f"{checkpoint}: the checkpoint is at iteration {iteration}, past solver.max_iter={cfg.solver.max_iter}: "
            f"set solver.max_iter >= {iteration} to resume, or evaluate it with `retinanet eval --checkpoint "
            f"{checkpoint}`"
        )
    applied = {key: [old, new] for key, old, new in differences if resume_policy(key) == APPLY}
    for key, (old, new) in applied.items():
        logger.warning("--resume: %s changed from %r to %r; applied from iteration %d", key, old, new, iteration)
    return applied


# ----------------------------------------------------------------------------------------------
# Logging.


class MetricsLogger:
    """metrics.jsonl + TensorBoard scalars, and TensorBoard pictures of the evaluations; main process only."""

    def __init__(self, output_dir: Path, enabled: bool):
        self.enabled = enabled
        self.writer = None
        if enabled:
            # Imported here, not at the top: ~1 s (tensorboard, protobuf) that `retinanet infer` and
            # `eval`, which import this module through the CLI, should not pay.
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

    def log_images(self, iteration: int, images: dict[str, torch.Tensor]) -> None:
        """TensorBoard images by tag, each uint8 (3, H, W) RGB."""
        if not self.enabled:
            return
        for tag, image in images.items():
            self.writer.add_image(tag, image, iteration, dataformats="CHW")

    def log_pr_curves(self, iteration: int, curves: dict[str, PRCounts]) -> None:
        """TensorBoard PR curves by tag (see error_analysis.pr_curve_counts)."""
        if not self.enabled:
            return
        for tag, curve in curves.items():
            self.writer.add_pr_curve_raw(
                tag, curve.true_positives, curve.false_positives, curve.true_negatives, curve.false_negatives,
                curve.precision, curve.recall, iteration, num_thresholds=len(curve.precision),
            )
        self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


class StopRequested:
    """Turns STOP_SIGNALS into a number the loop checks between iterations (0: none received).

    The handlers stay installed until the run ends, emergency saves included: a second signal
    (torchrun's SIGTERM after another process failed) cannot kill a save in progress. A signal
    ignored when the run starts (nohup's SIGHUP, a background job's SIGINT) stays ignored.
    """

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) is signal.SIG_IGN:  # ignored on purpose (nohup, a background job)
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        logger.warning("received %s: saving a checkpoint and stopping after this iteration", name)
        self.signum = self.signum or signum

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


def run_evaluation(
    model: nn.Module, val_dataset, cfg: Config, device: torch.device, output_dir: Path,
    metrics_logger: MetricsLogger | None = None, iteration: int = 0,
) -> dict:
    """COCO evaluation on every process; with `metrics_logger` (main process), also its TensorBoard
    pictures at `iteration`: each class's PR curve at IoU 0.5 ("pr_curve/<class>") and the first
    cfg.train.tb_images val images with ground truth and detections ("val_images/<image id>")."""
    loader = build_val_loader(
        val_dataset, batch_size=max(1, cfg.solver.ims_per_batch // dist_utils.get_world_size()),
        num_workers=min(cfg.data.num_workers, 2), rank=dist_utils.get_rank(), world_size=dist_utils.get_world_size(),
        start_method=cfg.data.start_method,
    )
    was_training = model.training
    metrics = evaluate(model, loader, val_dataset, device, output_dir=output_dir)
    model.train(was_training)
    if metrics_logger is not None and metrics_logger.enabled:
        # From the detections evaluate() has just written: the pictures show what was scored.
        results = json.loads((output_dir / RESULTS_FILE).read_text())
        image_ids = [int(image_id) for image_id in val_dataset.image_ids]
        matching = match_detections(val_dataset.coco, results, image_ids)
        curves = pr_curve_counts(matching)
        metrics_logger.log_pr_curves(iteration, {
            f"pr_curve/{safe_file_name(name)}": curve for name, curve in zip(val_dataset.class_names, curves) if curve
        })
        if cfg.train.tb_images:
            metrics_logger.log_images(iteration, evaluation_pictures(val_dataset, results, cfg.train.tb_images))
    return metrics


def train(cfg: Config, resume: bool = False, overwrite: bool = False, config_source: str | None = None) -> dict:
    """Train `cfg` to solver.max_iter in cfg.train.output_dir; returns the final evaluation metrics
    (rank 0).

    Before anything is written, the main process takes the folder's lock (run_dir) and checks it
    (prepare_output_dir); the other processes stop too when it refuses.

    Args:
        resume: continue the run in the folder from its newest checkpoint: weights, optimizer
            state, iteration, data stream position and RNG. The config stays the checkpoint's except
            for the values RESUME_KEYS applies (LR schedule, periods, ...); changing a refused one
            (model, optimizer, batch size, data, seed) raises ResumeConfigError. Without any
            checkpoint in the folder, training starts from scratch (a warning).
        overwrite: start from scratch in a folder that holds an earlier run, deleting that run's
            checkpoints and metrics first.
        config_source: where the config came from (file and overrides), for the log.
    Raises:
        RunDirError: another live run holds the folder; it holds checkpoints and neither flag is
            set; --resume finds checkpoints it cannot read; a folder cannot be written; the disk is
            too small for the checkpoints.
        ResumeConfigError: see `resume`.
        NonFiniteLossError: a NaN/Inf loss, after saving the last good state.
        TrainingStopped: SIGTERM, SIGINT or SIGHUP, after saving a checkpoint (exit_code: 128 + signal).
        MainProcessFailed: on ranks other than 0, when rank 0 refused to start.
    """
    if resume and overwrite:
        raise ValueError("--resume continues the run in the output folder, --overwrite deletes it: give one of them")
    device = dist_utils.init_distributed(cfg.train.device)
    world_size = dist_utils.get_world_size()
    if cfg.solver.ims_per_batch % world_size:
        raise ValueError(f"solver.ims_per_batch={cfg.solver.ims_per_batch} is not divisible by {world_size} processes")
    output_dir = Path(cfg.train.output_dir)
    lock = dist_utils.run_on_main(lambda: acquire_run_lock(output_dir))
    try:
        return _train_in(output_dir, cfg, device, resume, overwrite, config_source)
    finally:
        if lock is not None:
            lock.release()


def prepare_output_dir(output_dir: Path, cfg: Config, resume: bool, overwrite: bool) -> tuple[Path | None, dict | None]:
    """Main process, holding the lock: check the folder and choose how the run starts; write
    config.yaml only once every check has passed.

    Refuses a new run into a folder that holds checkpoints unless `resume` or `overwrite`; checks
    that the folder and its checkpoints/ and tensorboard/ can be written (evaluation results go to
    the folder itself); removes temp files of interrupted saves; deletes the earlier run for
    `overwrite`; for `resume`, picks the checkpoint and checks the config against it.

    Returns:
        (checkpoint path, loaded checkpoint) to resume from, or (None, None) for a fresh start.
    """
    check_new_run_allowed(output_dir, resume, overwrite)
    for folder in (output_dir, output_dir / CHECKPOINTS_DIR, output_dir / TENSORBOARD_DIR):
        check_writable(folder)
    remove_orphan_temp_files(output_dir)
    path, checkpoint = None, None
    if overwrite:
        removed = remove_previous_run(output_dir)
        if removed:
            logger.warning("--overwrite: deleted the previous run's checkpoints and metrics in %s (%d files); "
                           "starting from scratch", output_dir, len(removed))
    if resume:
        found = checkpoint_to_resume(output_dir)
        if found is None:
            logger.warning("--resume: no checkpoint in %s, starting from scratch", output_dir / CHECKPOINTS_DIR)
        else:
            path, checkpoint = found
            iteration = int(checkpoint["iteration"])
            changes = check_resume_config(config_of(checkpoint, str(path)), cfg, iteration, path)
            if changes:  # restore() hands the history on to the run's next checkpoints
                checkpoint["config_changes"] = list(checkpoint.get("config_changes", [])) + [
                    {"iteration": iteration, "changes": changes}]
    (output_dir / CONFIG_FILE).write_text(dump_config(cfg))
    return path, checkpoint


def _train_in(output_dir: Path, cfg: Config, device: torch.device, resume: bool, overwrite: bool,
              config_source: str | None = None) -> dict:
    """train() once the main process holds the output folder's lock."""
    # What the preparation logs (--overwrite's deletions, --resume's changes) goes to log.txt too,
    # once the folder is accepted: a refused folder's log.txt is left untouched.
    with held_records() as records:
        prepared = dist_utils.run_on_main(lambda: prepare_output_dir(output_dir, cfg, resume, overwrite))
    with log_file(output_dir / LOG_FILE, enabled=dist_utils.is_main_process(), earlier_records=records):
        logger.info("device %s, %d process(es), output in %s", device, dist_utils.get_world_size(), output_dir)
        if config_source:
            logger.info("config: %s (resolved in %s)", config_source, output_dir / CONFIG_FILE)
        for warning in schedule_warnings(cfg.solver) if dist_utils.is_main_process() else []:
            logger.warning("%s", warning)
        return _train_prepared(output_dir, cfg, device, prepared)


def _train_prepared(output_dir: Path, cfg: Config, device: torch.device, prepared) -> dict:
    """_train_in once the folder is checked: data, model, resume state, loop."""
    rank, world_size = dist_utils.get_rank(), dist_utils.get_world_size()
    resume_path, checkpoint = prepared if prepared is not None else (None, None)
    resume_path = dist_utils.broadcast_object(resume_path)
    if resume_path is not None and checkpoint is None:  # the other processes read the file rank 0 chose
        checkpoint = load_checkpoint(resume_path)
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
    if checkpoint is not None:
        restore(state, checkpoint, cfg.solver)
        logger.info("resumed from %s at iteration %d (lr %.4g)", resume_path, state.iteration,
                    state.optimizer.param_groups[0]["lr"])
    dist_utils.run_on_main(lambda: check_free_space(
        output_dir, estimate_checkpoint_bytes(state.model, state.optimizer), cfg.train.keep_checkpoints))
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
    with StopRequested() as stop:  # before metrics.jsonl exists: a signal after that is handled
        metrics_logger = MetricsLogger(output_dir, enabled=dist_utils.is_main_process())
        try:
            return _run_loop(cfg, state, model, loader, val_dataset, device, output_dir, metrics_logger, stop)
        finally:
            metrics_logger.close()


def _run_loop(cfg, state, model, loader, val_dataset, device, output_dir, metrics_logger, stop) -> dict:
    """_loop, plus the saves that keep what was trained when it fails."""
    try:
        return _loop(cfg, state, model, loader, val_dataset, device, output_dir, metrics_logger, stop)
    except (NonFiniteLossError, TrainingStopped):
        raise  # saved already, by every process together
    except Exception as err:
        # Anything else (data error, OOM, a bug) may have happened in this process alone, and the
        # others cannot be told without risking a hang in mismatched collectives: no barrier here.
        # When rank 0 failed, the others stay blocked in the step's collectives while it saves;
        # when another rank failed, torchrun's SIGTERM only sets the stop flag (StopRequested),
        # which leaves rank 0 its grace period to save. The exception may have come mid-step:
        # the state saved is the last completed iteration's.
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            logger.error("training failed at iteration %d: the disk is full, no checkpoint saved", state.iteration)
            raise
        # No traceback here: the exception goes on to the caller, which shows it (the CLI: one line
        # for a user error such as a bad image, the traceback for anything else).
        logger.error("training failed at iteration %d (%s); saving a checkpoint to resume from",
                     state.iteration, type(err).__name__)
        try:
            save_checkpoint(state, cfg, output_dir)
        except Exception:
            logger.exception("could not save that checkpoint either")
        raise


def save_before_exit(state: TrainState, cfg: Config, output_dir: Path) -> None:
    """For a stop all processes agreed on (a signal, a NaN): rank 0 saves while the others wait,
    at most SAVE_WAIT_TIMEOUT, before they leave. torchrun tears every process down as soon as
    one exits with an error: leaving first, they would kill rank 0 mid-save."""
    try:
        save_checkpoint(state, cfg, output_dir)
    finally:
        if not dist_utils.wait_for_all(SAVE_WAIT_TIMEOUT):
            logger.error("the other processes did not arrive within %s (rank 0 died?); exiting", SAVE_WAIT_TIMEOUT)


def _evaluate_and_log(state, val_dataset, cfg, device, output_dir, metrics_logger) -> dict:
    metrics = run_evaluation(state.model, val_dataset, cfg, device, output_dir, metrics_logger, state.iteration)
    if metrics:
        metrics_logger.log(state.iteration, {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)})
    return metrics


class _ListHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]):
        super().__init__(logging.INFO)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def held_records():
    """Keep the package's INFO and higher log records emitted in the block (they still go to the
    other handlers), in a list for log_file to write later."""
    records: list[logging.LogRecord] = []
    handler = _ListHandler(records)
    package_logger = logging.getLogger("retinanet")
    package_logger.addHandler(handler)
    try:
        yield records
    finally:
        package_logger.removeHandler(handler)


@contextmanager
def log_file(path: Path, enabled: bool, earlier_records: list[logging.LogRecord] = ()):
    """Copy the package's log records to `path` (appending), detectron2's log.txt, while in the block.

    Args:
        earlier_records: records emitted before the block (see held_records), written first.
    """
    if not enabled:
        yield
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    package_logger = logging.getLogger("retinanet")
    if package_logger.getEffectiveLevel() > logging.INFO:
        handler.setLevel(logging.INFO)
    previous_level = package_logger.level
    package_logger.setLevel(min(package_logger.getEffectiveLevel(), logging.INFO))
    for record in earlier_records:
        handler.handle(record)
    package_logger.addHandler(handler)
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)
        handler.close()


def period_line(iteration: int, max_iter: int, scalars: dict[str, float], device: torch.device) -> str:
    """One log period in a line: iteration, losses, LR, seconds per iteration and loading, ETA, and
    the peak GPU memory (a counter of the allocator: reading it does not sync the device)."""
    losses = "  ".join(f"{key} {value:.4f}" for key, value in scalars.items() if key.startswith("loss_"))
    eta = datetime.timedelta(seconds=round(scalars["time_per_iter"] * (max_iter - iteration)))
    line = (f"iter {iteration}/{max_iter}  loss {scalars['loss']:.4f} ({losses})  lr {scalars['lr']:.3g}  "
            f"time/iter {scalars['time_per_iter']:.3f} s  data {scalars['data_time']:.3f} s  eta {eta}")
    if device.type == "cuda":
        line += f"  max_mem {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    return line


def _loop(cfg, state, model, loader, val_dataset, device, output_dir, metrics_logger, stop) -> dict:
    # A bar only on a terminal: in a redirected log it would be carriage returns and escape codes;
    # every log period is a line of its own (period_line) either way.
    show_bar = dist_utils.is_main_process() and sys.stderr.isatty()
    with logging_redirect_tqdm(loggers=[logging.getLogger("retinanet")]) if show_bar else nullcontext():
        return _loop_iterations(cfg, state, model, loader, val_dataset, device, output_dir, metrics_logger, stop,
                                show_bar)


def _loop_iterations(cfg, state, model, loader, val_dataset, device, output_dir, metrics_logger, stop,
                     show_bar) -> dict:
    max_iter = cfg.solver.max_iter
    progress = tqdm(total=max_iter, initial=state.iteration, disable=not show_bar, dynamic_ncols=True, desc="train")
    loss_sums: dict[str, torch.Tensor] = {}
    window_start, data_time, steps_in_window = time.perf_counter(), 0.0, 0
    metrics: dict = {}
    batches = iter(loader)
    if state.iteration == max_iter:  # resumed at the end: evaluate, as the loop's last iteration would
        metrics = _evaluate_and_log(state, val_dataset, cfg, device, output_dir, metrics_logger)
    while state.iteration < max_iter:
        fetch_start = time.perf_counter()
        try:
            images, targets = next(batches)
        except Exception as err:
            if not stop.signum:
                raise
            # The stop signal reached the loader's workers too, and one died of it before it could
            # ignore it (a spawned worker still starting): this is the stop, not a data failure. No
            # barrier: the other processes may be waiting in the step's all-reduce.
            progress.close()
            save_checkpoint(state, cfg, output_dir)
            stopped = TrainingStopped(stop.signum, state.iteration)
            logger.warning("%s (the data loader ended with %s)", stopped, type(err).__name__)
            raise stopped from err
        data_time += time.perf_counter() - fetch_start
        lr = state.optimizer.param_groups[0]["lr"]  # this iteration's: the step moves it to the next one's
        try:
            losses, stop_signal = train_step(
                model, state, images, targets, cfg.solver.amp, cfg.solver.clip_grad_norm, stop.signum
            )
        except NonFiniteLossError:  # raised by every process at the same step; weights still good
            progress.close()
            try:
                save_before_exit(state, cfg, output_dir)
            except Exception:
                logger.exception("could not save the last good state")
            raise
        for key, value in losses.items():
            loss_sums[key] = loss_sums.get(key, 0.0) + value
        steps_in_window += 1
        progress.update(1)
        iteration = state.iteration
        last = iteration == max_iter

        if iteration % cfg.train.log_period == 0 or last:
            elapsed = time.perf_counter() - window_start
            # The mean over the window and over every process's share of the global batches: one
            # all-reduce and one sync per period, reached by every process at the same iteration.
            sums = dist_utils.sum_over_processes(list(loss_sums.values()), device)
            count = steps_in_window * dist_utils.get_world_size()
            scalars = {k: v / count for k, v in zip(loss_sums, sums)}
            scalars["loss"] = sum(scalars.values())
            scalars.update(lr=lr, time_per_iter=elapsed / steps_in_window,
                           data_time=data_time / steps_in_window)
            progress.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}")
            if dist_utils.is_main_process():
                logger.info("%s", period_line(iteration, max_iter, scalars, device))
            metrics_logger.log(iteration, scalars)
            loss_sums, window_start, data_time, steps_in_window = {}, time.perf_counter(), 0.0, 0
        if iteration % cfg.train.checkpoint_period == 0 and not last:
            save_checkpoint(state, cfg, output_dir)
        if (cfg.train.eval_period > 0 and iteration % cfg.train.eval_period == 0) or last:
            metrics = _evaluate_and_log(state, val_dataset, cfg, device, output_dir, metrics_logger)
        if stop_signal and not last:  # at the last iteration, finishing is as quick as stopping
            progress.close()
            save_before_exit(state, cfg, output_dir)
            stopped = TrainingStopped(stop_signal, iteration)
            logger.warning("%s", stopped)
            raise stopped
    save_checkpoint(state, cfg, output_dir, name="model_final.pth")
    progress.close()
    return metrics
