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

A separate mode, --data-scale, measures the data pipeline at COCO's size instead (issue 14): it
writes COCO-like annotation files (train2017's 118,287 images and ~860k boxes with 12-point
polygons, val2017's 5,000 images) and image files, then reports the start-up time and memory of
the training and validation datasets, their pickled size and the memory of the training loader's
workers (RSS, PSS, USS from /proc: Linux only).

    python tools/benchmark.py                               # CPU defaults: 512x512, batch 2
    python tools/benchmark.py --device cuda                 # GPU defaults: 800x1333, batch 2
    python tools/benchmark.py --only loss postprocess --threads 1 --json out.json
    python tools/benchmark.py --data-scale --data-dir /tmp/coco_like   # ~330 MB of json, a few GB of memory
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import multiprocessing
import os
import pickle
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.models.detection import RetinaNet as TorchvisionRetinaNet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import _default_anchorgen
from torchvision.ops import FrozenBatchNorm2d, box_iou
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmark this checkout, not an installed copy

from retinanet import build_model, load_config  # noqa: E402
from retinanet.config import DataConfig  # noqa: E402
from retinanet.convert import convert_torchvision_state_dict  # noqa: E402
from retinanet.data import CocoDetection, build_eval_transforms, build_train_loader, build_train_transforms  # noqa: E402
from retinanet.data.loader import worker_context  # noqa: E402
from retinanet.engine.trainer import train  # noqa: E402
from retinanet.inference import compile_for_inference  # noqa: E402
from retinanet.modeling.anchors import feature_grid_sizes  # noqa: E402

BENCHMARKS = ("train", "inference", "loss", "postprocess")
# The project's targets for ours / torchvision on CPU; the channels_last rows aim lower.
TARGETS = {
    "train": 1.0, "train_channels_last": 0.85, "inference": 1.0, "inference_channels_last": 0.85,
    "loss": 0.3, "loss_backward": 0.3, "postprocess": 0.3,
}
# Issue 10's GPU targets (R50-FPN 800x1333, bf16): rows of --inference-batches 1 8, both --candidates.
# The compiled path's batch-1 target is absolute (<= 10 ms), printed in its note.
GPU_TARGETS = {
    "inference_batch8": 0.6, "inference_dense_batch8": 0.6, "inference_batch1": 0.85, "inference_dense_batch1": 0.85,
    "loss_backward": 0.3,
}
COMPILED_LATENCY_TARGET_MS = 10.0
# --candidates for the inference rows: (anchor, class) pairs per image above the score threshold,
# trained (as the trained-like component inputs) or a fraction of all pairs, dense (as dense_head_outputs).
TRAINED_PAIRS_PER_IMAGE = 420
DENSE_PAIR_FRACTION = 0.09
DELTA_STD = 0.1  # box deltas of the inference rows, as the trained-like component inputs
COMPILED_FIRST_CALLS = 3  # untimed calls of the compiled model whose times are reported: compile, CUDA graph warm-up, record
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
    parser.add_argument("--candidates", choices=("trained", "dense"), default="trained",
                        help="head outputs of the postprocess and inference rows: trained-like (a few hundred "
                             "candidates per image) or dense, an untrained model's (thousands per image over many "
                             "classes); the inference rows get them by a shift of both models' class-logit bias")
    parser.add_argument("--compile", action="store_true",
                        help="add inference_compiled rows: ours through the low-latency path "
                             "(retinanet.inference.compile_for_inference), with its compile time; GPU only unless "
                             "--compile-backend forces a backend")
    parser.add_argument("--compile-backend", metavar="NAME",
                        help="torch.compile backend of --compile (default: inductor with CUDA graphs on a GPU; "
                             "on the CPU the path stays eager unless this is set, e.g. inductor or aot_eager)")
    parser.add_argument("--inference-batches", type=int, nargs="+", metavar="B",
                        help="inference rows at these batch sizes (default: --batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", help="also write the environment and results to this file")
    data = parser.add_argument_group(
        "COCO-scale data loading (--data-scale; instead of the model benchmarks)",
        "Generates COCO-like train/val annotation files with polygons and their image files (hard links "
        "to four JPEGs), then measures dataset start-up, memory, pickled size and worker memory.",
    )
    data.add_argument("--data-scale", action="store_true", help="run this benchmark instead of the model ones")
    data.add_argument("--e2e", action="store_true",
                      help="instead of the model benchmarks: images/second of `retinanet train` (the trainer, "
                           "its DataLoader workers and JPEG decoding) on --data-images generated JPEGs, with "
                           "--depth, --batch, --amp, --device, --data-workers and --config")
    data.add_argument("--e2e-iters", type=int, default=60, help="--e2e: training iterations (the first log period "
                                                                "is warm-up)")
    data.add_argument("--e2e-size", type=int, nargs=2, metavar=("MIN", "MAX"),
                      help="--e2e: short side and long-side limit of the training images (default: the config's)")
    data.add_argument("--data-images", type=int, default=COCO_IMAGES["train"],
                      help="training images (default: COCO train2017's 118287); val gets 5000 per 118287")
    data.add_argument("--data-dir", metavar="DIR",
                      help="keep the generated files here and reuse them on the next run (default: a temporary folder)")
    data.add_argument("--data-workers", type=int, default=4, help="DataLoader workers of the training loader")
    data.add_argument("--data-batches", type=int, default=200, help="batches drawn before the workers' memory is read")
    data.add_argument("--data-batch", type=int, default=2, help="images per batch (16 images over 8 GPUs: 2)")
    data.add_argument("--start-method", default="auto", choices=("auto", "fork", "spawn", "forkserver"),
                      help="the workers' start method (data.start_method)")
    args = parser.parse_args(argv)
    if args.data_scale and min(args.data_images, args.data_workers, args.data_batches, args.data_batch) < 1:
        parser.error("--data-images, --data-workers, --data-batches and --data-batch must be >= 1")
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


def dense_head_outputs(anchors: Tensor, batch: int, num_classes: int,
                       generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Logits and deltas of an untrained or early model: every logit ~ N(-4, 0.8), around the pi =
    0.01 prior, so ~9% of all (anchor, class) pairs pass 0.05: each level's top-1000 fills up,
    thousands of candidates per image spread over every class (where per-class NMS loops cost most)."""
    logits = (torch.randn(batch, anchors.shape[0], num_classes, generator=generator) * 0.8 - 4.0).to(anchors.device)
    deltas = (torch.randn(batch, anchors.shape[0], 4, generator=generator) * 0.1).to(anchors.device)
    return logits, deltas


def peak_memory_mib(device: torch.device) -> float | None:
    """The allocator's peak since its last reset, MiB (CUDA only; None on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def time_interleaved(cases: dict[str, Callable[[], object]], warmup: int, iters: int,
                     device: torch.device) -> dict[str, dict[str, list[float]]]:
    """Run every case once per round, the order rotating each round.

    Returns per case {"wall": [...], "cpu": [...]}: per timed round, ms of wall clock (perf_counter)
    and of this process's CPU time (all threads). The CPU time leaves out the waits for a core on a
    shared machine (not the slow-down from shared caches and memory bandwidth): a second view.
    """
    names = list(cases)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": [], "peak_mib": []} for name in names}
    for round_idx in range(warmup + iters):
        shift = round_idx % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            cases[name]()
            synchronize(device)
            if round_idx >= warmup:
                times[name]["wall"].append((time.perf_counter() - start) * 1e3)
                times[name]["cpu"].append((time.process_time() - start_cpu) * 1e3)
                peak = peak_memory_mib(device)
                if peak is not None:
                    times[name]["peak_mib"].append(peak)
    return times


def row(name: str, times: dict[str, dict[str, list[float]]], ours: str, theirs: str, note: str = "") -> dict:
    """One result: medians of case `ours` and case `theirs` and their ratios."""
    median = {
        case: {kind: statistics.median(values) if values else None for kind, values in times[case].items()}
        for case in (ours, theirs)
    }
    return {
        "name": name,
        "ours_ms": median[ours]["wall"],
        "torchvision_ms": median[theirs]["wall"],
        "ratio": median[ours]["wall"] / median[theirs]["wall"],
        "cpu_time_ratio": median[ours]["cpu"] / median[theirs]["cpu"],
        "ours_peak_mib": median[ours]["peak_mib"],
        "torchvision_peak_mib": median[theirs]["peak_mib"],
        "target": None,  # set by main() once the row has its final name
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


def class_logits_layer(model: nn.Module) -> nn.Conv2d:
    """The last convolution of the class subnet (its bias sets the scores' overall level)."""
    if isinstance(model, TorchvisionRetinaNet):
        return model.head.classification_head.cls_logits
    return model.head.cls_logits


def box_deltas_layer(model: nn.Module) -> nn.Conv2d:
    """The last convolution of the box subnet."""
    if isinstance(model, TorchvisionRetinaNet):
        return model.head.regression_head.bbox_reg
    return model.head.box_deltas


@torch.no_grad()
def head_layer_outputs(model: nn.Module, images: list[Tensor], device: torch.device, amp: str,
                    layer: Callable[[nn.Module], nn.Conv2d] = class_logits_layer) -> Tensor:
    """Every output of `layer` (default: the class logits) in an eval forward on `images`, flat,
    float32 (padding included)."""
    captured: list[Tensor] = []
    handle = layer(model).register_forward_hook(
        lambda module, inputs, output: captured.append(output.detach().float().flatten()))
    try:
        with autocast(device, amp):
            model.eval()(images)
    finally:
        handle.remove()
    return torch.cat(captured)


@torch.no_grad()
def set_candidate_regime(models: dict[str, nn.Module], images: list[Tensor], regime: str, score_thresh: float,
                         device: torch.device, amp: str) -> dict[str, float]:
    """Shift the class-logit bias of every model by the same amount so that the inference rows run in
    `regime`: "trained", TRAINED_PAIRS_PER_IMAGE (anchor, class) pairs per image above score_thresh
    (a trained detector's few hundred); "dense", DENSE_PAIR_FRACTION of all pairs (an untrained or
    early model's: every level's top-1000 fills up). Random weights give neither reliably.

    The box deltas of random weights are large enough that most decoded boxes clip to lines of zero
    area (which torchvision keeps and we drop), so the box subnet's last layer is scaled too, to deltas
    of standard deviation DELTA_STD as a trained detector's.

    The shift and scale come from "ours" and are applied to all, so models with the same weights keep
    them. Returns per model the pairs per image above score_thresh after the shift.
    """
    deltas = head_layer_outputs(models["ours"], images, device, amp, layer=box_deltas_layer)
    delta_scale = DELTA_STD / deltas.std()
    for model in models.values():
        box_deltas_layer(model).weight.mul_(delta_scale.to(device))
        box_deltas_layer(model).bias.mul_(delta_scale.to(device))
    logits = head_layer_outputs(models["ours"], images, device, amp)
    wanted = TRAINED_PAIRS_PER_IMAGE * len(images) if regime == "trained" else int(DENSE_PAIR_FRACTION * logits.numel())
    largest = logits.topk(wanted + 1).values  # the threshold goes between the last two
    bound = math.log(score_thresh / (1 - score_thresh))
    shift = bound - (largest[-2] + largest[-1]) / 2
    for model in models.values():
        class_logits_layer(model).bias.add_(shift.to(device))
    return {name: (head_layer_outputs(model, images, device, amp) > bound).sum().item() / len(images)
            for name, model in models.items()}


def compiled_copy(model: nn.Module, images: list[Tensor], device: torch.device, args: argparse.Namespace,
                  ) -> tuple[nn.Module | None, list[float]]:
    """A copy of `model` through compile_for_inference, and the wall seconds of its first
    COMPILED_FIRST_CALLS calls (compilation, CUDA graph warm-up and recording); (None, []) where the
    path stays eager (the CPU without --compile-backend)."""
    compiled = copy.deepcopy(model)
    if not compile_for_inference(compiled, device, backend=args.compile_backend):
        return None, []
    seconds = []
    for _ in range(COMPILED_FIRST_CALLS):
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad(), autocast(device, args.amp):
            compiled(images)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return compiled, seconds


def benchmark_end_to_end(args: argparse.Namespace, device: torch.device, which: str) -> list[dict]:
    """Rows `which` ("train" or "inference") and `which`_channels_last; for inference also
    inference_compiled with --compile, and the suffix _dense with --candidates dense."""
    models, same_weights = end_to_end_models(args, device)
    generator = torch.Generator().manual_seed(args.seed + 1)
    images = [torch.rand(3, *args.size, generator=generator).to(device) for _ in range(args.batch)]
    targets = make_targets(args.batch, args.size, args.boxes_per_image, args.num_classes, generator, device)
    note = "same weights" if same_weights else "ours: own random init (its config's layout differs from torchvision's)"
    if args.amp != "off":
        note += f"; both under {args.amp} autocast"

    suffix = ""
    if which == "train":
        trainable = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in models.items()}
        if trainable["ours"] != trainable["torchvision"]:
            note += f"; trainable parameters differ: {trainable}"
        cases = {name: training_step(model, images, targets, device, args.amp) for name, model in models.items()}
        times = time_interleaved(cases, args.warmup, args.iters, device)
    else:
        suffix = "_dense" if args.candidates == "dense" else ""
        score_thresh = models["torchvision"].score_thresh
        pairs = set_candidate_regime(models, images, args.candidates, score_thresh, device, args.amp)
        note += (f"; {args.candidates} regime: (anchor, class) pairs/image above {score_thresh} ours "
                 f"{pairs['ours']:.0f}, torchvision {pairs['torchvision']:.0f}")
        compile_note = ""
        if args.compile:
            compiled, first_calls = compiled_copy(models.get("ours_channels_last", models["ours"]), images, device, args)
            if compiled is None:
                print(f"inference_compiled{suffix}: skipped; the compiled path stays eager on {device.type} "
                      "(--compile-backend forces a backend)", file=sys.stderr)
            else:
                models["ours_compiled"] = compiled
                compile_note = ("ours compiled (" + ("channels_last, " if "ours_channels_last" in models else "")
                                + f"backend {args.compile_backend or 'inductor'}); first calls "
                                + ", ".join(f"{s:.1f}" for s in first_calls) + " s (compile, warm-up, record)")
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
    rows = [row(which + suffix, times, "ours", "torchvision", note)]
    if "ours_channels_last" in times:
        rows.append(row(f"{which}_channels_last{suffix}", times, "ours_channels_last", "torchvision",
                        "ours in channels_last"))
    if "ours_compiled" in times:
        rows.append(row(f"{which}_compiled{suffix}", times, "ours_compiled", "torchvision", compile_note))
        rows[-1]["compiled_first_calls_s"] = first_calls
    if which == "inference":
        for result in rows:
            result["pairs_per_image"] = pairs
            result["detections_per_image"] = per_image
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
    grids = feature_grid_sizes(height, width, ours.anchor_generator.strides)
    image_sizes = [tuple(args.component_size)] * args.batch

    ours_anchors = ours.anchor_generator(grids).to(device)
    image_list = ImageList(torch.empty(args.batch, 3, height, width, device=device), image_sizes)
    features = [torch.empty(args.batch, 1, h, w, device=device) for h, w in grids]  # only their shapes count
    tv_anchors = tv_model.anchor_generator(image_list, features)
    if ours_anchors.shape != tv_anchors[0].shape:
        raise RuntimeError(f"anchor counts differ: ours {tuple(ours_anchors.shape)}, torchvision {tuple(tv_anchors[0].shape)}")

    generator = torch.Generator().manual_seed(args.seed + 2)
    targets = make_targets(args.batch, args.component_size, args.boxes_per_image, args.num_classes, generator, device)
    if args.candidates == "dense":
        cls_logits, box_deltas = dense_head_outputs(ours_anchors, args.batch, args.num_classes, generator)
    else:
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
    note = (f"{args.candidates} head outputs: {candidates:.0f} (anchor, class) pairs/image above {score_thresh}; "
            f"detections/image ours {per_image['ours']:.0f}, torchvision {per_image['torchvision']:.0f}")
    name = "postprocess" if args.candidates == "trained" else "postprocess_dense"
    return [row(name, times, "ours", "torchvision", note)]


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
    width = max([26] + [len(r["name"]) + 2 for r in rows])
    header = (f"{'benchmark':<{width}}{'ours ms':>10}{'tv ms':>10}{'ours/tv':>9}{'(cpu time)':>11}{'peak MiB':>16}"
              f"{'target':>8}  status")
    lines += ["", header, "-" * len(header)]
    for r in rows:
        target = r["target"]
        status = "" if target is None else ("ok" if round(r["ratio"], 2) <= target else "MISS")
        peaks = "n/a" if r.get("ours_peak_mib") is None else f"{r['ours_peak_mib']:.0f}/{r['torchvision_peak_mib']:.0f}"
        lines.append(f"{r['name']:<{width}}{r['ours_ms']:>10.1f}{r['torchvision_ms']:>10.1f}{r['ratio']:>9.2f}"
                     f"{r['cpu_time_ratio']:>11.2f}{peaks:>16}{'' if target is None else f'{target:.2f}':>8}  {status}")
    lines.append("ms: median wall clock; ours/tv: ratio of the medians, compared (at 2 decimals) with the target; "
                 "(cpu time): the same ratio for process CPU time; peak MiB: the CUDA allocator's peak during one "
                 "round, ours/torchvision (n/a on the CPU)")
    lines.append("")
    lines += [f"{r['name']}: {r['note']}" for r in rows if r["note"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# COCO-scale data loading (--data-scale): start-up time and memory of the datasets and workers.

# COCO 2017 instances: 118,287 train and 5,000 val images, 860,001 and 36,781 boxes, 80 categories
# whose ids are 1..90 without ten of them.
COCO_IMAGES = {"train": 118_287, "val": 5_000}
COCO_BOXES_PER_IMAGE = 860_001 / 118_287  # 7.27
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
POLYGON_POINTS = 12  # per box, as in issue 14's measurement (COCO's polygons have more)
CROWD_FRACTION = 0.01  # iscrowd=1 annotations (with an RLE mask instead of a polygon), about COCO's share
# (width, height) of the JPEGs that the image files are hard links to: COCO's commonest sizes.
TEMPLATE_SIZES = ((640, 480), (480, 640), (640, 427), (427, 640))
ANNOTATIONS_PER_CHUNK = 20_000  # annotations formatted per json.dumps call while writing
GENERATED_MARKER = "generated.json"  # what a --data-dir holds: reused when it matches


def write_template_jpegs(folder: Path, seed: int) -> list[Path]:
    """One JPEG per TEMPLATE_SIZES entry: smooth random colours (noise at 1/16 resolution, upsampled)."""
    generator = torch.Generator().manual_seed(seed)
    paths = []
    for width, height in TEMPLATE_SIZES:
        noise = torch.rand(1, 3, height // 16 + 1, width // 16 + 1, generator=generator)
        pixels = torch.nn.functional.interpolate(noise, size=(height, width), mode="bilinear", align_corners=False)
        path = folder / f"template_{width}x{height}.jpg"
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs for torchcodec; they still work
            warnings.simplefilter("ignore", DeprecationWarning)
            data = torchvision.io.encode_jpeg((pixels[0] * 255).to(torch.uint8), quality=90)
        path.write_bytes(data.numpy().tobytes())
        paths.append(path)
    return paths


def coco_like_annotations(rng: np.random.Generator, image_ids: np.ndarray, sizes: np.ndarray,
                          first_id: int) -> Iterator[list[dict]]:
    """COCO-like annotation entries, in chunks: Poisson(7.27) boxes per image, each with a
    POLYGON_POINTS-point polygon on the ellipse inside its box (coordinates with 2 decimals, as in
    COCO), CROWD_FRACTION of them crowd regions with an RLE mask; COCO's category ids.

    Args:
        image_ids: (N,) ids of the images.
        sizes: (N, 2) (width, height) of each image, pixels.
        first_id: id of the first annotation.
    """
    owner = np.repeat(np.arange(len(image_ids)), rng.poisson(COCO_BOXES_PER_IMAGE, len(image_ids)))
    angles = np.linspace(0, 2 * np.pi, POLYGON_POINTS, endpoint=False)
    for start in range(0, len(owner), ANNOTATIONS_PER_CHUNK):
        rows = owner[start : start + ANNOTATIONS_PER_CHUNK]
        count = len(rows)
        width, height = sizes[rows, 0].astype(np.float64), sizes[rows, 1].astype(np.float64)
        box_w, box_h = width * rng.uniform(0.02, 0.6, count), height * rng.uniform(0.02, 0.6, count)
        x, y = rng.uniform(0, 1, count) * (width - box_w), rng.uniform(0, 1, count) * (height - box_h)
        boxes = np.round(np.stack([x, y, box_w, box_h], axis=1), 2)
        radius = rng.uniform(0.8, 1.0, (count, POLYGON_POINTS))
        polygon_x = x[:, None] + box_w[:, None] / 2 * (1 + radius * np.cos(angles))
        polygon_y = y[:, None] + box_h[:, None] / 2 * (1 + radius * np.sin(angles))
        polygons = np.round(np.stack([polygon_x, polygon_y], axis=2).reshape(count, -1), 2)
        areas = np.round(np.pi / 4 * box_w * box_h * 0.9, 2)
        crowd = rng.random(count) < CROWD_FRACTION
        categories = rng.choice(COCO_CATEGORY_IDS, count)
        chunk = []
        for k, (row, box, polygon, area, is_crowd, category) in enumerate(zip(
            rows.tolist(), boxes.tolist(), polygons.tolist(), areas.tolist(), crowd.tolist(), categories.tolist()
        )):
            if is_crowd:
                pixels = int(sizes[row, 0] * sizes[row, 1])
                runs = rng.integers(1, pixels // 20, 10).tolist()
                segmentation = {"counts": runs + [pixels - sum(runs)], "size": [int(sizes[row, 1]), int(sizes[row, 0])]}
            else:
                segmentation = [polygon]
            chunk.append({"segmentation": segmentation, "area": area, "iscrowd": int(is_crowd),
                          "image_id": int(image_ids[row]), "bbox": box, "category_id": category,
                          "id": first_id + start + k})
        yield chunk


def write_coco_like(folder: Path, split: str, num_images: int, templates: list[Path], seed: int) -> int:
    """`folder`/instances_`split`.json with `num_images` COCO-like images (see coco_like_annotations;
    image entries with COCO's url, date and license keys) and `folder`/`split`/ with their files,
    hard links (else symbolic links) to the template JPEG of the size the json says.

    Returns:
        the number of annotations written.
    """
    rng = np.random.default_rng(seed)
    image_ids = np.sort(rng.choice(np.arange(1, 5 * num_images + 1), num_images, replace=False))
    template_of = rng.integers(len(TEMPLATE_SIZES), size=num_images)
    sizes = np.array(TEMPLATE_SIZES)[template_of]
    img_dir = folder / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for image_id, template, (width, height) in zip(image_ids.tolist(), template_of.tolist(), sizes.tolist()):
        file_name = f"{image_id:012d}.jpg"
        images.append({
            "license": 1 + image_id % 8, "file_name": file_name,
            "coco_url": f"http://images.cocodataset.org/{split}2017/{file_name}", "height": height, "width": width,
            "date_captured": "2013-11-14 11:18:45", "flickr_url": f"http://farm4.staticflickr.com/{file_name}",
            "id": image_id,
        })
        link = img_dir / file_name
        if not link.exists():
            try:
                os.link(templates[template], link)
            except OSError:  # another file system, or hard links not allowed
                link.symlink_to(templates[template])
    ann_file = folder / f"instances_{split}.json"
    with open(ann_file, "w") as f:
        f.write('{"info": {"description": "COCO-like, generated by tools/benchmark.py --data-scale"}, ')
        f.write('"licenses": ' + json.dumps([{"id": i, "name": f"license {i}", "url": ""} for i in range(1, 9)]))
        f.write(', "images": ' + json.dumps(images))
        f.write(', "annotations": [')
        num_annotations = 0
        for index, chunk in enumerate(coco_like_annotations(rng, image_ids, sizes, first_id=1)):
            f.write(("," if index else "") + json.dumps(chunk)[1:-1])
            num_annotations += len(chunk)
        categories = [{"supercategory": "thing", "id": i, "name": f"category_{i}"} for i in COCO_CATEGORY_IDS]
        f.write('], "categories": ' + json.dumps(categories) + "}")
    return num_annotations


def generate_coco_like(folder: Path, num_train: int, seed: int) -> None:
    """The train and val splits (val scaled like COCO's, 5,000 per 118,287) and a marker naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    templates = write_template_jpegs(folder, seed)
    num_val = max(1, round(num_train * COCO_IMAGES["val"] / COCO_IMAGES["train"]))
    marker = {"train_images": num_train, "val_images": num_val, "seed": seed, "polygon_points": POLYGON_POINTS}
    for split, num_images, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1)):
        marker[f"{split}_annotations"] = write_coco_like(folder, split, num_images, templates, split_seed)
    (folder / GENERATED_MARKER).write_text(json.dumps(marker))


def ensure_coco_like(folder: Path, num_train: int, seed: int) -> None:
    """Generate the files under `folder` unless a previous run left the same ones. In a child
    process, so that this process's memory (and peak) stays that of the measurement alone; a spawned
    one: a forked child of a process that has run torch's OpenMP thread pool hangs in its first
    parallel op (the JPEG templates)."""
    marker = folder / GENERATED_MARKER
    if marker.is_file():
        found = json.loads(marker.read_text())
        if (found["train_images"], found["seed"], found["polygon_points"]) == (num_train, seed, POLYGON_POINTS):
            return
    start = time.perf_counter()
    child = multiprocessing.get_context("spawn").Process(target=generate_coco_like, args=(folder, num_train, seed))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"generating the COCO-like data under {folder} failed (exit code {child.exitcode})")
    print(f"generated {num_train} COCO-like training images under {folder} in {time.perf_counter() - start:.0f} s",
          file=sys.stderr)


def memory_kib(pid: int | str = "self") -> dict[str, int]:
    """Memory of process `pid`, KiB: "rss" (resident), "peak_rss" (its high-water mark), "pss"
    (resident, each shared page divided among the processes sharing it: the honest share of a forked
    worker) and "uss" (resident pages no other process shares). Linux /proc only."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    rollup = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    kib = lambda text: int(text.split()[0])  # noqa: E731 - "  1234 kB"
    return {
        "rss": kib(status["VmRSS"]), "peak_rss": kib(status["VmHWM"]), "pss": kib(rollup["Pss"]),
        "uss": kib(rollup["Private_Clean"]) + kib(rollup["Private_Dirty"]),
    }


def reset_peak_rss() -> None:
    """Restart this process's high-water mark (VmHWM) from its current RSS (Linux >= 4.0)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def timed_step(name: str, action: Callable[[], object], steps: list[dict]) -> object:
    """Run `action`; append {"step", "seconds" (wall clock), "cpu_seconds" (this process, all
    threads: what a busy shared machine does not inflate), "rss_before_mib", "rss_after_mib",
    "peak_rss_mib"}."""
    gc.collect()
    reset_peak_rss()
    before = memory_kib()
    start, start_cpu = time.perf_counter(), time.process_time()
    result = action()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    after = memory_kib()
    steps.append({"step": name, "seconds": seconds, "cpu_seconds": cpu_seconds, "rss_before_mib": before["rss"] / 1024,
                  "rss_after_mib": after["rss"] / 1024, "peak_rss_mib": after["peak_rss"] / 1024})
    return result


def worker_memory(dataset: Dataset, num_workers: int, num_batches: int, batch_size: int,
                  start_method: str) -> list[dict]:
    """Per DataLoader worker of the training loader: memory (KiB, see memory_kib) after the first
    batch ("start") and after `num_batches` batches ("end")."""
    data_cfg = DataConfig(num_workers=num_workers, start_method=start_method)
    loader = build_train_loader(data_cfg, dataset, batch_size, seed=0)
    iterator = iter(loader)
    next(iterator)
    # The DataLoader has no public handle on its worker processes.
    pids = [worker.pid for worker in iterator._workers]
    start = [memory_kib(pid) for pid in pids]
    for _ in range(num_batches - 1):
        next(iterator)
    end = [memory_kib(pid) for pid in pids]
    del iterator, loader
    return [{"pid": pid, "start": s, "end": e} for pid, s, e in zip(pids, start, end)]


def benchmark_data_scale(args: argparse.Namespace, folder: Path,
                         dataset_class: Callable[..., Dataset] = CocoDetection) -> dict:
    """Start-up of the training and validation datasets (time, main-process memory), the pickled
    size of each, the evaluation ground truth (`val.coco`, built on first use), and the memory of
    the training loader's workers over --data-batches batches."""
    train_files = (folder / "instances_train.json", folder / "train")
    val_files = (folder / "instances_val.json", folder / "val")
    steps: list[dict] = []
    train = timed_step("train dataset", lambda: dataset_class(
        *train_files, transforms=build_train_transforms(0.5), keep_ground_truth=False), steps)
    val = timed_step("val dataset", lambda: dataset_class(*val_files, transforms=build_eval_transforms()), steps)
    timed_step("val ground truth (val.coco)", lambda: val.coco, steps)
    pickled_mib = {name: len(pickle.dumps(ds, protocol=pickle.HIGHEST_PROTOCOL)) / 2**20
                   for name, ds in (("train", train), ("val", val))}
    workers = worker_memory(train, args.data_workers, args.data_batches, args.data_batch, args.start_method)
    return {
        "generated": json.loads((folder / GENERATED_MARKER).read_text()),
        "json_mib": {name: files[0].stat().st_size / 2**20 for name, files in (("train", train_files), ("val", val_files))},
        "steps": steps, "pickled_mib": pickled_mib, "workers": workers,
    }


def format_data_scale(env: dict, result: dict, args: argparse.Namespace) -> str:
    """The report of --data-scale, with the targets of issue 14."""
    generated = result["generated"]
    lines = [
        f"$ {env['command']}",
        f"torch {env['torch']}, python {env['python']}; {env['device']}",
        f"train: {generated['train_images']} images, {generated['train_annotations']} annotations, "
        f"{result['json_mib']['train']:.0f} MiB json; val: {generated['val_images']} images, "
        f"{generated['val_annotations']} annotations, {result['json_mib']['val']:.1f} MiB json; "
        f"{generated['polygon_points']}-point polygons",
        "",
        f"{'step':<30}{'seconds':>9}{'cpu s':>7}{'RSS before':>12}{'RSS after':>11}{'peak RSS':>10}  (MiB)",
    ]
    for step in result["steps"]:
        lines.append(f"{step['step']:<30}{step['seconds']:>9.1f}{step['cpu_seconds']:>7.1f}"
                     f"{step['rss_before_mib']:>12.0f}{step['rss_after_mib']:>11.0f}{step['peak_rss_mib']:>10.0f}")
    lines.append("")
    lines.append(f"pickled: train dataset {result['pickled_mib']['train']:.1f} MiB, "
                 f"val dataset {result['pickled_mib']['val']:.1f} MiB")
    lines.append("")
    method = worker_context(args.start_method) or f"{multiprocessing.get_start_method()} (platform default)"
    lines.append(f"training loader, {args.data_workers} workers, start method {method}, batch {args.data_batch}: "
                 f"worker memory after the first batch -> after {args.data_batches} batches (MiB)")
    lines.append(f"{'worker':<8}{'RSS':>20}{'PSS':>20}{'USS':>20}")
    for index, worker in enumerate(result["workers"]):
        cells = [f"{worker['start'][key] / 1024:.0f} -> {worker['end'][key] / 1024:.0f}" for key in ("rss", "pss", "uss")]
        lines.append(f"{index:<8}" + "".join(f"{cell:>20}" for cell in cells))
    growth = {key: max((w["end"][key] - w["start"][key]) / 1024 for w in result["workers"]) for key in ("rss", "pss", "uss")}
    lines.append(f"largest growth of one worker: RSS {growth['rss']:+.1f}, PSS {growth['pss']:+.1f}, "
                 f"USS {growth['uss']:+.1f} MiB")
    train_seconds = result["steps"][0]["seconds"]
    lines += [
        "",
        "targets (issue 14): train dataset start-up <= 10 s: "
        f"{'ok' if train_seconds <= 10 else 'MISS'} ({train_seconds:.1f} s); pickled train dataset <= 30 MB: "
        f"{'ok' if result['pickled_mib']['train'] * 2**20 <= 30e6 else 'MISS'}; worker growth <= 100 MB: "
        f"{'ok' if max(growth.values()) * 2**20 <= 100e6 else 'MISS'}",
    ]
    return "\n".join(lines)


def main_data_scale(args: argparse.Namespace) -> None:
    """--data-scale: generate (or reuse) the files, measure, print and optionally write --json."""
    env = {"command": shlex.join(["python"] + sys.argv), "torch": torch.__version__,
           "python": platform.python_version(), "device": environment(args, torch.device("cpu"))["device"]}
    with contextlib.ExitStack() as stack:
        if args.data_dir:
            folder = Path(args.data_dir)
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="coco_scale_")))
        ensure_coco_like(folder, args.data_images, args.seed)
        result = benchmark_data_scale(args, folder)
    print(format_data_scale(env, result, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "results": result}, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# End-to-end training (--e2e): what a user of `retinanet train` gets, data loading included.

E2E_LOG_PERIOD = 10  # iterations per logged window; the first window (warm-up, cudnn autotuning) is left out


def e2e_overrides(args: argparse.Namespace, folder: Path, output_dir: Path) -> list[str]:
    """`retinanet train` overrides: the generated COCO-like splits, the benchmark's model and batch."""
    overrides = [
        f"data.train.ann_file={folder / 'instances_train.json'}", f"data.train.img_dir={folder / 'train'}",
        f"data.val.ann_file={folder / 'instances_val.json'}", f"data.val.img_dir={folder / 'val'}",
        "data.synthetic.root=", f"data.num_workers={args.data_workers}", f"model.num_classes={len(COCO_CATEGORY_IDS)}",
        f"model.backbone.depth={args.depth}", "model.backbone.weights=", f"solver.ims_per_batch={args.batch}",
        f"solver.reference_batch_size={args.batch}", f"solver.max_iter={args.e2e_iters}",
        f"solver.steps=[{args.e2e_iters}]", "solver.warmup_iters=1", f"solver.amp={args.amp}",
        f"train.device={args.device}", f"train.output_dir={output_dir}", f"train.log_period={E2E_LOG_PERIOD}",
        "train.checkpoint_period=1000000", "train.eval_period=0", "train.tb_images=0",
    ]
    if args.e2e_size:
        low, high = args.e2e_size
        overrides += [f"model.input.min_size_train=[{low}]", f"model.input.max_size_train={high}",
                      f"model.input.min_size_test={low}", f"model.input.max_size_test={high}"]
    return overrides


def benchmark_e2e(args: argparse.Namespace, folder: Path, output_dir: Path) -> dict:
    """Train --e2e-iters iterations with the trainer; images/second from its metrics.jsonl windows."""
    cfg = load_config(args.config, e2e_overrides(args, folder, output_dir))
    start = time.perf_counter()
    train(cfg, overwrite=True)
    wall = time.perf_counter() - start
    windows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [w for w in windows if "time_per_iter" in w][1:]  # the first window is warm-up
    if not windows:
        raise SystemExit(f"--e2e-iters {args.e2e_iters} leaves no timed window after the warm-up one "
                         f"({E2E_LOG_PERIOD} iterations each)")
    seconds_per_iter = statistics.mean(w["time_per_iter"] for w in windows)
    data_seconds = statistics.mean(w["data_time"] for w in windows)
    return {"images_per_second": args.batch / seconds_per_iter, "seconds_per_iter": seconds_per_iter,
            "data_seconds_per_iter": data_seconds, "timed_iterations": len(windows) * E2E_LOG_PERIOD,
            "wall_seconds_with_setup_and_final_eval": wall}


def main_e2e(args: argparse.Namespace) -> None:
    """--e2e: generate (or reuse) the JPEGs, train, print images/second and optionally write --json."""
    env = {"command": shlex.join(["python"] + sys.argv), "torch": torch.__version__,
           "python": platform.python_version(), "device": environment(args, torch.device(args.device))["device"]}
    with contextlib.ExitStack() as stack:
        folder = Path(args.data_dir) if args.data_dir else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="e2e_data_")))
        ensure_coco_like(folder, args.data_images, args.seed)
        output_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="e2e_run_")))
        result = benchmark_e2e(args, folder, output_dir / "run")
    print(f"$ {env['command']}\ntorch {env['torch']}; {env['device']}\n"
          f"retinanet train, ResNet-{args.depth}, batch {args.batch}, amp {args.amp}, {args.data_workers} workers: "
          f"{result['images_per_second']:.1f} images/s ({result['seconds_per_iter'] * 1e3:.0f} ms/iteration, "
          f"data {result['data_seconds_per_iter'] * 1e3:.1f} ms) over {result['timed_iterations']} iterations")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "results": result}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.data_scale:
        main_data_scale(args)
        return
    if args.e2e:
        torch.set_num_threads(args.threads)
        main_e2e(args)
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as in training; the warm-up rounds absorb the autotuning
    env = environment(args, device)
    rows: list[dict] = []
    if "train" in args.only:
        rows += benchmark_end_to_end(args, device, "train")
    if "inference" in args.only:
        for batch in args.inference_batches or [args.batch]:
            batch_rows = benchmark_end_to_end(argparse.Namespace(**{**vars(args), "batch": batch}), device, "inference")
            for result in batch_rows:
                if args.inference_batches:
                    result["name"] += f"_batch{batch}"
            rows += batch_rows
    if "loss" in args.only or "postprocess" in args.only:
        inputs = component_inputs(args, device)
        if "loss" in args.only:
            rows += benchmark_loss(args, device, inputs)
        if "postprocess" in args.only:
            rows += benchmark_postprocess(args, device, inputs)
    targets = GPU_TARGETS if device.type == "cuda" else TARGETS
    for result in rows:
        result["target"] = targets.get(result["name"])
        if result["name"].startswith("inference_compiled") and device.type == "cuda":
            result["note"] += f"; target <= {COMPILED_LATENCY_TARGET_MS:.0f} ms at batch 1"
    print(format_table(env, rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
