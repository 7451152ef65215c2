"""Figure 4 of the paper for a trained checkpoint: the cumulative distribution of the normalised loss
of foreground and of background anchors, for several gamma.

    python tools/loss_cdf.py output/paper/table1b/gamma_2_alpha_0.25/checkpoints/model_final.pth \\
        --out docs/figure4.png

Run the checkpoint's model over the images of a dataset split (its config's validation set unless
said otherwise), label every anchor as the criterion does (the model's own matcher: foreground,
background, ignored), and score each foreground and background anchor with the focal loss of its
logits under each gamma. A sample is an anchor and its loss is the focal loss summed over the K
classes, as the criterion sums it, without alpha (alpha is one constant factor per group, which the
normalisation removes). Within each group and gamma the losses are normalised to sum to one and
sorted from low to high; the curve is their cumulative sum against the fraction of samples. The
paper (ResNet-101, 600 px, COCO, trained with gamma 2): the positives' curves change little with
gamma, while for the negatives at gamma 2 nearly all the loss sits in a small fraction of hard
samples.

Writes <out>.json and <out>.csv (the curves, sampled at --points fractions) and, when matplotlib is
installed, the PNG <out> (pip install "retinanet[plots]" or pip install matplotlib; without it the
numbers are still written and the message says how to get the picture).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retinanet.checkpoint import load_model  # noqa: E402
from retinanet.data import build_datasets, build_eval_transforms, build_val_dataset, build_val_loader  # noqa: E402
from retinanet.modeling.losses import focal_loss_per_anchor, pad_targets  # noqa: E402
from retinanet.modeling.matcher import BACKGROUND, FOREGROUND  # noqa: E402

logger = logging.getLogger("loss_cdf")

GAMMAS = (0.0, 0.5, 1.0, 2.0)  # the paper's Figure 4
GROUPS = ("foreground", "background")


def cumulative_loss_curve(losses: Tensor, num_points: int = 201) -> tuple[list[float], list[float]]:
    """The normalised cumulative loss of samples sorted from low to high loss.

    Args:
        losses: (N,) non-negative loss of each sample, N >= 1.
        num_points: how many fractions of the samples, evenly spaced in [0, 1], to return.
    Returns:
        (fraction of samples, fraction of the total loss carried by that fraction of the
        lowest-loss samples), each num_points floats from 0 to 1. Equal losses give the diagonal.
    """
    if losses.numel() == 0:
        raise ValueError("no samples: the curve needs at least one loss")
    cumulative = losses.double().sort().values.cumsum(0)
    total = cumulative[-1]
    cumulative = cumulative / total if total > 0 else torch.zeros_like(cumulative)
    fractions = torch.linspace(0, 1, num_points, dtype=torch.float64)
    # The first k samples hold cumulative[k - 1]; k = round(fraction * N).
    counts = (fractions * losses.numel()).round().long()
    values = torch.where(counts > 0, cumulative[(counts - 1).clamp(min=0)], 0.0)
    return [round(x, 6) for x in fractions.tolist()], [round(y, 6) for y in values.tolist()]


@torch.no_grad()
def anchor_logits_and_labels(model, images: list[Tensor], targets: list[dict]) -> tuple[Tensor, Tensor, Tensor]:
    """The model's logits for every anchor of a batch and the criterion's labelling of them.

    Returns:
        logits: (B, A, K) raw class scores.
        anchor_classes: (B, A) int64 class of each anchor's matched box (0 where not foreground).
        labels: (B, A) int8 FOREGROUND, BACKGROUND or IGNORE (matcher.py).
    """
    batch, _, _, scaled = model.preprocessor(images, targets)
    cls_per_level, _, anchors_per_level = model.forward_batch(batch)
    logits, anchors = torch.cat(cls_per_level, 1), torch.cat(anchors_per_level, 0)
    device = logits.device
    gt_boxes, gt_valid = pad_targets(scaled, "boxes", device)
    crowd_boxes, crowd_valid = (None, None)
    if any("crowd_boxes" in t for t in scaled):
        crowd_boxes, crowd_valid = pad_targets(scaled, "crowd_boxes", device)
    matched_idx, labels = model.criterion.matcher(anchors, gt_boxes, gt_valid, crowd_boxes, crowd_valid)
    gt_labels = torch.nn.utils.rnn.pad_sequence(
        [t["labels"].to(device=device, dtype=torch.int64).reshape(-1) for t in scaled], batch_first=True
    )
    anchor_classes = gt_labels.gather(1, matched_idx) if gt_labels.shape[1] else torch.zeros_like(matched_idx)
    return logits, anchor_classes, labels


def sample_losses(
    model, loader, gammas=GAMMAS, max_images: int | None = None, negatives_per_image: int | None = None,
    device: torch.device | str = "cpu", seed: int = 0,
) -> dict[str, dict[float, Tensor]]:
    """{"foreground" | "background": {gamma: (N,) focal loss of each sampled anchor}} over a loader.

    negatives_per_image: keep a random subset of this many background anchors per image (the
    paper samples ~10^7 negatives and ~10^5 positives); None keeps all. Every foreground anchor is kept.
    """
    generator = torch.Generator().manual_seed(seed)
    model = model.to(device).eval()
    collected: dict[str, dict[float, list[Tensor]]] = {group: {g: [] for g in gammas} for group in GROUPS}
    seen = 0
    for images, targets in loader:
        if max_images is not None and seen >= max_images:
            break
        if max_images is not None:
            images, targets = images[: max_images - seen], targets[: max_images - seen]
        seen += len(images)
        logits, anchor_classes, labels = anchor_logits_and_labels(model, images, targets)
        foreground = labels == FOREGROUND
        keep = {"foreground": foreground, "background": labels == BACKGROUND}
        if negatives_per_image is not None:
            scores = torch.rand(labels.shape, generator=generator).to(labels.device)
            scores = scores.masked_fill(~keep["background"], 2.0)
            cutoff = scores.kthvalue(min(negatives_per_image, labels.shape[1]), dim=1, keepdim=True).values
            keep["background"] &= scores <= cutoff
        for gamma in gammas:
            loss = focal_loss_per_anchor(logits, anchor_classes, foreground, alpha=-1.0, gamma=gamma)
            for group in GROUPS:
                collected[group][gamma].append(loss[keep[group]].cpu())
    if seen == 0:
        raise ValueError("the loader yielded no image")
    return {group: {g: torch.cat(parts) for g, parts in by_gamma.items()} for group, by_gamma in collected.items()}


def curves(losses: dict[str, dict[float, Tensor]], num_points: int = 201) -> dict:
    """Plain data for the JSON file: per group its sample count and, per gamma, the curve."""
    out = {}
    for group, by_gamma in losses.items():
        count = int(next(iter(by_gamma.values())).numel())
        entry = {"num_samples": count, "curves": {}}
        if count:
            for gamma, values in by_gamma.items():
                fraction, cumulative = cumulative_loss_curve(values, num_points)
                entry["curves"][str(gamma)] = {"fraction_of_samples": fraction, "cumulative_loss": cumulative}
        out[group] = entry
    return out


def write_csv(data: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "gamma", "fraction_of_samples", "cumulative_loss"])
        for group, entry in data.items():
            for gamma, curve in entry["curves"].items():
                for x, y in zip(curve["fraction_of_samples"], curve["cumulative_loss"]):
                    writer.writerow([group, gamma, f"{x:.6g}", f"{y:.6g}"])


def plot(data: dict, path: Path, title: str = "") -> bool:
    """Draw the two panels like the paper's Figure 4; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(1, 2, figsize=(8.0, 3.4), dpi=100, sharey=True)
    for axis, group in zip(axes, GROUPS):
        entry = data[group]
        for gamma, curve in entry["curves"].items():
            axis.plot(curve["fraction_of_samples"], curve["cumulative_loss"], label=f"γ = {float(gamma):g}")
        axis.set_title(f"{group} anchors ({entry['num_samples']:,})", fontsize=10)
        axis.set_xlabel("fraction of samples (sorted by loss)")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("cumulative normalised loss")
    axes[1].legend(loc="upper left", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint (model_final.pth)")
    parser.add_argument("--config", help="a config replacing the checkpoint's own (e.g. another dataset)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="config overrides, e.g. data.synthetic.root=... to find the dataset elsewhere")
    parser.add_argument("--split", choices=("val", "train"), default="val",
                        help="whose images (train: without flips, at the test size)")
    parser.add_argument("--images", type=int, help="at most this many images (default: the whole split)")
    parser.add_argument("--negatives-per-image", type=int, help="background anchors sampled per image (default: all)")
    parser.add_argument("--gammas", type=float, nargs="+", default=list(GAMMAS))
    parser.add_argument("--points", type=int, default=201, help="fractions at which the curves are written")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="figure4.png", help="the PNG; its .json and .csv are written beside it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model, cfg = load_model(args.checkpoint, args.config, args.overrides)
    if args.split == "val":
        dataset = build_val_dataset(cfg)
    else:
        dataset = build_datasets(cfg)[0]
        dataset.transforms = build_eval_transforms()
    loader = build_val_loader(dataset, batch_size=args.batch_size, num_workers=0)
    losses = sample_losses(model, loader, args.gammas, args.images, args.negatives_per_image, args.device)
    data = curves(losses, args.points)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"checkpoint": str(args.checkpoint), "split": args.split, "gammas": args.gammas, **data}
    out.with_suffix(".json").write_text(json.dumps(summary))
    write_csv(data, out.with_suffix(".csv"))
    for group in GROUPS:
        logger.info("%s: %d anchors", group, data[group]["num_samples"])
    if plot(data, out, title=f"{Path(args.checkpoint).parent.parent.name}: normalised cumulative focal loss"):
        logger.info("wrote %s, %s and %s", out, out.with_suffix(".json"), out.with_suffix(".csv"))
    else:
        logger.warning(
            "matplotlib is not installed: wrote the curves to %s and %s only. For the picture: pip install "
            "matplotlib (or pip install 'retinanet[plots]') and run this again", out.with_suffix(".json"),
            out.with_suffix(".csv"),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
