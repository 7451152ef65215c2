"""Checkpoints: the one module that writes, reads and turns them into models.

A checkpoint is plain data, loadable with ``torch.load(path, weights_only=True)``:

    {"format_version": 2, "model": <state dict: the weights only>, "config": <plain dict>,
     "class_names": [K names], ...}

The trainer adds what it needs to resume exactly ("optimizer", "scheduler", "scaler", "iteration",
"sampler_position", "rng", "loss_normalizer"). Training-only state is never in "model": any
checkpoint loads strictly into the model its config builds. Format 1 kept the loss normaliser
among the weights as "criterion.running_num_foreground"; it is read from there and removed.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import Config, config_from_dict, load_config, merge, parse_override, to_dict
from .modeling import RetinaNet, build_model

FORMAT_VERSION = 2
# State-dict key prefixes added by DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_LEGACY_NORMALIZER_KEY = "criterion.running_num_foreground"  # format 1


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint, or one that does not fit the model asked for."""


def make_checkpoint(model_state: dict, cfg: Config, class_names: Sequence[str] | None = None, **extra: Any) -> dict:
    """The checkpoint dict (see the module docstring); `extra` holds the trainer's entries."""
    names = list(class_names) if class_names else [str(i) for i in range(cfg.model.num_classes)]
    if len(names) != cfg.model.num_classes:
        raise ValueError(f"{len(names)} class names for model.num_classes={cfg.model.num_classes}")
    return {"format_version": FORMAT_VERSION, "model": model_state, "config": to_dict(cfg), "class_names": names, **extra}


def _file_mode() -> int:
    """0o666 minus the process umask: what open() would give a new file (mkstemp gives 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_atomic(checkpoint: dict, path: str | Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`.

    A crash at any point leaves either the previous file or the new one, never a torn file. The
    file gets the user's umask (readable by a teammate where the umask allows), not mkstemp's 0600.

    Raises:
        OSError: the write failed (errno ENOSPC for a full disk or quota), naming the folder; the
            temp file is removed and `path` is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as err:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(err, Exception) and _is_write_failure(err):
            raise _write_error(err, path, checkpoint) from err
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# torch.save reports a failed write of its zip stream as a RuntimeError ("[enforce fail at
# inline_container.cc:...] . unexpected pos 704 vs 598"), without the OS error behind it.
_TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed writing", "file write failed")


def _is_write_failure(err: Exception) -> bool:
    return isinstance(err, OSError) or any(text in str(err) for text in _TORCH_WRITE_FAILURES)


def _write_error(err: Exception, path: Path, checkpoint: dict) -> OSError:
    """A failed save as an OSError that names the folder; ENOSPC when the disk is full (the OS says
    so, or torch gave no reason and the disk has less room left than the checkpoint needs)."""
    cause: BaseException | None = err
    while cause is not None and not (isinstance(cause, OSError) and cause.errno):
        cause = cause.__cause__ or cause.__context__
    needed = _tensor_bytes(checkpoint)
    free = shutil.disk_usage(path.parent).free
    os_errno = cause.errno if cause is not None else None
    if os_errno in (errno.ENOSPC, errno.EDQUOT) or (os_errno is None and free < needed + 2**20):
        return OSError(errno.ENOSPC, (
            f"{path.parent}: no space left on the device (or over quota) while writing {path.name}: it needs "
            f"about {needed / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free. {path} is unchanged; free some "
            "space or write to another folder"
        ))
    reason = os.strerror(os_errno) if os_errno else str(err)
    return OSError(os_errno or errno.EIO, f"{path.parent}: could not write {path.name} ({reason}); {path} is unchanged")


def _tensor_bytes(obj: Any) -> int:
    """Bytes of all tensors in a nested dict / list (what torch.save writes, give or take)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(value) for value in obj)
    return 0


