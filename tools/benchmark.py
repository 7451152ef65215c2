"""Time our RetinaNet against torchvision's, side by side, in one run.

Four measurements, each ours against torchvision's ``RetinaNet`` with the same ResNet backbone and
the same images, targets and (for the components) the same head outputs:

1. train: forward + backward + SGD step; frozen BN and the same freeze on both sides (torchvision's
   trainable_layers=3 is our freeze_at=2), 80 classes, 50 boxes per image; an extra row runs ours in
   channels_last (what ``train.channels_last`` does);
2. inference: eval forward under no_grad (plus ours in channels_last);
3. loss: matching + loss alone, our ``model.criterion`` against exactly what torchvision's
   ``RetinaNet.compute_loss`` does (per-image box_iou + Matcher loop, then ``head.compute_loss``),
   on the anchors of a COCO-sized batch with trained-like logits; ``loss_backward`` adds the
   backward pass to the logits and deltas;
4. postprocess: our ``model.postprocessor`` against ``RetinaNet.postprocess_detections`` on the same
   trained-like outputs (a few hundred candidates per image above the 0.05 threshold, so NMS works).

Our model is built from ``--config`` (default configs/torchvision_r50_fpn.yaml: torchvision's choices,
so both sides do the same work) and loaded with the torchvision model's weights through
retinanet.convert where the layouts agree. Repetitions of ours and theirs are interleaved, the order
rotating every round, so that a noisy machine slows both alike; the table gives medians and the
ratio ours / torchvision.

    python tools/benchmark.py                               # CPU defaults: 512x512, batch 2
    python tools/benchmark.py --device cuda                 # GPU defaults: 800x1333, batch 2
    python tools/benchmark.py --only loss postprocess --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet as TorchvisionRetinaNet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import _default_anchorgen
from torchvision.ops import FrozenBatchNorm2d, box_iou
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmark this checkout, not an installed copy

from retinanet import build_model, load_config  # noqa: E402
from retinanet.convert import convert_torchvision_state_dict  # noqa: E402

BENCHMARKS = ("train", "inference", "loss", "postprocess")
# The project's targets for ours / torchvision on CPU; the channels_last rows aim lower.
TARGETS = {
    "train": 1.0, "train_channels_last": 0.85, "inference": 1.0, "inference_channels_last": 0.85,
    "loss": 0.3, "loss_backward": 0.3, "postprocess": 0.3,
}
TORCHVISION_SIZE_DIVISIBLE = 32  # GeneralizedRCNNTransform pads the batch to a multiple of this
ANCHORS_PER_OBJECT = 10  # trained-like outputs: anchors per ground-truth box that score high


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--depth", type=int, default=50, choices=(18, 34, 50, 101, 152), help="ResNet depth")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="image size of train / inference (default: 512 512 on cpu, 800 1333 on cuda)")
    parser.add_argument("--batch", type=int, default=2, help="images per batch, every benchmark")
    parser.add_argument("--iters", type=int, help="timed rounds of train / inference (default: 5 cpu, 20 cuda)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing, every benchmark")
    parser.add_argument("--component-size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"),
                        help="image size whose anchors loss and postprocess use (default: COCO's 800 1333)")
    parser.add_argument("--component-iters", type=int, default=10, help="timed rounds of loss / postprocess")
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--boxes-per-image", type=int, default=50)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch intra-op threads (default: all cores this process may use)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "torchvision_r50_fpn.yaml"),
                        help="our model's config (default: the one with torchvision's choices)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--no-channels-last", action="store_true", help="skip the channels_last rows")
    parser.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off",
                        help="autocast both models' forward in train / inference (as solver.amp does)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", help="also write the environment and results to this file")
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = (512, 512) if args.device == "cpu" else (800, 1333)
    if args.iters is None:
        args.iters = 5 if args.device == "cpu" else 20
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args


# ----------------------------------------------------------------------------------------------
# Models and inputs.


def make_torchvision_model(depth: int, num_classes: int, size: tuple[int, int]) -> TorchvisionRetinaNet:
    """torchvision's retinanet_resnet50_fpn (v1) layout at any depth, random init.

    The frozen BN buffers get pretrained-like values (weight, bias, mean ~ default + N(0, 0.1),
    var ~ U(0.5, 1.5)): with the defaults (1, 0, 0, 1) every BN is an identity, which no ImageNet
    checkpoint has, and CPU timings differ. min_size / max_size equal the image size, so its
    transform does not resize (nor does ours).
    """
    resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=FrozenBatchNorm2d)
    generator = torch.Generator().manual_seed(0)
    for module in resnet.modules():
        if isinstance(module, FrozenBatchNorm2d):
            for buffer in (module.weight, module.bias, module.running_mean):
                buffer.add_(torch.randn(buffer.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    backbone = _resnet_fpn_extractor(  # v1: P6 from P5 (256 channels in)
        resnet, trainable_layers=3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
    )
    return TorchvisionRetinaNet(
        backbone, num_classes, min_size=min(size), max_size=max(size), anchor_generator=_default_anchorgen()
    )


def make_our_model(config: str, tv_model: TorchvisionRetinaNet, depth: int, num_classes: int,
                   size: tuple[int, int]) -> tuple[nn.Module, bool]:
    """Our model from `config`, sized like torchvision's, with its weights where the layouts agree.

    Returns the model and whether torchvision's weights were loaded.
    """
    overrides = [
        f"model.backbone.depth={depth}", "model.backbone.weights=''", "model.backbone.norm=frozen_bn",
        "model.backbone.freeze_at=2", f"model.num_classes={num_classes}",
        f"model.input.min_size_train=[{min(size)}]", f"model.input.max_size_train={max(size)}",
        f"model.input.min_size_test={min(size)}", f"model.input.max_size_test={max(size)}",
    ]
    model = build_model(load_config(config, overrides))
    state, _ = convert_torchvision_state_dict(tv_model.state_dict())
    try:
        model.load_state_dict(state)
    except RuntimeError:  # another layout (e.g. P6 from C5): keep our own random init
        return model, False
    return model, True


def random_boxes(num: int, height: int, width: int, generator: torch.Generator) -> Tensor:
    """(num, 4) xyxy pixel boxes of COCO-like sizes: sqrt(area) log-uniform in 8 .. 0.8 * short side."""
    side = torch.empty(num).uniform_(math.log(8.0), math.log(0.8 * min(height, width)), generator=generator).exp()
    aspect = torch.empty(num).uniform_(math.log(0.5), math.log(2.0), generator=generator).exp()  # h / w
    box_w = (side / aspect.sqrt()).clamp(max=width - 1)
    box_h = (side * aspect.sqrt()).clamp(max=height - 1)
    x0 = torch.rand(num, generator=generator) * (width - box_w)
    y0 = torch.rand(num, generator=generator) * (height - box_h)
    return torch.stack([x0, y0, x0 + box_w, y0 + box_h], dim=1)


def make_targets(batch: int, size: tuple[int, int], num_boxes: int, num_classes: int,
                 generator: torch.Generator, device: torch.device) -> list[dict[str, Tensor]]:
    """Per image {"boxes": (num_boxes, 4) xyxy pixels, "labels": (num_boxes,) int64}."""
    return [
        {"boxes": random_boxes(num_boxes, *size, generator).to(device),
         "labels": torch.randint(num_classes, (num_boxes,), generator=generator).to(device)}
        for _ in range(batch)
    ]


def grid_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """(H, W) of P3..P7 for a padded (height, width) batch: every stride-2 layer rounds up."""
    sizes = []
    for level in range(1, 8):
        height, width = math.ceil(height / 2), math.ceil(width / 2)
        if level >= 3:
            sizes.append((height, width))
    return sizes


def trained_like_head_outputs(anchors: Tensor, targets: list[dict[str, Tensor]], num_classes: int,
                              generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Logits and deltas distributed like a trained detector's.

    Background logits ~ N(-8, 1) (p ~ 3e-4, essentially never above 0.05). The 10 anchors of highest
    IoU with each ground-truth box get logit ~ N(-1.5, 1.5) for its class (p > 0.05 for ~80% of
    them): a few hundred clustered, overlapping candidates per image, so NMS does real work.
    Deltas ~ N(0, 0.1).

    Returns:
        (B, A, K) logits and (B, A, 4) deltas on the anchors' device.
    """
    device = anchors.device
    logits = torch.randn(len(targets), anchors.shape[0], num_classes, generator=generator).to(device) - 8.0
    for image, target in enumerate(targets):
        hot = box_iou(target["boxes"], anchors).topk(ANCHORS_PER_OBJECT, dim=1).indices  # (M, 10)
        hot_logits = torch.randn(hot.shape, generator=generator).to(device) * 1.5 - 1.5
        logits[image, hot, target["labels"][:, None].expand_as(hot)] = hot_logits
    deltas = (torch.randn(len(targets), anchors.shape[0], 4, generator=generator) * 0.1).to(device)
    return logits, deltas


