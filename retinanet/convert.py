"""Import torchvision RetinaNet weights: rename the state dict and infer the matching config."""

from __future__ import annotations

import importlib.resources
import os
import re
from pathlib import Path

from torch import Tensor
from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights

from .checkpoint import make_checkpoint, read_torch_file, save_atomic
from .config import PACKAGED_CONFIGS, Config, load_config

# torchvision's COCO detectors index their outputs by COCO category id (0..90): '__background__' at 0,
# the 80 classes at their ids, 'N/A' in the 11 unused ids. Evaluation maps labels to a dataset's
# categories by these names, so a converted COCO model scores on COCO json as torchvision's does.
TORCHVISION_COCO_NAMES: list[str] = list(RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"])

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
    base = importlib.resources.files(PACKAGED_CONFIGS).joinpath("torchvision_r50_fpn.yaml")
    cfg = load_config(Path(str(base)), overrides)
    return converted, cfg


def torchvision_class_names(num_classes: int) -> list[str]:
    """COCO's names in torchvision's 91-index layout for a 91-class model, else "0".."K-1"."""
    if num_classes == len(TORCHVISION_COCO_NAMES):
        return list(TORCHVISION_COCO_NAMES)
    return [str(label) for label in range(num_classes)]


def convert_torchvision_checkpoint(in_path: str | Path, out_path: str | Path) -> Config:
    """Read a torchvision RetinaNet .pth and write one of our checkpoints (model, config, class names).

    Raises:
        ValueError: `out_path` is `in_path` (also through a link): the original weights would be replaced.
    """
    if Path(out_path).exists() and Path(in_path).exists() and os.path.samefile(in_path, out_path):
        same = "the input file" if str(out_path) == str(in_path) else f"the input file {in_path}"
        raise ValueError(f"{out_path} is {same}: converting would write over the torchvision weights; write the "
                         "checkpoint to another file")
    state = read_torch_file(in_path, "torchvision weights file")
    if not isinstance(state, dict):
        raise ValueError(f"{in_path}: expected a state dict, got {type(state).__name__}")
    try:
        converted, cfg = convert_torchvision_state_dict(state)
    except (KeyError, IndexError) as err:
        raise ValueError(f"{in_path}: not torchvision RetinaNet weights (no {err})") from None
    except ValueError as err:
        raise ValueError(f"{in_path}: {err}") from None
    save_atomic(make_checkpoint(converted, cfg, torchvision_class_names(cfg.model.num_classes)), out_path)
    return cfg
