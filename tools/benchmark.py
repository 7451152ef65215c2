"""Time our RetinaNet against torchvision's, side by side, in one run.

Four measurements, each ours vs torchvision's ``RetinaNet`` with the same ResNet backbone, the same
images, targets and (for the components) the same head outputs:

1. training step: forward + backward + SGD step, frozen BN, the same freeze (torchvision
   trainable_layers=3 = our freeze_at=2), 80 classes, 50 boxes per image; plus ours in channels_last;
2. inference: eval forward under no_grad (plus ours in channels_last);
3. matching + loss alone: our ``model.criterion`` against exactly what torchvision's
   ``RetinaNet.compute_loss`` does (per-image box_iou + Matcher loop, then ``head.compute_loss``),
   on COCO-sized inputs with trained-like logits; forward, and forward + backward as an extra row;
4. post-processing alone: our ``model.postprocessor`` against ``RetinaNet.postprocess_detections``,
   with trained-like scores so that NMS has a few hundred candidates per image to work on.

Our model is built from ``--config`` (default configs/torchvision_r50_fpn.yaml: torchvision's
choices, so both sides do the same work) and, when the architectures agree, loaded with the
torchvision model's weights through retinanet.convert.

The repetitions of ours and theirs are interleaved (the order rotates every round) so that machine
noise hits both alike; the table gives medians and the ratio ours / torchvision.

    python tools/benchmark.py                                     # CPU defaults: 512x512, batch 2
    python tools/benchmark.py --device cuda                       # GPU defaults: 800x1333, batch 2
    python tools/benchmark.py --only loss postprocess --json out.json
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
from pathlib import Path

import torch
import torchvision
from torch import Tensor
from torchvision.models.detection import RetinaNet as TorchvisionRetinaNet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import _default_anchorgen
from torchvision.ops import FrozenBatchNorm2d, box_iou
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from retinanet import build_model, load_config  # noqa: E402
from retinanet.convert import convert_torchvision_state_dict  # noqa: E402

BENCHMARKS = ("train", "inference", "loss", "postprocess")
# Targets the project set for CPU (ours / torchvision); the channels_last rows aim lower.
TARGETS = {
    "train": 1.0, "train_channels_last": 0.85, "inference": 1.0, "inference_channels_last": 0.85,
    "loss": 0.3, "loss_backward": 0.3, "postprocess": 0.3,
}
TORCHVISION_SIZE_DIVISIBLE = 32  # GeneralizedRCNNTransform's default padding
ANCHORS_PER_OBJECT = 10  # trained-like head outputs: anchors per ground-truth box with a high score


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--depth", type=int, default=50, choices=(18, 34, 50, 101, 152), help="ResNet depth")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="image size of the end-to-end runs (default: 512 512 on cpu, 800 1333 on cuda)")
    parser.add_argument("--batch", type=int, default=2, help="images per batch, every benchmark")
    parser.add_argument("--iters", type=int, help="timed repetitions of the end-to-end runs (default: 5 cpu, 20 cuda)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions before timing, every benchmark")
    parser.add_argument("--component-size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"),
                        help="image size whose anchors the loss and post-processing benchmarks use (COCO: 800 1333)")
    parser.add_argument("--component-iters", type=int, default=10, help="timed repetitions of loss / post-processing")
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--boxes-per-image", type=int, default=50)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch intra-op threads")
    parser.add_argument("--config", default=str(ROOT / "configs" / "torchvision_r50_fpn.yaml"),
                        help="our model's config; the default makes torchvision's choices")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--no-channels-last", action="store_true", help="skip the channels_last rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = (512, 512) if args.device == "cpu" else (800, 1333)
    if args.iters is None:
        args.iters = 5 if args.device == "cpu" else 20
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


# ----------------------------------------------------------------------------------------------
# Models and inputs.


def make_torchvision_model(depth: int, num_classes: int, size: tuple[int, int]) -> TorchvisionRetinaNet:
    """torchvision's retinanet_resnet{depth}_fpn (v1) layout, random init, no resizing of `size` images."""
    resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=FrozenBatchNorm2d)
    in_channels_p6p7 = 256  # v1: P6 from P5
    backbone = _resnet_fpn_extractor(
        resnet, trainable_layers=3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(in_channels_p6p7, 256)
    )
    return TorchvisionRetinaNet(
        backbone, num_classes, min_size=min(size), max_size=max(size), anchor_generator=_default_anchorgen()
    )