# ----------------------------------------------------------------------------------------------
# Timing.


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(cases: dict[str, Callable[[], object]], warmup: int, iters: int,
                     device: torch.device) -> dict[str, dict[str, list[float]]]:
    """Run every case once per round, the order rotating each round.

    Returns per case {"wall": [...], "cpu": [...]}: per timed round, ms of wall clock (perf_counter)
    and of this process's CPU time (all threads). The CPU time leaves out the waits for a core on a
    shared machine (not the slow-down from shared caches and memory bandwidth): a second view.
    """
    names = list(cases)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for round_idx in range(warmup + iters):
        shift = round_idx % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            cases[name]()
            synchronize(device)
            if round_idx >= warmup:
                times[name]["wall"].append((time.perf_counter() - start) * 1e3)
                times[name]["cpu"].append((time.process_time() - start_cpu) * 1e3)
    return times


def row(name: str, times: dict[str, dict[str, list[float]]], ours: str, theirs: str, note: str = "") -> dict:
    """One result: medians of case `ours` and case `theirs` and their ratios."""
    median = {case: {kind: statistics.median(values) for kind, values in times[case].items()} for case in (ours, theirs)}
    return {
        "name": name,
        "ours_ms": median[ours]["wall"],
        "torchvision_ms": median[theirs]["wall"],
        "ratio": median[ours]["wall"] / median[theirs]["wall"],
        "cpu_time_ratio": median[ours]["cpu"] / median[theirs]["cpu"],
        "target": TARGETS.get(name),
        "ours_rounds_ms": times[ours]["wall"],
        "torchvision_rounds_ms": times[theirs]["wall"],
        "note": note,
    }


