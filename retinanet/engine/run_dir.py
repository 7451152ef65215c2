"""A training run's output folder: who owns it, whether it already holds a run, whether it can be written.

A run owns its folder through a lock file, ``run.lock``, that the main process creates atomically
(O_CREAT | O_EXCL) before it writes anything else there and removes when the run ends. It holds
JSON: {"pid", "host", "started", "pid_start"}. A second run into the folder is refused while that
process lives. A lock whose process is gone (a run killed with SIGKILL, a machine reset) is stale:
the next run takes it over with a warning. A lock taken on another host cannot be checked from here
and is never taken over.

The folder's layout (what a run writes, what --overwrite deletes):

    config.yaml  metrics.jsonl  tensorboard/  coco_results.json  metrics.json  run.lock
    checkpoints/model_0005000.pth ... model_final.pth  checkpoints/last_checkpoint
    checkpoints/eval/  (`retinanet eval --checkpoint` of a checkpoint here, by default)
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .evaluator import METRICS_FILE, RESULTS_FILE

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
CONFIG_FILE = "config.yaml"
METRICS_LOG = "metrics.jsonl"
LOG_FILE = "log.txt"  # the run's log records, one line per log period among them
EVAL_DIR = "eval"  # in checkpoints/: where `retinanet eval --checkpoint` writes by default
LAST_CHECKPOINT = "last_checkpoint"  # text file in checkpoints/ naming the newest complete checkpoint
CHECKPOINT_GLOB = "model_*.pth"  # periodic (model_0005000.pth) and final (model_final.pth)
# Temp files a killed run leaves in checkpoints/: save_atomic's (".model_0000004.pth.k2j3x.tmp") and
# the pointer's (".last_checkpoint.tmp"). Only the run holding the lock deletes them.
ORPHAN_GLOBS = (".model_*.pth.*.tmp", f".{LAST_CHECKPOINT}.tmp")
# A lock file that is still empty or half-written this long after its creation was left by a
# process killed between creating and writing it (writing takes microseconds).
UNFINISHED_LOCK_AGE_S = 10.0
# Optimizer state tensors kept per parameter: SGD's momentum buffer; AdamW's two moments.
OPTIMIZER_SLOTS = {torch.optim.SGD: 1, torch.optim.AdamW: 2}


class RunDirError(ValueError):
    """The output folder cannot be used as asked: in use, holding another run, unwritable or too small."""


# ----------------------------------------------------------------------------------------------
# The lock.


@dataclass
class RunLock:
    """The lock file this process holds, and the record it wrote there."""

    path: Path
    record: dict

    def release(self) -> None:
        """Remove the lock file, unless another run has taken it over meanwhile."""
        if _read_lock(self.path) == self.record:
            self.path.unlink(missing_ok=True)


def acquire_run_lock(output_dir: Path) -> RunLock:
    """Create `output_dir` if needed and take its lock.

    Raises:
        RunDirError: another process holds the lock (names its pid, host and start time); a file
            stands where the folder or one above it should be.
    """
    check_folder_path(output_dir, "choose another --output-dir")
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_FILE
    record = _lock_record()
    for _ in range(3):  # a stale lock removed or a lock released meanwhile: try again
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            _remove_stale_lock(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        return RunLock(path, record)
    raise RunDirError(f"{path}: other runs keep taking this folder's lock; choose another --output-dir")


def _lock_record() -> dict:
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "pid_start": _process_start_ticks(pid),
    }


def _process_start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (/proc/PID/stat field 22); None
    without /proc. Tells a live holder from a new process that got a dead holder's pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields from 3 (state) on follow the ")"


def _read_lock(path: Path) -> dict | None:
    """The lock's record; None when there is no lock file, {} when it is empty or garbled."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def _holder_is_running(record: dict) -> bool | None:
    """Whether the lock's process still runs: None when it runs on another host (cannot tell)."""
    if record.get("host") != socket.gethostname():
        return None
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    started = record.get("pid_start")
    now = _process_start_ticks(pid)
    return started is None or now is None or now == started