def make_our_model(config: str, tv_model: TorchvisionRetinaNet, depth: int, num_classes: int,
                   size: tuple[int, int]) -> tuple[torch.nn.Module, bool]:
    """Our model from `config`, sized like torchvision's; loaded with its weights where they fit.

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
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError:  # another architecture (e.g. P6 from C5): keep our own random init
        return model, False
    return model, not unexpected and all(k.startswith("criterion.") for k in missing)


def random_boxes(num: int, height: int, width: int, generator: torch.Generator) -> Tensor:
    """(num, 4) xyxy boxes with COCO-like sizes: sqrt(area) log-uniform in 8..0.8 * short side."""
    side = torch.exp(torch.empty(num).uniform_(math.log(8.0), math.log(0.8 * min(height, width)), generator=generator))
    aspect = torch.exp(torch.empty(num).uniform_(math.log(0.5), math.log(2.0), generator=generator))  # h / w
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
    """(H, W) of P3..P7 for a padded (height, width) batch: each stride-2 conv rounds up."""
    sizes, h, w = [], height, width
    for level in range(1, 8):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        if level >= 3:
            sizes.append((h, w))
    return sizes


def trained_like_head_outputs(anchors: Tensor, targets: list[dict[str, Tensor]], num_classes: int,
                              generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Logits and deltas shaped like a trained detector's.

    Background logits ~ N(-8, 1) (p ~ 3e-4, essentially never above 0.05); the 10 anchors of highest
    IoU with each ground-truth box get logit ~ N(-1.5, 1.5) for its class (p > 0.05 for ~80% of
    them), so a few hundred clustered, overlapping candidates per image pass the 0.05 threshold and
    NMS has real work. Deltas ~ N(0, 0.1).

    Returns:
        cls (B, A, K) logits and box (B, A, 4) deltas, on the anchors' device.
    """
    device = anchors.device
    batch = len(targets)
    logits = torch.randn(batch, anchors.shape[0], num_classes, generator=generator).to(device) - 8.0
    for image, target in enumerate(targets):
        hot = box_iou(target["boxes"], anchors).topk(ANCHORS_PER_OBJECT, dim=1).indices  # (M, 10)
        hot_logits = torch.randn(hot.shape, generator=generator).to(device) * 1.5 - 1.5
        logits[image, hot, target["labels"][:, None].expand_as(hot)] = hot_logits
    deltas = (torch.randn(batch, anchors.shape[0], 4, generator=generator) * 0.1).to(device)
    return logits, deltas