# ----------------------------------------------------------------------------------------------
# Training step and inference.


def end_to_end_models(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, nn.Module], bool]:
    """{"torchvision", "ours"[, "ours_channels_last"]} with the same weights where the layouts agree."""
    torch.manual_seed(args.seed)
    tv_model = make_torchvision_model(args.depth, args.num_classes, args.size)
    ours, same_weights = make_our_model(args.config, tv_model, args.depth, args.num_classes, args.size)
    models = {"torchvision": tv_model.to(device), "ours": ours.to(device)}
    if not args.no_channels_last:
        ours_cl, _ = make_our_model(args.config, tv_model, args.depth, args.num_classes, args.size)
        ours_cl.load_state_dict(ours.state_dict())
        models["ours_channels_last"] = ours_cl.to(device, memory_format=torch.channels_last)
    return models, same_weights


def autocast(device: torch.device, amp: str):
    """The forward's autocast context for --amp."""
    if amp == "off":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def training_step(model: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]],
                  device: torch.device, amp: str) -> Callable[[], None]:
    """A closure running one SGD step of `model` (ours or torchvision's) on a fixed batch."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9,
                                weight_decay=1e-4)
    model.train()

    def step() -> None:
        with autocast(device, amp):
            losses = model(images, [dict(t) for t in targets])  # both sides copy what they rescale
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def benchmark_end_to_end(args: argparse.Namespace, device: torch.device, which: str) -> list[dict]:
    """Rows `which` ("train" or "inference") and `which`_channels_last."""
    models, same_weights = end_to_end_models(args, device)
    generator = torch.Generator().manual_seed(args.seed + 1)
    images = [torch.rand(3, *args.size, generator=generator).to(device) for _ in range(args.batch)]
    targets = make_targets(args.batch, args.size, args.boxes_per_image, args.num_classes, generator, device)
    note = "same weights" if same_weights else "ours: own random init (its config's layout differs from torchvision's)"
    if args.amp != "off":
        note += f"; both under {args.amp} autocast"

    if which == "train":
        trainable = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in models.items()}
        if trainable["ours"] != trainable["torchvision"]:
            note += f"; trainable parameters differ: {trainable}"
        cases = {name: training_step(model, images, targets, device, args.amp) for name, model in models.items()}
        times = time_interleaved(cases, args.warmup, args.iters, device)
    else:
        detections = {}

        def inference(name: str, model: nn.Module) -> Callable[[], None]:
            model.eval()

            def run() -> None:
                with torch.no_grad(), autocast(device, args.amp):
                    detections[name] = model(images)

            return run

        times = time_interleaved({n: inference(n, m) for n, m in models.items()}, args.warmup, args.iters, device)
        per_image = {n: sum(d["scores"].numel() for d in dets) / len(dets) for n, dets in detections.items()}
        note += f"; detections/image ours {per_image['ours']:.0f}, torchvision {per_image['torchvision']:.0f}"
    rows = [row(which, times, "ours", "torchvision", note)]
    if "ours_channels_last" in times:
        rows.append(row(f"{which}_channels_last", times, "ours_channels_last", "torchvision", "ours in channels_last"))
    return rows


# ----------------------------------------------------------------------------------------------
# Matching + loss and post-processing.


@dataclass
class ComponentInputs:
    """One COCO-sized padded batch, seen by both sides."""

    tv_model: TorchvisionRetinaNet
    ours: nn.Module
    grid_sizes: list[tuple[int, int]]  # (H, W) of P3..P7
    image_sizes: list[tuple[int, int]]  # (h, w) of each image inside the padded batch
    ours_anchors: Tensor  # (A, 4) xyxy, from our AnchorGenerator
    tv_anchors: list[Tensor]  # per image (A, 4) xyxy, from torchvision's AnchorGenerator
    targets: list[dict[str, Tensor]]  # per image {"boxes": (50, 4) xyxy pixels, "labels": (50,)}
    cls_logits: Tensor  # (B, A, K), trained-like
    box_deltas: Tensor  # (B, A, 4)

    @property
    def anchors_per_level(self) -> list[int]:
        return [h * w * self.ours.anchor_generator.num_anchors_per_location for h, w in self.grid_sizes]


def component_inputs(args: argparse.Namespace, device: torch.device) -> ComponentInputs:
    """Each side's anchors for a `--component-size` batch padded as torchvision pads it."""
    torch.manual_seed(args.seed)
    tv_model = make_torchvision_model(args.depth, args.num_classes, args.component_size).to(device)
    ours, _ = make_our_model(args.config, tv_model, args.depth, args.num_classes, args.component_size)
    ours = ours.to(device)
    height, width = (math.ceil(s / TORCHVISION_SIZE_DIVISIBLE) * TORCHVISION_SIZE_DIVISIBLE for s in args.component_size)
    grids = grid_sizes(height, width)
    image_sizes = [tuple(args.component_size)] * args.batch

    ours_anchors = ours.anchor_generator(grids).to(device)
    image_list = ImageList(torch.empty(args.batch, 3, height, width, device=device), image_sizes)
    features = [torch.empty(args.batch, 1, h, w, device=device) for h, w in grids]  # only their shapes count
    tv_anchors = tv_model.anchor_generator(image_list, features)
    if ours_anchors.shape != tv_anchors[0].shape:
        raise RuntimeError(f"anchor counts differ: ours {tuple(ours_anchors.shape)}, torchvision {tuple(tv_anchors[0].shape)}")

    generator = torch.Generator().manual_seed(args.seed + 2)
    targets = make_targets(args.batch, args.component_size, args.boxes_per_image, args.num_classes, generator, device)
    cls_logits, box_deltas = trained_like_head_outputs(ours_anchors, targets, args.num_classes, generator)
    return ComponentInputs(tv_model, ours, grids, image_sizes, ours_anchors, tv_anchors, targets, cls_logits, box_deltas)