def _remove_stale_lock(path: Path) -> None:
    """Remove the lock at `path` if its process is gone; RunDirError if it is (or may be) alive."""
    holder = _read_lock(path)
    if holder is None:  # released meanwhile
        return
    if not holder:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return
        if age < UNFINISHED_LOCK_AGE_S:
            raise RunDirError(f"{path}: another run is taking this folder right now; choose another --output-dir")
        logger.warning("%s: removing an unreadable lock file left by a run killed while it started", path)
    else:
        running = _holder_is_running(holder)
        if running is not False:
            raise RunDirError(_in_use_message(path, holder, on_this_host=running is True))
        logger.warning(
            "%s: taking over the lock of run pid %s on %s (started %s): that process is not running any "
            "more (killed?)", path, holder.get("pid"), holder.get("host"), holder.get("started"),
        )
    _remove_if_unchanged(path, holder)


def _remove_if_unchanged(path: Path, holder: dict) -> None:
    """Delete the lock file if it still holds `holder`, one process at a time: two runs that both
    found the lock stale must not each delete it (the second would delete the first's new lock)."""
    guard = path.with_name(path.name + ".takeover")
    try:
        fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        if time.time() - guard.stat().st_mtime > UNFINISHED_LOCK_AGE_S:
            guard.unlink(missing_ok=True)  # left by a process killed during a takeover
            return
        raise RunDirError(f"{path}: another run is taking this folder right now; choose another --output-dir") from None
    try:
        if _read_lock(path) == holder:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)
        guard.unlink(missing_ok=True)


def _in_use_message(path: Path, holder: dict, on_this_host: bool) -> str:
    who = f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
    message = f"{path.parent} is in use by another training run ({who}; lock file {path}): "
    if on_this_host:
        return message + "wait for it to finish, stop it, or choose another --output-dir"
    return message + (
        "that host cannot be checked from here; wait for that run or choose another --output-dir. If no "
        f"run uses this folder any more (that machine was reset), delete {path}"
    )


# ----------------------------------------------------------------------------------------------
# What the folder holds.


def checkpoint_files(output_dir: Path) -> list[Path]:
    """The checkpoints (and the last_checkpoint pointer) of a run in `output_dir`, sorted by name;
    anything named like a checkpoint counts, readable or not."""
    checkpoints = output_dir / CHECKPOINTS_DIR
    if not checkpoints.is_dir():
        return []
    found = sorted(checkpoints.glob(CHECKPOINT_GLOB))
    pointer = checkpoints / LAST_CHECKPOINT
    return found + [pointer] if pointer.exists() else found


