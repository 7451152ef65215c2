"""Checkpoints as plain data, written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..config import Config, config_from_dict, to_dict

FORMAT_VERSION = 1


def make_checkpoint(model_state: dict, cfg: Config, class_names: list[str] | None = None, **extra: Any) -> dict:
    """The checkpoint dict: loadable with torch.load(weights_only=True), no pickled objects."""
    names = list(class_names) if class_names else [str(i) for i in range(cfg.model.num_classes)]
    return {"format_version": FORMAT_VERSION, "model": model_state, "config": to_dict(cfg), "class_names": names, **extra}


def save_atomic(checkpoint: dict, path: str | Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`.

    A crash at any point leaves either the previous file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by save_atomic, with a clear error for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable checkpoint ({err})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise ValueError(f"{path}: not a retinanet checkpoint (needs 'model' and 'config' entries)")
    return checkpoint


def config_of(checkpoint: dict, source: str = "<checkpoint>") -> Config:
    return config_from_dict(checkpoint["config"], source)