def benchmark_loss(args: argparse.Namespace, device: torch.device, inputs: ComponentInputs) -> list[dict]:
    """Rows "loss" (forward) and "loss_backward" (forward + gradients of logits and deltas)."""
    values = {}

    def loss_case(name: str, backward: bool) -> Callable[[], None]:
        def run() -> None:
            cls = inputs.cls_logits.detach().requires_grad_(backward)
            box = inputs.box_deltas.detach().requires_grad_(backward)
            if name == "ours":
                losses = inputs.ours.criterion(cls, box, inputs.ours_anchors, inputs.targets)
            else:  # exactly RetinaNet.compute_loss: the per-image Matcher loop, then head.compute_loss
                head_outputs = {"cls_logits": cls, "bbox_regression": box}
                losses = inputs.tv_model.compute_loss(inputs.targets, head_outputs, inputs.tv_anchors)
            values[name] = [value.item() for value in losses.values()]
            if backward:
                torch.autograd.grad(sum(losses.values()), [cls, box])

        return run

    inputs.ours.criterion.train()
    rows = []
    for backward in (False, True):
        cases = {name: loss_case(name, backward) for name in ("ours", "torchvision")}
        with torch.set_grad_enabled(backward):
            times = time_interleaved(cases, args.warmup, args.component_iters, device)
        (p3_h, p3_w) = inputs.grid_sizes[0]
        note = (f"{inputs.ours_anchors.shape[0]} anchors/image ({p3_h * 8}x{p3_w * 8} padded); loss cls, box: "
                f"ours {values['ours'][0]:.4f}, {values['ours'][1]:.4f}; "
                f"torchvision {values['torchvision'][0]:.4f}, {values['torchvision'][1]:.4f}")
        rows.append(row("loss_backward" if backward else "loss", times, "ours", "torchvision", note))
    return rows