# ----------------------------------------------------------------------------------------------
# Timing.


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(cases: dict[str, Callable[[], object]], warmup: int, iters: int,
                     device: torch.device) -> dict[str, dict[str, list[float]]]:
    """Run every case once per round, rotating the order each round.

    Returns per case {"wall": [...], "cpu": [...]}: ms of wall clock (perf_counter) and of this
    process's CPU time (all threads) per timed round. On a shared machine the CPU time does not count
    the time spent waiting for a core, so its ratio is a second, less noisy view.
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


def row(name: str, times: dict, ours: str, theirs: str, note: str = "") -> dict:
    """One table row: medians and ratios of case `ours` against case `theirs`."""
    median = {case: {kind: statistics.median(times[case][kind]) for kind in ("wall", "cpu")} for case in (ours, theirs)}
    return {
        "name": name, "ours_ms": median[ours]["wall"], "torchvision_ms": median[theirs]["wall"],
        "ratio": median[ours]["wall"] / median[theirs]["wall"],
        "cpu_time_ratio": median[ours]["cpu"] / median[theirs]["cpu"],
        "target": TARGETS.get(name), "ours_all_ms": times[ours]["wall"], "torchvision_all_ms": times[theirs]["wall"],
        "note": note,
    }


# ----------------------------------------------------------------------------------------------
# The benchmarks.


def end_to_end_models(args, device):
    torch.manual_seed(args.seed)
    tv_model = make_torchvision_model(args.depth, args.num_classes, args.size)
    ours, same_weights = make_our_model(args.config, tv_model, args.depth, args.num_classes, args.size)
    models = {"torchvision": tv_model.to(device), "ours": ours.to(device)}
    if not args.no_channels_last:
        ours_cl, _ = make_our_model(args.config, tv_model, args.depth, args.num_classes, args.size)
        ours_cl.load_state_dict(ours.state_dict())
        models["ours_channels_last"] = ours_cl.to(device, memory_format=torch.channels_last)
    return models, same_weights


def benchmark_end_to_end(args, device, which: str) -> list[dict]:
    models, same_weights = end_to_end_models(args, device)
    generator = torch.Generator().manual_seed(args.seed + 1)
    images = [torch.rand(3, *args.size, generator=generator).to(device) for _ in range(args.batch)]
    targets = make_targets(args.batch, args.size, args.boxes_per_image, args.num_classes, generator, device)
    note = "same weights" if same_weights else "ours: own random init (config differs from torchvision's layout)"

    if which == "train":
        def step_fn(model: torch.nn.Module, loss_keys: tuple[str, str]):
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)
            model.train()

            def step():
                losses = model(images, [dict(t) for t in targets])
                loss = losses[loss_keys[0]] + losses[loss_keys[1]]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            return step

        trainable = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in models.items()}
        if trainable["ours"] != trainable["torchvision"]:
            note += f"; trainable parameters differ: {trainable}"
        cases = {name: step_fn(m, ("classification", "bbox_regression") if name == "torchvision" else ("loss_cls", "loss_box"))
                 for name, m in models.items()}
        times = time_interleaved(cases, args.warmup, args.iters, device)
    else:
        for model in models.values():
            model.eval()
        detections = {}

        def infer_fn(name, model):
            def infer():
                with torch.no_grad():
                    detections[name] = model(images)
            return infer

        times = time_interleaved({n: infer_fn(n, m) for n, m in models.items()}, args.warmup, args.iters, device)
        counts = {n: sum(d["scores"].numel() for d in dets) / len(dets) for n, dets in detections.items()}
        note += f"; detections/image ours {counts['ours']:.0f}, torchvision {counts['torchvision']:.0f}"
    rows = [row(which, times, "ours", "torchvision", note)]
    if "ours_channels_last" in times:
        rows.append(row(f"{which}_channels_last", times, "ours_channels_last", "torchvision", "ours in channels_last"))
    return rows


def component_setup(args, device):
    """Both models' anchors for a COCO-sized padded batch, targets and trained-like head outputs."""
    torch.manual_seed(args.seed)
    tv_model = make_torchvision_model(args.depth, args.num_classes, args.component_size).to(device)
    ours, _ = make_our_model(args.config, tv_model, args.depth, args.num_classes, args.component_size)
    ours = ours.to(device)
    height, width = (math.ceil(s / TORCHVISION_SIZE_DIVISIBLE) * TORCHVISION_SIZE_DIVISIBLE for s in args.component_size)
    grids = grid_sizes(height, width)
    image_sizes = [tuple(args.component_size)] * args.batch

    ours_anchors = ours.anchor_generator(grids).to(device)
    image_list = ImageList(torch.empty(args.batch, 3, height, width, device=device), image_sizes)
    features = [torch.empty(args.batch, 1, h, w, device=device) for h, w in grids]
    tv_anchors = tv_model.anchor_generator(image_list, features)
    if ours_anchors.shape != tv_anchors[0].shape:
        raise RuntimeError(f"anchor counts differ: ours {tuple(ours_anchors.shape)}, torchvision {tuple(tv_anchors[0].shape)}")

    generator = torch.Generator().manual_seed(args.seed + 2)
    targets = make_targets(args.batch, args.component_size, args.boxes_per_image, args.num_classes, generator, device)
    cls_logits, box_deltas = trained_like_head_outputs(ours_anchors, targets, args.num_classes, generator)
    return tv_model, ours, grids, image_sizes, ours_anchors, tv_anchors, targets, cls_logits, box_deltas


def benchmark_loss(args, device, setup) -> list[dict]:
    tv_model, ours, grids, _, ours_anchors, tv_anchors, targets, cls_logits, box_deltas = setup
    ours.criterion.train()
    values = {}

    def ours_loss(backward: bool):
        def run():
            cls, box = cls_logits.detach().requires_grad_(backward), box_deltas.detach().requires_grad_(backward)
            losses = ours.criterion(cls, box, ours_anchors, targets)
            values["ours"] = (losses["loss_cls"].item(), losses["loss_box"].item())
            if backward:
                torch.autograd.grad(losses["loss_cls"] + losses["loss_box"], [cls, box])
        return run

    def torchvision_loss(backward: bool):
        def run():  # exactly RetinaNet.compute_loss: the per-image Matcher loop, then head.compute_loss
            cls, box = cls_logits.detach().requires_grad_(backward), box_deltas.detach().requires_grad_(backward)
            losses = tv_model.compute_loss(targets, {"cls_logits": cls, "bbox_regression": box}, tv_anchors)
            values["torchvision"] = (losses["classification"].item(), losses["bbox_regression"].item())
            if backward:
                torch.autograd.grad(losses["classification"] + losses["bbox_regression"], [cls, box])
        return run

    rows = []
    for backward in (False, True):
        cases = {"ours": ours_loss(backward), "torchvision": torchvision_loss(backward)}
        with torch.set_grad_enabled(backward):
            times = time_interleaved(cases, args.warmup, args.component_iters, device)
        note = (f"A={ours_anchors.shape[0]} anchors/image ({grids[0][0] * 8}x{grids[0][1] * 8} padded); "
                f"loss cls/box ours {values['ours'][0]:.4f}/{values['ours'][1]:.4f}, "
                f"torchvision {values['torchvision'][0]:.4f}/{values['torchvision'][1]:.4f}")
        rows.append(row("loss_backward" if backward else "loss", times, "ours", "torchvision", note))
    return rows