def read_torch_file(path: str | Path, what: str = "checkpoint") -> Any:
    """torch.load(path, weights_only=True) on the CPU: plain data only, never code.

    Raises:
        FileNotFoundError, or CheckpointError naming the file (unreadable, not a PyTorch file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as err:
        raise CheckpointError(f"{path}: cannot read the {what}: {err.strerror}") from None
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable {what} ({_load_failure(err)})") from None


def _load_failure(err: Exception) -> str:
    """torch.load's error in one line. Its messages run over many lines, in colour, and for a pickled
    object advise loading with weights_only=False, which would run the file's code: name the object."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsafe:
        return f"it holds a pickled {unsafe.group(1)}: Python objects are never loaded, only tensors and plain data"
    return f"{type(err).__name__}: {_first_lines(text, 1)}"


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint; FileNotFoundError if missing, CheckpointError naming the file otherwise."""
    path = Path(path)
    checkpoint = read_torch_file(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        hint = ""
        if isinstance(checkpoint, dict) and any(key.startswith("head.classification_head.") for key in checkpoint):
            hint = "; it looks like torchvision RetinaNet weights: run `retinanet convert --from torchvision` first"
        raise CheckpointError(f"{path}: not a retinanet checkpoint (needs 'model' and 'config' entries){hint}")
    return checkpoint


def config_of(checkpoint: dict, source: str = "<checkpoint>") -> Config:
    """The Config saved in a checkpoint."""
    return config_from_dict(checkpoint["config"], source)


def model_weights(checkpoint: dict) -> dict[str, Tensor]:
    """The checkpoint's model state dict, ready for a strict load: wrapper prefixes removed, and
    format 1's loss normaliser (training state, see `loss_normalizer`) taken out."""
    state = {}
    for key, value in checkpoint["model"].items():
        for prefix in WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        state[key] = value
    state.pop(_LEGACY_NORMALIZER_KEY, None)
    return state


def loss_normalizer(checkpoint: dict) -> Tensor | None:
    """The running foreground count a trainer saved (None in converted or hand-made checkpoints)."""
    if "loss_normalizer" in checkpoint:
        return checkpoint["loss_normalizer"]
    for key, value in checkpoint["model"].items():
        if key.endswith(_LEGACY_NORMALIZER_KEY):
            return value
    return None


def resolve_config(
    checkpoint: dict, config_path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
    source: str = "<checkpoint>",
) -> Config:
    """The config to run a checkpoint with: `config_path` (plus overrides) when given, else the
    checkpoint's saved config with each override applied on top and checked in turn."""
    if config_path is not None:
        return load_config(config_path, list(overrides))
    data = checkpoint["config"]
    cfg = config_from_dict(data, source)
    for override in overrides:
        data = merge(data, parse_override(override))
        cfg = config_from_dict(data, f"{source}: override {override!r}")
    return cfg


def load_weights(model: RetinaNet, checkpoint: dict, source: str = "<checkpoint>") -> None:
    """Strictly load a checkpoint's weights into `model`; CheckpointError naming what differs."""
    try:
        model.load_state_dict(model_weights(checkpoint), strict=True)
    except RuntimeError as err:  # missing, unexpected or mis-shaped keys
        raise CheckpointError(
            f"{source}: the weights do not fit the model built from the config "
            f"(a checkpoint of another model or class count?): {_first_lines(str(err))}"
        ) from None


def load_model(
    checkpoint: str | os.PathLike | dict, config_path: str | os.PathLike | None = None, overrides: Sequence[str] = ()
) -> tuple[RetinaNet, Config]:
    """Build the model of a checkpoint and load its weights strictly.

    Args:
        checkpoint: a path or an already loaded checkpoint dict.
        config_path: a YAML config replacing the checkpoint's own (e.g. another test size).
        overrides: KEY=VALUE strings applied on top of the config.
    Returns:
        (model in eval mode on the CPU, its config). The backbone's ImageNet weights setting is
        ignored: the checkpoint holds every weight.
    """
    source = "<checkpoint>" if isinstance(checkpoint, dict) else str(checkpoint)
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    cfg = resolve_config(ckpt, config_path, overrides, source)
    cfg.model.backbone.weights = ""
    class_names = ckpt.get("class_names")
    if class_names is not None and len(class_names) != cfg.model.num_classes:
        raise CheckpointError(
            f"{source}: the checkpoint has {len(class_names)} classes but the config says "
            f"model.num_classes={cfg.model.num_classes}; use the checkpoint's own config or set "
            f"model.num_classes={len(class_names)}"
        )
    model = build_model(cfg, class_names)
    load_weights(model, ckpt, source)
    return model.eval(), cfg


def _first_lines(text: str, count: int = 4) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:count]) + (" ..." if len(lines) > count else "")