def benchmark_postprocess(args: argparse.Namespace, device: torch.device, inputs: ComponentInputs) -> list[dict]:
    """Row "postprocess": per-level outputs and anchors split outside the timed calls, as both models do."""
    counts = inputs.anchors_per_level
    cls_per_level = list(inputs.cls_logits.split(counts, 1))
    box_per_level = list(inputs.box_deltas.split(counts, 1))
    ours_anchors_per_level = list(inputs.ours_anchors.split(counts))
    tv_anchors_per_image = [list(a.split(counts)) for a in inputs.tv_anchors]
    tv_head_outputs = {"cls_logits": cls_per_level, "bbox_regression": box_per_level}
    detections = {}

    def ours() -> None:
        detections["ours"] = inputs.ours.postprocessor(
            cls_per_level, box_per_level, ours_anchors_per_level, inputs.image_sizes
        )

    def torchvision_() -> None:
        detections["torchvision"] = inputs.tv_model.postprocess_detections(
            tv_head_outputs, tv_anchors_per_image, inputs.image_sizes
        )

    with torch.no_grad():
        times = time_interleaved({"ours": ours, "torchvision": torchvision_}, args.warmup, args.component_iters, device)
    score_thresh = inputs.tv_model.score_thresh
    candidates = (torch.sigmoid(inputs.cls_logits) > score_thresh).sum().item() / args.batch
    per_image = {n: sum(d["scores"].numel() for d in dets) / len(dets) for n, dets in detections.items()}
    note = (f"{candidates:.0f} candidates/image above {score_thresh}; detections/image "
            f"ours {per_image['ours']:.0f}, torchvision {per_image['torchvision']:.0f}")
    return [row("postprocess", times, "ours", "torchvision", note)]


# ----------------------------------------------------------------------------------------------
# Report.


def environment(args: argparse.Namespace, device: torch.device) -> dict:
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.is_file():
            names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                     if line.startswith("model name")]
            device_name = names[0] if names else device_name
        device_name = f"{device_name}, {len(os.sched_getaffinity(0))} cores available"
    return {
        "command": shlex.join(["python"] + sys.argv),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": f"{device.type}: {device_name}",
        "threads": torch.get_num_threads(),
        "depth": args.depth,
        "batch": args.batch,
        "size": list(args.size),
        "component_size": list(args.component_size),
        "iters": args.iters,
        "component_iters": args.component_iters,
        "warmup": args.warmup,
        "config": os.path.relpath(args.config, ROOT),
    }


def format_table(env: dict, rows: list[dict]) -> str:
    lines = [
        f"$ {env['command']}",
        f"torch {env['torch']}, torchvision {env['torchvision']}, python {env['python']}; {env['device']}; "
        f"{env['threads']} thread{'s' if env['threads'] != 1 else ''}",
        f"ResNet-{env['depth']}, batch {env['batch']}; train / inference {env['size'][0]}x{env['size'][1]}, "
        f"{env['iters']} timed rounds; loss / postprocess {env['component_size'][0]}x{env['component_size'][1]}, "
        f"{env['component_iters']} timed rounds; {env['warmup']} warm-up rounds; our config {env['config']}",
    ]
    header = f"{'benchmark':<26}{'ours ms':>10}{'tv ms':>10}{'ours/tv':>9}{'(cpu time)':>11}{'target':>8}  status"
    lines += ["", header, "-" * len(header)]
    for r in rows:
        target = r["target"]
        status = "" if target is None else ("ok" if round(r["ratio"], 2) <= target else "MISS")
        lines.append(f"{r['name']:<26}{r['ours_ms']:>10.1f}{r['torchvision_ms']:>10.1f}{r['ratio']:>9.2f}"
                     f"{r['cpu_time_ratio']:>11.2f}{'' if target is None else f'{target:.2f}':>8}  {status}")
    lines.append("ms: median wall clock; ours/tv: ratio of the medians, compared (at 2 decimals) with the target; "
                 "(cpu time): the same ratio for process CPU time")
    lines.append("")
    lines += [f"{r['name']}: {r['note']}" for r in rows if r["note"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as in training; the warm-up rounds absorb the autotuning
    env = environment(args, device)
    rows: list[dict] = []
    for which in ("train", "inference"):
        if which in args.only:
            rows += benchmark_end_to_end(args, device, which)
    if "loss" in args.only or "postprocess" in args.only:
        inputs = component_inputs(args, device)
        if "loss" in args.only:
            rows += benchmark_loss(args, device, inputs)
        if "postprocess" in args.only:
            rows += benchmark_postprocess(args, device, inputs)
    print(format_table(env, rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
