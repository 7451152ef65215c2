"""Import torchvision RetinaNet weights: rename the state dict and infer the matching config."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from .config import Config, load_config

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"

_STEMS = {  # torchvision prefix -> ours (the ResNet body keeps torchvision's own names)
    "backbone.body.": "backbone.body.",
    "backbone.fpn.extra_blocks.p6.": "fpn.p6.",
    "backbone.fpn.extra_blocks.p7.": "fpn.p7.",
    "head.classification_head.cls_logits.": "head.cls_logits.",
    "head.regression_head.bbox_reg.": "head.box_deltas.",
}
# Block counts per ResNet stage identify the depth.
_DEPTH_BY_BLOCKS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}


def _rename(key: str, head_norm: bool) -> str | None:
    for theirs, ours in _STEMS.items():
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    match = re.match(r"backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.(?:0\.)?(weight|bias)$", key)
    if match:
        kind, level, param = match.groups()
        return f"fpn.{'lateral' if kind == 'inner' else 'output'}_convs.{level}.{param}"
    match = re.match(r"head\.(classification|regression)_head\.conv\.(\d+)\.(?:(\d+)\.)?(.+)$", key)
    if match:
        which, index, sub, param = match.groups()
        subnet = "cls_subnet" if which == "classification" else "box_subnet"
        if sub is None:  # torchvision < 0.13: a flat Sequential of Conv2d, ReLU, Conv2d, ...
            layer, part = int(index) // 2, 0
        else:  # Conv2dNormActivation blocks: conv.{layer}.{0 conv | 1 norm}
            layer, part = int(index), int(sub)
        per_layer = 3 if head_norm else 2  # conv, (GroupNorm), ReLU
        return f"head.{subnet}.{layer * per_layer + part}.{param}"
    return None


def infer_torchvision_config(state: dict[str, Tensor]) -> list[str]:
    """Config overrides (on top of configs/torchvision_r50_fpn.yaml) that match a torchvision state dict."""
    blocks = tuple(
        len({k.split(".")[3] for k in state if k.startswith(f"backbone.body.layer{i}.")}) for i in range(1, 5)
    )
    bottleneck = any(".conv3." in k for k in state if k.startswith("backbone.body."))
    depth = 50 if blocks == (3, 4, 6, 3) and bottleneck else _DEPTH_BY_BLOCKS.get(blocks)
    if depth is None:
        raise ValueError(f"not a torchvision ResNet RetinaNet: stage block counts {blocks}")
    channels = state["backbone.fpn.extra_blocks.p6.weight"].shape[0]
    p6_in = state["backbone.fpn.extra_blocks.p6.weight"].shape[1]
    num_anchors = state["head.regression_head.bbox_reg.weight"].shape[0] // 4
    num_classes = state["head.classification_head.cls_logits.weight"].shape[0] // num_anchors
    head_norm = any(re.match(r"head\.classification_head\.conv\.0\.1\.weight$", k) for k in state)
    num_convs = len({k.split(".")[3] for k in state if k.startswith("head.classification_head.conv.")})
    return [
        f"model.backbone.depth={depth}",
        f"model.num_classes={num_classes}",
        f"model.fpn.channels={channels}",
        f"model.head.channels={channels}",
        f"model.fpn.p6_from={'p5' if p6_in == channels else 'c5'}",
        f"model.head.norm={'gn' if head_norm else 'none'}",
        f"model.head.num_convs={num_convs}",
    ]


def convert_torchvision_state_dict(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], Config]:
    """Turn a torchvision ``retinanet_resnet{18..152}_fpn`` state dict into ours.

    Returns:
        our state dict and the Config that builds the matching model (torchvision's choices:
        configs/torchvision_r50_fpn.yaml with depth, classes and head layout read from the weights).
    """
    for key in ("model", "state_dict"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
    overrides = infer_torchvision_config(state)
    head_norm = "model.head.norm=gn" in overrides
    converted, unknown = {}, []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        ours = _rename(key, head_norm)
        if ours is None:
            unknown.append(key)
        else:
            converted[ours] = value
    if unknown:
        raise ValueError(f"unrecognised torchvision RetinaNet keys: {unknown[:8]}")
    cfg = load_config(CONFIGS_DIR / "torchvision_r50_fpn.yaml", overrides)
    return converted, cfg


def convert_torchvision_checkpoint(in_path: str | Path, out_path: str | Path) -> Config:
    """Read a torchvision RetinaNet .pth and write one of our checkpoints (model + config)."""
    from .engine.checkpoint import make_checkpoint, save_atomic

    state = torch.load(in_path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{in_path}: expected a state dict, got {type(state).__name__}")
    converted, cfg = convert_torchvision_state_dict(state)
    save_atomic(make_checkpoint(converted, cfg), out_path)
    return cfg
