"""Train our quickstart model and torchvision's RetinaNet on the synthetic dataset for the same
wall-clock budget, evaluate both with the same COCO evaluator, print AP side by side.

    python tools/compare_training.py --seconds 160 --json docs/compare_training.json

Both sides get the same data (our loader: same images, flips, batch of 16), the same optimizer and
schedule shape (AdamW, warm-up, LR / 10 at 75% and 92% of the run), ResNet-18 from scratch with
trainable BatchNorm and the same test size. The differences are the models' own: torchvision's
RetinaNet with its defaults (anchors 32-512 with integer sizes, L1 box loss, plain heads, P6 from P5,
low-quality matches) against configs/quickstart.yaml (anchors 16-256, GIoU, GroupNorm heads).
The number of iterations of each side is set from a timed warm-up so that its training fits the budget.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retinanet import build_model, load_config  # noqa: E402
from retinanet.data import build_datasets, build_train_loader, build_val_loader  # noqa: E402
from retinanet.engine.evaluator import evaluate  # noqa: E402
from retinanet.engine.solver import build_optimizer, build_scheduler  # noqa: E402
from retinanet.engine.trainer import TrainState, train_step  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class TorchvisionAdapter(nn.Module):
    """torchvision's RetinaNet behind our calling convention (uint8 images, loss names)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images, targets=None):
        images = [image.float() / 255 if image.dtype == torch.uint8 else image for image in images]
        if self.training:
            targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
            losses = self.model(images, targets)
            return {"loss_cls": losses["classification"], "loss_box": losses["bbox_regression"]}
        return self.model(images)


def torchvision_retinanet(num_classes: int, size: int) -> nn.Module:
    from torchvision.models import resnet18
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.retinanet import _default_anchorgen
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    backbone = _resnet_fpn_extractor(
        resnet18(weights=None, norm_layer=nn.BatchNorm2d), 5, returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(256, 256),
    )
    model = RetinaNet(backbone, num_classes, min_size=size, max_size=size, anchor_generator=_default_anchorgen())
    return TorchvisionAdapter(model)


def run(name: str, model: nn.Module, cfg, train_set, val_set, seconds: float, warmup_iters: int = 8) -> dict:
    """Time a few iterations, size the run to the budget, train a fresh copy, evaluate."""
    initial_state = {k: v.clone() for k, v in model.state_dict().items()}

    def fresh_state(max_iter: int) -> TrainState:
        model.load_state_dict(initial_state)
        cfg.solver.max_iter = max_iter
        cfg.solver.steps = [int(0.75 * max_iter), int(0.92 * max_iter)]
        cfg.solver.warmup_iters = max(1, max_iter // 12)
        optimizer = build_optimizer(cfg.solver, model)
        return TrainState(model, optimizer, build_scheduler(cfg.solver, optimizer), torch.amp.GradScaler("cpu", enabled=False))

    def train_for(state: TrainState, iterations: int) -> float:
        loader = iter(build_train_loader(cfg.data, train_set, cfg.solver.ims_per_batch, cfg.train.seed))
        model.train()
        start = time.perf_counter()
        for _ in range(iterations):
            images, targets = next(loader)
            train_step(model, state, images, targets, clip_grad_norm=cfg.solver.clip_grad_norm)
        return time.perf_counter() - start

    timing = train_for(fresh_state(1000), warmup_iters)
    iterations = max(10, int(seconds / (timing / warmup_iters)))
    torch.manual_seed(cfg.train.seed)
    elapsed = train_for(fresh_state(iterations), iterations)
    loader = build_val_loader(val_set, batch_size=16, num_workers=0)
    metrics = evaluate(model, loader, val_set, torch.device("cpu"))
    result = {"name": name, "iterations": iterations, "train_seconds": round(elapsed, 1),
              **{key: None if metrics[key] is None else round(metrics[key], 4) for key in ("AP", "AP50")}}
    logging.info("%s", result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=160.0, help="training budget of each side")
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    cfg = load_config(args.config, ["data.num_workers=0", "train.device=cpu"])
    torch.manual_seed(cfg.train.seed)
    train_set, val_set = build_datasets(cfg)
    ours = build_model(cfg, train_set.class_names)
    torch.manual_seed(cfg.train.seed)
    theirs = torchvision_retinanet(cfg.model.num_classes, cfg.model.input.min_size_test)
    results = [
        run(f"ours ({os.path.relpath(args.config, ROOT)})", ours, cfg, train_set, val_set, args.seconds),
        run("torchvision RetinaNet R18 (defaults)", theirs, load_config(args.config, ["data.num_workers=0"]),
            train_set, val_set, args.seconds),
    ]
    print(f"\nbudget {args.seconds:.0f} s of training each, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':40s} {'iters':>6s} {'train s':>8s} {'AP':>7s} {'AP50':>7s}")
    for r in results:
        print(f"{r['name']:40s} {r['iterations']:6d} {r['train_seconds']:8.1f} {r['AP']:7.3f} {r['AP50']:7.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": args.seconds, "results": results}, indent=2))


if __name__ == "__main__":
    main()
