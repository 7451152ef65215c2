"""Typed configuration: the schema (every knob with its paper default), YAML loading and overrides.

A config file is YAML whose keys mirror the dataclasses below. A file may name a parent with
``_base_: other.yaml``: a path relative to the file, else a packaged config's name (see
find_config_file); the child's keys replace the parent's, nested mappings merge key by key.
Command-line overrides are ``dotted.key=VALUE`` strings whose VALUE is parsed as YAML
(``solver.base_lr=0.02``, ``model.anchors.sizes=[16,32,64,128,256]``), except for a string key,
whose VALUE is taken as typed (``train.output_dir=2024``, ``train.output_dir=exp #2``: no number,
no null, no comment), unless it is quoted YAML-style (``'train.output_dir="a b"'``).

Every key is checked against the schema: an unknown key, a wrong type or a value out of range raises
``ConfigError`` naming the file and key and suggesting the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a bad value."""


# ----------------------------------------------------------------------------------------------
# Schema. One field per knob; the default is the paper's (Lin et al. 2017) unless said otherwise.


@dataclass
class BackboneConfig:
    depth: int = 50  # ResNet depth: 18, 34, 50, 101 or 152 (torchvision builders)
    # Where the ImageNet weights come from: "" (random init), a local .pth path, or
    # "torchvision:IMAGENET1K_V1" (a torchvision weight enum; needs the machine to be online).
    weights: str = ""
    norm: str = "frozen_bn"  # frozen_bn | bn | sync_bn
    freeze_at: int = 2  # 0: train all; 1: freeze the stem; k >= 2: stem and res2..res(k) (detectron2)
    # frozen_bn only: compute conv -> frozen BN as one convolution (same state dict; outputs equal up to
    # float rounding, ~1e-6 relative; ~20% faster backbone on CPU). false: torchvision's two ops.
    fold_frozen_bn: bool = True


@dataclass
class FPNConfig:
    channels: int = 256  # C in the paper
    p6_from: str = "c5"  # c5 (paper, detectron2) | p5 (torchvision v1)


@dataclass
class AnchorConfig:
    sizes: list[float] = field(default_factory=lambda: [32.0, 64.0, 128.0, 256.0, 512.0])  # P3..P7, px
    scales: list[float] = field(default_factory=lambda: [1.0, 2 ** (1 / 3), 2 ** (2 / 3)])  # per octave
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # height / width
    # torchvision's AnchorGenerator truncates size*scale to int and rounds the base anchors.
    torchvision_compat: bool = False


@dataclass
class HeadConfig:
    num_convs: int = 4  # 3x3 conv + ReLU layers in each subnet
    channels: int = 256
    norm: str = "none"  # none (paper) | gn (GroupNorm(32), torchvision v2)
    prior_prob: float = 0.01  # pi: initial foreground probability of every anchor


@dataclass
class MatcherConfig:
    fg_iou_thresh: float = 0.5  # IoU >= this: foreground
    bg_iou_thresh: float = 0.4  # IoU < this with every box: background; in between: ignored
    allow_low_quality_matches: bool = False  # each box also takes its best anchors (torchvision: true)
    crowd_ioa_thresh: float = 0.5  # anchors covered more than this by a crowd box are ignored


@dataclass
class LossConfig:
    cls: str = "focal"  # focal | ce | ohem
    focal_alpha: float = 0.25  # alpha for the foreground; < 0 disables alpha weighting
    focal_gamma: float = 2.0
    ohem_anchors_per_image: int = 512  # ohem: keep this many highest-loss anchors per image
    ohem_fg_fraction: float = -1.0  # ohem: at most this fraction foreground (0.25 = 1:3); < 0: any
    # ohem: NMS over the anchors' boxes, scored by loss, before the top-k (paper Table 1d: 0.7 or
    # 0.5; 0.7 is OHEM's own and the paper's better one at 512 per image); <= 0 or >= 1: no NMS.
    ohem_nms_thresh: float = 0.7
    box: str = "smooth_l1"  # smooth_l1 (paper) | l1 (torchvision v1, detectron2) | giou (torchvision v2)
    smooth_l1_beta: float = 0.11  # Detectron's value
    box_weight: float = 1.0
    # Detectron2 divides by a running mean of the foreground count (momentum 0.9); 0 = exact count.
    normalizer_momentum: float = 0.0