def benchmark_postprocess(args, device, setup) -> list[dict]:
    tv_model, ours, grids, image_sizes, ours_anchors, tv_anchors, _, cls_logits, box_deltas = setup
    counts = [h * w * ours.anchor_generator.num_anchors_per_location for h, w in grids]
    cls_per_level, box_per_level = list(cls_logits.split(counts, 1)), list(box_deltas.split(counts, 1))
    ours_anchors_per_level = list(ours_anchors.split(counts))
    tv_anchors_per_image = [list(a.split(counts)) for a in tv_anchors]
    tv_head_outputs = {"cls_logits": cls_per_level, "bbox_regression": box_per_level}
    detections = {}

    def ours_post():
        detections["ours"] = ours.postprocessor(cls_per_level, box_per_level, ours_anchors_per_level, image_sizes)

    def torchvision_post():
        detections["torchvision"] = tv_model.postprocess_detections(tv_head_outputs, tv_anchors_per_image, image_sizes)

    with torch.no_grad():
        times = time_interleaved({"ours": ours_post, "torchvision": torchvision_post}, args.warmup,
                                 args.component_iters, device)
    candidates = (torch.sigmoid(cls_logits) > tv_model.score_thresh).sum().item() / args.batch
    per_image = {n: sum(d["scores"].numel() for d in dets) / len(dets) for n, dets in detections.items()}
    note = (f"{candidates:.0f} candidates/image above {tv_model.score_thresh}; detections/image "
            f"ours {per_image['ours']:.0f}, torchvision {per_image['torchvision']:.0f}")
    return [row("postprocess", times, "ours", "torchvision", note)]


# ----------------------------------------------------------------------------------------------
# Report.


def environment(args, device: torch.device) -> dict:
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    device_name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        device_name = f"{device_name}, {len(os.sched_getaffinity(0))} cores available"
    return {
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1]] + sys.argv),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
        "device": f"{device.type}: {device_name}", "threads": torch.get_num_threads(),
        "depth": args.depth, "batch": args.batch, "size": list(args.size), "component_size": list(args.component_size),
        "iters": args.iters, "component_iters": args.component_iters, "warmup": args.warmup,
        "config": os.path.relpath(args.config, ROOT),
    }


def format_table(env: dict, rows: list[dict]) -> str:
    lines = [f"$ {env['command']}"]
    lines.append(f"torch {env['torch']}, torchvision {env['torchvision']}, python {env['python']}; "
                 f"{env['device']}; {env['threads']} threads")
    lines.append(f"ResNet-{env['depth']}, batch {env['batch']}, end-to-end {env['size'][0]}x{env['size'][1]} "
                 f"({env['iters']} timed iters), components {env['component_size'][0]}x{env['component_size'][1]} "
                 f"({env['component_iters']} timed iters), {env['warmup']} warm-up; our config {env['config']}")
    header = f"{'benchmark':<26}{'ours ms':>10}{'tv ms':>10}{'ours/tv':>9}{'(cpu time)':>11}{'target':>8}  status"
    lines += ["", header, "-" * len(header)]
    for r in rows:
        target = r["target"]
        status = "" if target is None else ("ok" if r["ratio"] <= target else "MISS")
        lines.append(f"{r['name']:<26}{r['ours_ms']:>10.1f}{r['torchvision_ms']:>10.1f}{r['ratio']:>9.2f}"
                     f"{r['cpu_time_ratio']:>11.2f}{'' if target is None else f'{target:.2f}':>8}  {status}")
    lines.append("ms: median wall clock; ours/tv: ratio of those medians (status compares it to the target); "
                 "(cpu time): the same ratio for process CPU time")
    lines.append("")
    lines += [f"{r['name']}: {r['note']}" for r in rows if r["note"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(args, device)
    rows: list[dict] = []
    for which in ("train", "inference"):
        if which in args.only:
            rows += benchmark_end_to_end(args, device, which)
    if "loss" in args.only or "postprocess" in args.only:
        setup = component_setup(args, device)
        if "loss" in args.only:
            rows += benchmark_loss(args, device, setup)
        if "postprocess" in args.only:
            rows += benchmark_postprocess(args, device, setup)
    print(format_table(env, rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