def check_new_run_allowed(output_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a new run into a folder that holds checkpoints, unless told what to do with them.

    Raises:
        RunDirError: checkpoints exist and neither `resume` nor `overwrite` is set.
    """
    found = checkpoint_files(output_dir)
    if found and not resume and not overwrite:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise RunDirError(
            f"{output_dir} already holds a training run ({output_dir / CHECKPOINTS_DIR}: {names}): add --resume to "
            "continue it, --overwrite to start again from scratch (deletes its checkpoints and metrics), or "
            "choose another --output-dir"
        )


def remove_previous_run(output_dir: Path) -> list[Path]:
    """Delete what an earlier run wrote into `output_dir` (its checkpoints, the last_checkpoint
    pointer, metrics.jsonl, log.txt, TensorBoard events, evaluation results, the checkpoints/eval/
    folder of `retinanet eval` on its checkpoints) and nothing else.

    Returns:
        the paths removed.
    """
    removed = checkpoint_files(output_dir)
    outputs = [output_dir / name for name in (METRICS_LOG, LOG_FILE, RESULTS_FILE, METRICS_FILE)]
    removed += [path for path in outputs if path.is_file()]
    tensorboard = output_dir / TENSORBOARD_DIR
    if tensorboard.is_dir():
        removed += sorted(tensorboard.glob("events.out.tfevents.*"))
    evaluations = output_dir / CHECKPOINTS_DIR / EVAL_DIR
    if evaluations.is_dir() and not evaluations.is_symlink():  # results of the old checkpoints: all stale
        removed.append(evaluations)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # a folder named like a checkpoint
        else:
            path.unlink(missing_ok=True)
    return removed


def remove_orphan_temp_files(output_dir: Path) -> list[Path]:
    """Delete the temp files runs killed mid-save left in checkpoints/. Call it only while holding
    the lock: a live run's temp file is its save in progress.

    Returns:
        the paths removed.
    """
    checkpoints = output_dir / CHECKPOINTS_DIR
    orphans = sorted(path for pattern in ORPHAN_GLOBS for path in checkpoints.glob(pattern) if path.is_file())
    for path in orphans:
        path.unlink(missing_ok=True)
    if orphans:
        size_mb = sum(_size(path) for path in orphans) / 2**20
        logger.warning("removed %d temp files (%.0f MiB) of interrupted saves from %s", len(orphans), size_mb,
                       checkpoints)
    return orphans


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# ----------------------------------------------------------------------------------------------
# Can the run write there?


def check_folder_path(folder: Path, advice: str) -> None:
    """Refuse a folder to be created or used where a file stands: at `folder` itself or at a folder
    above it (mkdir's FileExistsError / NotADirectoryError, which name no reason a user can act on).

    Args:
        advice: what to do instead, ending the message ("choose another --output-dir").
    Raises:
        RunDirError naming the file.
    """
    for path in (folder, *folder.parents):
        if path.is_dir():
            return
        if path.exists() or path.is_symlink():  # a file, or a link to nothing or to a file
            prefix = "" if path == folder else f"{folder}: "
            raise RunDirError(f"{prefix}{path} is a file, not a folder; {advice}")


def check_writable(folder: Path) -> None:
    """Create `folder` if needed, then create and delete a probe file in it.

    Raises:
        RunDirError: naming the folder and the reason (e.g. Permission denied).
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write_probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = "a file stands where the folder should be" if folder.exists() and not folder.is_dir() else (
            err.strerror or str(err))
        raise RunDirError(
            f"{folder}: the run cannot write there ({reason}); fix it or choose another --output-dir"
        ) from None


def estimate_checkpoint_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of one training checkpoint: the state dict plus the optimizer's per-parameter state
    (about 3x the parameter bytes with AdamW, 2x with SGD), before the optimizer's first step has
    allocated that state."""
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return state_bytes + OPTIMIZER_SLOTS.get(type(optimizer), 2) * param_bytes


def check_free_space(output_dir: Path, checkpoint_bytes: int, keep_checkpoints: int) -> None:
    """Refuse to start when the disk cannot hold the checkpoints this run will have at once.

    At the peak, `keep_checkpoints` periodic ones stay while one more is being written (the final
    save: the kept ones plus model_final.pth). Checkpoints already in the folder count as written.

    Raises:
        RunDirError: naming the folder, the space free and the space needed.
    """
    checkpoints = output_dir / CHECKPOINTS_DIR
    existing = sum(_size(path) for path in checkpoints.glob(CHECKPOINT_GLOB))
    needed = max(checkpoint_bytes, (max(keep_checkpoints, 1) + 1) * checkpoint_bytes - existing)
    free = shutil.disk_usage(checkpoints).free
    if free < needed:
        raise RunDirError(
            f"{checkpoints}: {free / 2**20:.0f} MiB free on its disk, but this run needs about "
            f"{needed / 2**20:.0f} MiB for its checkpoints ({checkpoint_bytes / 2**20:.0f} MiB each, "
            f"train.keep_checkpoints={keep_checkpoints} kept plus one being written): free some space, lower "
            "train.keep_checkpoints or choose another --output-dir"
        )