@dataclass
class BoxCoderConfig:
    weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])  # (wx, wy, ww, wh)
    # dw, dh are clamped to this before exp() so a wild prediction cannot overflow (log(1000/16)).
    scale_clamp: float = math.log(1000.0 / 16)


@dataclass
class InferenceConfig:
    score_thresh: float = 0.05
    topk_candidates: int = 1000  # per pyramid level, before NMS
    nms_thresh: float = 0.5  # class-aware
    detections_per_image: int = 100  # torchvision keeps 300
    # eval / infer / Detector on a GPU: the network under torch.compile with CUDA graphs, compiled once
    # per padded input shape (retinanet.inference.compile_for_inference); eager on the CPU.
    compile: bool = False


@dataclass
class InputConfig:
    # Training short side, chosen uniformly per batch from this list (multi-scale when > 1 value).
    min_size_train: list[int] = field(default_factory=lambda: [800])
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    pixel_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # RGB, 0..1 scale
    pixel_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    size_divisibility: int = 128  # pad the batch to a multiple of the coarsest stride (P7)


@dataclass
class ModelConfig:
    num_classes: int = 80  # K
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    box_coder: BoxCoderConfig = field(default_factory=BoxCoderConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    input: InputConfig = field(default_factory=InputConfig)


@dataclass
class DatasetConfig:
    ann_file: str = ""  # COCO-format instances json
    img_dir: str = ""  # folder the json's file_name entries are relative to
    format: str = "coco"  # coco | voc (img_dir: VOC root, ann_file: split file/name) | yolo (images dir, data.yaml)


@dataclass
class SyntheticConfig:
    # When set, the built-in synthetic dataset is generated here on first use (if missing) and
    # data.train / data.val default to its files.
    root: str = ""
    num_train: int = 512
    num_val: int = 128
    image_size: int = 128  # px, long side of each image
    seed: int = 0


@dataclass
class DataConfig:
    train: DatasetConfig = field(default_factory=DatasetConfig)
    val: DatasetConfig = field(default_factory=DatasetConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    filter_empty: bool = False  # drop training images that have no (non-crowd) box
    hflip_prob: float = 0.5
    num_workers: int = 4  # DataLoader workers per process
    aspect_ratio_grouping: bool = True  # batch landscape and portrait images separately
    check_images: bool = False  # decode every image once at start-up; all bad files named in one error
    on_bad_image: str = "error"  # error | skip: a bad training image stops the run, or the next good one replaces it
    # How DataLoader workers start: auto | fork | spawn | forkserver. auto: fork where the platform
    # has it (Linux), else its default (spawn on macOS and Windows). Fork starts workers at once and
    # shares the dataset's memory; Python 3.14 makes forkserver Linux's default, whose workers each
    # unpickle their own copy of the dataset and re-import torch.
    start_method: str = "auto"


@dataclass
class SolverConfig:
    optimizer: str = "sgd"  # sgd | adamw
    base_lr: float = 0.01  # at reference_batch_size images per iteration
    reference_batch_size: int = 16  # LR is scaled by ims_per_batch / reference_batch_size
    ims_per_batch: int = 16  # total over all processes
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0  # weight decay of norm layers' affine parameters
    weight_decay_bias: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    max_iter: int = 90000
    scheduler: str = "multistep"  # multistep | cosine
    steps: list[int] = field(default_factory=lambda: [60000, 80000])  # multistep: LR x gamma here
    gamma: float = 0.1
    warmup_iters: int = 500  # Detectron
    warmup_factor: float = 1.0 / 3  # LR starts at base_lr * warmup_factor and rises linearly
    clip_grad_norm: float = 0.0  # 0 disables
    amp: str = "off"  # off | fp16 | bf16


@dataclass
class TrainConfig:
    output_dir: str = "output"
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 42
    checkpoint_period: int = 5000  # iterations
    eval_period: int = 0  # iterations; 0 evaluates only at the end
    log_period: int = 20
    keep_checkpoints: int = 2  # older periodic checkpoints are deleted
    channels_last: bool = False
    compile: bool = False  # torch.compile backbone, FPN and head (RetinaNet.compile_network)
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm under DDP (backbone.norm=bn)
    deterministic: bool = False
    # Val images (the lowest image ids) drawn with ground truth and detections in TensorBoard at each
    # evaluation, beside the per-class PR curves; 0: none.
    tb_images: int = 4


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# Values whose allowed set is small enough to check here, so a typo fails at load time.
CHOICES: dict[str, tuple[Any, ...]] = {
    "model.backbone.depth": (18, 34, 50, 101, 152),
    "model.backbone.norm": ("frozen_bn", "bn", "sync_bn"),
    "model.fpn.p6_from": ("c5", "p5"),
    "model.head.norm": ("none", "gn"),
    "model.loss.cls": ("focal", "ce", "ohem"),
    "model.loss.box": ("smooth_l1", "l1", "giou"),
    "solver.optimizer": ("sgd", "adamw"),
    "solver.scheduler": ("multistep", "cosine"),
    "solver.amp": ("off", "fp16", "bf16"),
    "train.device": ("auto", "cpu", "cuda"),
    "data.on_bad_image": ("error", "skip"),
    "data.start_method": ("auto", "fork", "spawn", "forkserver"),
    "data.train.format": ("coco", "voc", "yolo"),
    "data.val.format": ("coco", "voc", "yolo"),
}


Range = tuple[typing.Callable[[Any], bool], str]  # (test of one value, what "must be" it fails)


def _at_least(low: float, why: str = "") -> Range:
    return (lambda value: value >= low), f">= {low}{why}"


def _above(low: float) -> Range:
    return (lambda value: value > low), f"> {low}"


def _within(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Range:
    """low <= value <= high, with either end open."""

    def test(value: float) -> bool:
        return (value > low if low_open else value >= low) and (value < high if high_open else value <= high)

    return test, f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


# The range of every numeric key; a list's range applies to each element. Written so that NaN fails
# every test; infinities fail the finiteness check that runs first. A new int / float field needs
# an entry here (tests/test_validation.py checks that).
RANGES: dict[str, Range] = {
    "model.num_classes": _at_least(1),
    "model.backbone.freeze_at": _within(0, 5),  # 5: stem and res2..res5, the whole backbone
    "model.fpn.channels": _at_least(1),
    "model.anchors.sizes": _above(0),
    "model.anchors.scales": _above(0),
    "model.anchors.aspect_ratios": _above(0),
    "model.head.num_convs": _at_least(0),
    "model.head.channels": _at_least(1),
    "model.head.prior_prob": _within(0, 1, low_open=True, high_open=True),  # -log((1 - pi) / pi)
    "model.matcher.fg_iou_thresh": _within(0, 1),
    "model.matcher.bg_iou_thresh": _within(0, 1),
    "model.matcher.crowd_ioa_thresh": _within(0, 1),
    # 1 - alpha weights the background: alpha > 1 makes the loss negative.
    "model.loss.focal_alpha": ((lambda value: value <= 1), "<= 1 (in [0, 1], or < 0 to disable alpha weighting)"),
    "model.loss.focal_gamma": _at_least(0),
    "model.loss.ohem_anchors_per_image": _at_least(1),
    "model.loss.ohem_fg_fraction": ((lambda value: value <= 1), "<= 1 (a fraction, or < 0 for no limit)"),
    "model.loss.ohem_nms_thresh": ((lambda value: True), "an IoU in (0, 1), or <= 0 / >= 1 for no NMS"),
    "model.loss.smooth_l1_beta": _at_least(0),
    "model.loss.box_weight": _at_least(0),
    "model.loss.normalizer_momentum": _within(0, 1, high_open=True),
    "model.box_coder.weights": _above(0),  # deltas are divided by them
    "model.box_coder.scale_clamp": _above(0),
    "model.inference.score_thresh": _within(0, 1, high_open=True),  # a sigmoid score never exceeds 1
    "model.inference.topk_candidates": _at_least(1),
    "model.inference.nms_thresh": _within(0, 1, low_open=True),
    "model.inference.detections_per_image": _at_least(1),
    "model.input.min_size_train": _at_least(1),
    "model.input.max_size_train": _at_least(1),
    "model.input.min_size_test": _at_least(1),
    "model.input.max_size_test": _at_least(1),
    "model.input.pixel_mean": ((lambda value: True), "a finite number"),
    "model.input.pixel_std": _above(0),  # images are divided by it
    "model.input.size_divisibility": _at_least(1),
    "data.synthetic.num_train": _at_least(1),
    "data.synthetic.num_val": _at_least(1),
    "data.synthetic.image_size": _at_least(16, " (make_synthetic's smallest image, px)"),
    "data.synthetic.seed": _at_least(0),
    "data.hflip_prob": _within(0, 1),
    "data.num_workers": _at_least(0),
    "solver.base_lr": _above(0),
    "solver.reference_batch_size": _at_least(1),
    "solver.ims_per_batch": _at_least(1),
    "solver.momentum": _within(0, 1, high_open=True),
    "solver.weight_decay": _at_least(0),
    "solver.weight_decay_norm": _at_least(0),
    "solver.weight_decay_bias": _at_least(0),
    "solver.betas": _within(0, 1, high_open=True),
    "solver.max_iter": _at_least(1),
    "solver.steps": _at_least(1),
    "solver.gamma": _above(0),
    "solver.warmup_iters": _at_least(0),
    "solver.warmup_factor": _within(0, 1, low_open=True),
    "solver.clip_grad_norm": _at_least(0),
    "train.seed": _at_least(0),
    "train.checkpoint_period": _at_least(1),  # iteration % period: 0 would divide by zero
    "train.eval_period": _at_least(0, " (0 evaluates only at the end)"),
    "train.log_period": _at_least(1),
    "train.keep_checkpoints": _at_least(1),
    "train.tb_images": _at_least(0, " (0 draws none)"),
}

# Lists whose length is fixed by what they describe.
LENGTHS: dict[str, tuple[int, str]] = {
    "model.anchors.sizes": (5, "one size per level P3-P7"),
    "model.box_coder.weights": (4, "(wx, wy, ww, wh)"),
    "model.input.pixel_mean": (3, "RGB"),
    "model.input.pixel_std": (3, "RGB"),
    "solver.betas": (2, "(beta1, beta2)"),
}


def _check_value(cfg: Config, source: str) -> None:
    """Allowed sets (CHOICES), list lengths (LENGTHS), ranges (RANGES) and cross-field checks."""

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{source}: {key}: {message}")

    for key, allowed in CHOICES.items():
        value = get_key(cfg, key)
        if value not in allowed:
            fail(key, f"{value!r} is not one of {list(allowed)}")
    for key, (length, meaning) in LENGTHS.items():
        if len(get_key(cfg, key)) != length:
            fail(key, f"needs {length} numbers, {meaning}, got {get_key(cfg, key)}")
    for key in ("model.anchors.scales", "model.anchors.aspect_ratios", "model.input.min_size_train"):
        if not get_key(cfg, key):
            fail(key, "needs a non-empty list")
    for key, (test, bound) in RANGES.items():
        value = get_key(cfg, key)
        items = [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
        for name, item in items:
            if not math.isfinite(item):
                fail(name, f"must be a finite number, got {item}")
            if not test(item):
                fail(name, f"must be {bound}, got {item}")
    m = cfg.model
    if m.matcher.bg_iou_thresh > m.matcher.fg_iou_thresh:
        fail(
            "model.matcher",
            f"need 0 <= bg_iou_thresh <= fg_iou_thresh <= 1, got bg={m.matcher.bg_iou_thresh} "
            f"fg={m.matcher.fg_iou_thresh}",
        )
    if m.head.norm == "gn" and m.head.channels % 32:
        fail("model.head.channels", f"GroupNorm(32) needs a multiple of 32, got {m.head.channels}")
    # The long side limit below the short side target would make every image smaller than asked.
    if m.input.max_size_train < max(m.input.min_size_train):
        fail("model.input.max_size_train", f"must be >= max(min_size_train) = {max(m.input.min_size_train)}, "
             f"got {m.input.max_size_train}")
    if m.input.max_size_test < m.input.min_size_test:
        fail("model.input.max_size_test", f"must be >= min_size_test = {m.input.min_size_test}, "
             f"got {m.input.max_size_test}")
    steps = cfg.solver.steps
    if any(later <= earlier for earlier, later in zip(steps, steps[1:])):
        fail("solver.steps", f"must be strictly increasing, got {steps}")


def schedule_warnings(solver: SolverConfig) -> list[str]:
    """What of the LR schedule a run of solver.max_iter iterations never reaches: LR steps at or
    after max_iter (the LR never drops there) and a warm-up as long as the run (the LR never reaches
    its full value). Not errors: a short debugging run may cut a schedule on purpose."""
    warnings = []
    beyond = [step for step in solver.steps if step >= solver.max_iter]
    if solver.scheduler == "multistep" and beyond:
        when = "never drops" if len(beyond) == len(solver.steps) else f"never drops at {beyond}"
        warnings.append(
            f"solver.steps={solver.steps} with solver.max_iter={solver.max_iter}: the LR {when} "
            f"(the iterations run are 0..{solver.max_iter - 1}); scale solver.steps to the run"
        )
    if solver.warmup_iters >= solver.max_iter:
        warnings.append(
            f"solver.warmup_iters={solver.warmup_iters} with solver.max_iter={solver.max_iter}: the warm-up "
            f"never ends (the LR never reaches solver.base_lr); set solver.warmup_iters below solver.max_iter"
        )
    return warnings


# ----------------------------------------------------------------------------------------------
# Loading.


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _keys_of(cls: type, prefix: str = "") -> list[str]:
    """All dotted keys of a dataclass schema, leaves and sections."""
    keys = []
    for name, hint in _field_types(cls).items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        if dataclasses.is_dataclass(hint):
            keys.extend(_keys_of(hint, dotted + "."))
    return keys


ALL_KEYS = _keys_of(Config)


def _suggest(key: str) -> str:
    """' did you mean ...' text: the same leaf under another section, else the closest key."""
    section, _, leaf = key.rpartition(".")
    close = [k for k in ALL_KEYS if k.rpartition(".")[2] == leaf][:1]
    if not close:
        siblings = [k.rpartition(".")[2] for k in ALL_KEYS if k.rpartition(".")[0] == section]
        close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.3)
        close = [f"{section}.{close[0]}" if section else close[0]] if close else []
    if not close:
        close = difflib.get_close_matches(key, ALL_KEYS, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Return value converted to the schema type `hint`, or raise ConfigError naming the key."""

    def bad() -> ConfigError:
        name = getattr(hint, "__name__", str(hint))
        return ConfigError(f"{source}: {key}: expected {name}, got {value!r} ({type(value).__name__})")

    origin = typing.get_origin(hint)
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad()
        return [_coerce(v, item_hint, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported schema type {hint} for {key}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if hint is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        raise bad()
    raise TypeError(f"unsupported schema type {hint} for {key}")


def _apply(obj: Any, data: dict, prefix: str, source: str) -> None:
    """Write the mapping `data` into the dataclass instance `obj`, checking every key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or '<root>'}: expected a mapping, got {data!r}")
    hints = _field_types(type(obj))
    for name, value in data.items():
        dotted = f"{prefix}{name}"
        if name not in hints:
            raise ConfigError(f"{source}: unknown key '{dotted}'{_suggest(dotted)}")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            _apply(getattr(obj, name), value, dotted + ".", source)
        else:
            setattr(obj, name, _coerce(value, hint, dotted, source))


def merge(base: dict, child: dict) -> dict:
    """`base` with `child`'s keys replacing its own; nested mappings merge key by key."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true / false. YAML 1.1 also reads on / off / yes / no as
    booleans, which would turn `solver.amp=off` into False."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str) -> Any:
    """YAML text parsed as YAML 1.2 (only true/false are booleans: `no`, `on`, `off` stay strings),
    for configs and every other YAML file a user gives (e.g. a YOLO data.yaml)."""
    return yaml.load(text, Loader=_Yaml12Loader)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML file and resolve its `_base_` chain into one mapping."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: _base_ cycle: {' -> '.join(str(p) for p in seen + (path,))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    return merge(_read_yaml(_base_path(path, base), seen + (path,)), data)


def _base_path(path: Path, base: Any) -> Path:
    """The file that `_base_: base` in the config file `path` names: relative to `path`'s folder,
    else a packaged config of that name (a user's file may build on `quickstart.yaml`)."""
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: _base_: expected a config file name, got {base!r}")
    local = Path(base) if Path(base).is_absolute() else path.parent / base
    if local.is_file():
        return local
    packaged = _packaged_config(Path(base))
    if packaged is not None:
        return packaged
    raise ConfigError(
        f"{path}: _base_: {base} not found (neither {local} nor one of the packaged configs: "
        f"{', '.join(packaged_configs())})"
    )


def parse_override(override: str) -> dict:
    """'a.b.c=VALUE' -> {'a': {'b': {'c': yaml(VALUE)}}}; VALUE itself for a string key (see the
    module docstring): a path or name may hold ' #', be all digits, or be '~' or 'null'."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. solver.base_lr=0.02")
    key, raw = override.split("=", 1)
    key = key.strip()
    try:
        if _schema_type(key) is str and not _is_quoted(raw):
            value = raw
        else:
            value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: value is not valid YAML: {err}") from None
    nested: dict = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def _schema_type(dotted: str) -> Any:
    """The schema's type of a dotted key (str, int, list[float], a section's dataclass); None for
    an unknown key, which _apply reports with a suggestion."""
    hint: Any = Config
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(hint):
            return None
        hint = _field_types(hint).get(part)
    return hint


def _is_quoted(raw: str) -> bool:
    """Whether an override's value is a quoted YAML string ('...' or "..."), to be unquoted."""
    text = raw.strip()
    return len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    """Build a checked Config from a plain nested mapping (e.g. one saved in a checkpoint)."""
    cfg = Config()
    _apply(cfg, data, "", source)
    _check_value(cfg, source)
    return cfg


PACKAGED_CONFIGS = "retinanet.configs"  # the repository's configs/, shipped inside the package


def packaged_configs() -> list[str]:
    """Names of the configs shipped with the package, e.g. ['quickstart.yaml', ...]."""
    root = importlib.resources.files(PACKAGED_CONFIGS)
    return sorted(
        f"{folder.name}/{entry.name}" if folder != root else entry.name
        for folder in [root, *(d for d in root.iterdir() if d.is_dir())]
        for entry in folder.iterdir()
        if entry.name.endswith(".yaml")
    )


def find_config_file(path: str | Path) -> Path:
    """The YAML file a user means by `path`: the file itself when it exists, else the packaged config
    of that name (`configs/quickstart.yaml`, `quickstart.yaml` and `quickstart` all name it), so
    the README's commands work from any folder after `pip install retinanet`.

    Raises:
        ConfigError: neither exists; lists the packaged configs.
    """
    path = Path(path)
    if path.is_file():
        return path
    packaged = _packaged_config(path)
    if packaged is not None:
        return packaged
    raise ConfigError(
        f"config file not found: {path} (neither a file nor one of the packaged configs: "
        f"{', '.join(packaged_configs())})"
    )


def _packaged_config(path: Path) -> Path | None:
    """The packaged config a relative `path` names (`configs/quickstart.yaml`, `quickstart.yaml`,
    `quickstart`), None if there is none."""
    parts = path.parts
    if "configs" in parts:  # configs/x.yaml, ../configs/ablations/y.yaml
        parts = parts[len(parts) - parts[::-1].index("configs"):]
    if parts and not parts[-1].endswith((".yaml", ".yml")):
        parts = (*parts[:-1], parts[-1] + ".yaml")
    if parts and not path.is_absolute():
        packaged = importlib.resources.files(PACKAGED_CONFIGS).joinpath(*parts)
        if packaged.is_file():
            return Path(str(packaged))
    return None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (with `_base_` inheritance), apply KEY=VALUE overrides, check it all.

    Args:
        path: the YAML file (or the name of a packaged config, see find_config_file); None starts
            from the schema's defaults.
        overrides: dotted ``key=value`` strings, applied in order after the file.
    """
    cfg = Config()
    if path is not None:
        _apply(cfg, _read_yaml(find_config_file(path)), "", str(path))
    for override in overrides:
        _apply(cfg, parse_override(override), "", f"override {override!r}")
    source = str(path) if path is not None else "<defaults>"
    _check_value(cfg, source)
    return cfg


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts/lists (for YAML dumps and checkpoints)."""
    return dataclasses.asdict(cfg)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """A nested mapping (e.g. to_dict(cfg)) as {dotted key: leaf value}, in its order."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def get_key(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node
