"""Do the anchors fit the objects? Box statistics, anchor coverage and an anchor search.

Everything is measured in the frame the network sees: each training image resized as the model
resizes it (short side model.input.min_size_train, long side <= max_size_train) and padded to a
multiple of size_divisibility; the anchors are the real AnchorGenerator's for that padded image's
feature-map grid, so they depend on the image size.

A box is *covered* when its best anchor IoU is >= fg_iou_thresh: the matcher then gives it at least
one foreground anchor without low-quality matching. An uncovered box trains no classifier or box
regressor at all unless model.matcher.allow_low_quality_matches is on, and then only through
anchors that overlap it poorly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from retinanet.modeling.anchors import AnchorGenerator, cell_anchors, feature_grid_sizes
from retinanet.modeling.matcher import FOREGROUND, Matcher, pairwise_iou
from retinanet.modeling.preprocess import float32_ratio, resize_scale, resized_size, scale_boxes

# COCO's small / medium / large area ranges (px^2). COCO applies them to the object's area in the
# original image; here they apply to the box's area in the resized frame, which is what the anchors see.
SIZE_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("small", 0.0, 32.0**2),
    ("medium", 32.0**2, 96.0**2),
    ("large", 96.0**2, math.inf),
)


class TargetSource(Protocol):
    """What the analysis reads from a dataset: CocoDetection, or any list-like of targets."""

    def __len__(self) -> int: ...

    def load_target(self, index: int) -> dict[str, Any]: ...


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block.

    The analysis works on ~1 MB tensors, where intra-op threads cost more in synchronisation than
    they gain: on a busy 2-core machine, 3000 images at 800 px took 53 s with 2 threads and 7 s with
    one; a search candidate 77 ms against 17 ms.
    """
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(num_threads)


@dataclass
class TrainingBoxes:
    """Ground-truth boxes of (a sample of) a training set, in the resized frame.

    Attributes:
        boxes: (N, 4) float32 xyxy, pixels of the resized image (the network's input frame).
        image_index: (N,) int64 row of image_sizes each box belongs to, non-decreasing.
        image_sizes: (I, 2) int64 (h, w) of each resized image.
        padded_sizes: (I, 2) int64 (h, w) of each image padded to size_divisibility.
    """

    boxes: Tensor
    image_index: Tensor
    image_sizes: Tensor
    padded_sizes: Tensor

    @property
    def num_images(self) -> int:
        return self.image_sizes.shape[0]

    def boxes_per_image(self) -> Tensor:
        """(I,) int64 number of boxes of each image."""
        return torch.bincount(self.image_index, minlength=self.num_images)

    def widths_heights(self) -> Tensor:
        """(N, 2) float32 width, height in resized pixels."""
        return self.boxes[:, 2:] - self.boxes[:, :2]

    def sqrt_areas(self) -> Tensor:
        """(N,) sqrt(w * h) in resized pixels: the size the anchor sizes are compared with."""
        return self.widths_heights().prod(dim=1).sqrt()

    def aspect_ratios(self) -> Tensor:
        """(N,) height / width, the convention of model.anchors.aspect_ratios."""
        wh = self.widths_heights()
        return wh[:, 1] / wh[:, 0]

    def subset(self, box_indices: Tensor) -> TrainingBoxes:
        """The given boxes (sorted indices keep image_index non-decreasing); the images are kept."""
        return TrainingBoxes(
            self.boxes[box_indices], self.image_index[box_indices], self.image_sizes, self.padded_sizes
        )


def collect_training_boxes(
    dataset: TargetSource,
    min_sizes: Sequence[int],
    max_size: int,
    size_divisibility: int,
    max_images: int | None = None,
    seed: int = 0,
) -> TrainingBoxes:
    """Read every image's boxes (or those of `max_images` images drawn at random) and resize them.

    Args:
        dataset: its load_target(i) gives "boxes" (M, 4) xyxy pixels of the original image and
            "orig_size" (H, W); no image file is read.
        min_sizes: training short sides (model.input.min_size_train). With several (multi-scale
            training), image j of the sample takes min_sizes[j % len(min_sizes)]: every size equally
            often, deterministically.
        max_size: long side limit (model.input.max_size_train).
        size_divisibility: padding multiple (model.input.size_divisibility).
        max_images: analyse this many images drawn without replacement (seeded); None: all.
        seed: seed of that draw.
    """
    num_images = len(dataset)
    if max_images is not None and max_images < num_images:
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(num_images, generator=generator)[:max_images].sort().values.tolist()
    else:
        indices = list(range(num_images))
    boxes, image_index, image_sizes, padded_sizes = [], [], [], []
    for row, index in enumerate(indices):
        target = dataset.load_target(index)
        orig_h, orig_w = (int(side) for side in target["orig_size"])
        scale = resize_scale(orig_h, orig_w, min_sizes[row % len(min_sizes)], max_size)
        # The preprocessor keeps an image whose scale is exactly 1 as it is; resized_size agrees.
        height, width = resized_size(orig_h, orig_w, scale)
        image_boxes = target["boxes"].reshape(-1, 4).float()
        # The same float32 ratios as Preprocessor._scale_target, so the boxes are the training targets.
        boxes.append(scale_boxes(image_boxes, float32_ratio(width, orig_w), float32_ratio(height, orig_h)))
        image_index.append(torch.full((len(image_boxes),), row, dtype=torch.int64))
        image_sizes.append((height, width))
        padded_sizes.append(tuple(math.ceil(side / size_divisibility) * size_divisibility for side in (height, width)))
    return TrainingBoxes(
        boxes=torch.cat(boxes) if boxes else torch.zeros(0, 4),
        image_index=torch.cat(image_index) if image_index else torch.zeros(0, dtype=torch.int64),
        image_sizes=torch.tensor(image_sizes, dtype=torch.int64).reshape(-1, 2),
        padded_sizes=torch.tensor(padded_sizes, dtype=torch.int64).reshape(-1, 2),
    )


@dataclass
class AnchorCoverage:
    """How each box of a TrainingBoxes meets the anchors.

    Attributes:
        best_iou: (N,) float32 highest IoU of the box with any anchor of its image.
        best_level: (N,) int64 pyramid level of that anchor, 0 = the first (P3).
        num_positive: (N,) int64 anchors the matcher labels foreground and assigns to this box,
            without low-quality matches (an anchor goes to the box it overlaps most).
        fg_iou_thresh: the foreground threshold used.
    """

    best_iou: Tensor
    best_level: Tensor
    num_positive: Tensor
    fg_iou_thresh: float

    def covered(self) -> Tensor:
        """(N,) bool: the box has an anchor of IoU >= fg_iou_thresh."""
        return self.best_iou >= self.fg_iou_thresh


def anchor_coverage(
    boxes: TrainingBoxes, anchor_generator: AnchorGenerator, fg_iou_thresh: float, bg_iou_thresh: float
) -> AnchorCoverage:
    """Best anchor IoU, its level, and the foreground anchors of every box, image by image.

    The anchors of an image are anchor_generator's for its padded size (cached per grid shape). Of
    these, only the candidates of candidate_anchors enter the IoU matrix and the training Matcher
    (without low-quality matches): every other anchor has IoU < fg_iou_thresh with every box and
    is not the best anchor of any box, so the result equals the one over all anchors (a test checks
    it) while the IoU matrix holds a small share of the ~160k anchors of an 800 x 1088 image. One
    exception, at float rounding: the best IoU of an uncovered box may be 1 ulp below the full
    maximum, where anchors at several positions tie mathematically (along an axis where the
    anchor lies inside the box, moving it keeps the overlap) but not in float32.
    """
    with one_thread():
        matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        return _anchor_coverage(boxes, anchor_generator, matcher)


def _anchor_coverage(boxes: TrainingBoxes, anchor_generator: AnchorGenerator, matcher: Matcher) -> AnchorCoverage:
    fg_iou_thresh = matcher.fg_iou_thresh
    num_boxes = boxes.boxes.shape[0]
    best_iou = torch.zeros(num_boxes)
    best_level = torch.zeros(num_boxes, dtype=torch.int64)
    num_positive = torch.zeros(num_boxes, dtype=torch.int64)
    box_offsets = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.int64), boxes.boxes_per_image()]), 0).tolist()
    # The A anchor shapes of each level: the anchors of a one-cell grid, centred on (0, 0).
    cell = anchor_generator([(1, 1)] * len(anchor_generator.strides))
    shape_wh = (cell[:, 2:] - cell[:, :2]).view(len(anchor_generator.strides), -1, 2)
    for first, last in _image_chunks(box_offsets, CANDIDATE_CHUNK_BOXES):
        chunk = slice(box_offsets[first], box_offsets[last])
        candidates, candidate_offsets = candidate_anchors(
            boxes.boxes[chunk], boxes.padded_sizes[boxes.image_index[chunk]], shape_wh, anchor_generator.strides,
            fg_iou_thresh,
        )
        for image in range(first, last):
            start, end = box_offsets[image], box_offsets[image + 1]
            if start == end:
                continue
            grid_sizes = feature_grid_sizes(*boxes.padded_sizes[image].tolist(), anchor_generator.strides)
            anchors = anchor_generator(grid_sizes)
            level_ends = torch.tensor(anchor_generator.num_anchors(grid_sizes)).cumsum(0)
            local = slice(candidate_offsets[start - chunk.start], candidate_offsets[end - chunk.start])
            image_candidates = torch.unique(candidates[local])  # sorted: ties go to the first anchor
            iou = pairwise_iou(boxes.boxes[start:end], anchors[image_candidates])  # (M, K)
            image_best, best_candidate = iou.max(dim=1)
            matched_idx, labels = matcher.match_iou(iou[None], torch.ones(1, end - start, dtype=torch.bool))
            best_iou[start:end] = image_best
            best_level[start:end] = torch.searchsorted(level_ends, image_candidates[best_candidate], right=True)
            num_positive[start:end] = torch.bincount(matched_idx[labels == FOREGROUND], minlength=end - start)
    return AnchorCoverage(best_iou, best_level, num_positive, fg_iou_thresh)


CANDIDATE_CHUNK_BOXES = 1024  # boxes whose candidate anchors are listed at once (~10 MB of indices)


def _image_chunks(box_offsets: list[int], max_boxes: int) -> list[tuple[int, int]]:
    """(first, last) image ranges with at most max_boxes boxes each (or one image, if it has more)."""
    num_images, chunks, first = len(box_offsets) - 1, [], 0
    for image in range(num_images):
        if image > first and box_offsets[image + 1] - box_offsets[first] > max_boxes:
            chunks.append((first, image))
            first = image
    if first < num_images:
        chunks.append((first, num_images))
    return chunks


def candidate_anchors(
    boxes: Tensor, padded_sizes: Tensor, shape_wh: Tensor, strides: Sequence[int], fg_iou_thresh: float
) -> tuple[Tensor, list[int]]:
    """The anchors that can be a box's best anchor or have IoU >= fg_iou_thresh with it.

    Per level, the anchors at the grid points on either side of the box centre (the best anchor of
    every shape sits at the nearest one, see best_iou_nearest; both, because a centre halfway
    between two gives two IoUs that are equal up to float rounding), and those whose centre is
    within the distance that an
    IoU of fg_iou_thresh allows: IoU >= t needs inter >= t * max(box area, anchor area), and as the
    overlap along y is at most min(h, h_a), the overlap along x must be >= t * max(w, w_a), so
    |dx| <= (w + w_a) / 2 - t * max(w, w_a) (the same along y). Both make one rectangle of grid
    cells per box and level, listed here for all boxes at once.

    Args:
        boxes: (M, 4) xyxy, resized frame.
        padded_sizes: (M, 2) (h, w) of each box's padded image.
        shape_wh: (L, A, 2) width, height of each level's anchors.
        strides: per level.
    Returns:
        indices: (C,) int64 indices into the AnchorGenerator output of each box's image (levels
            concatenated; in each, row, column, anchor), box by box, possibly repeated.
        offsets: (M + 1,) the candidates of box m are indices[offsets[m]:offsets[m + 1]].
    """
    num_levels, num_shapes = shape_wh.shape[:2]
    grid = padded_sizes.flip(1)[:, None, :].repeat(1, num_levels, 1)  # (M, L, 2) columns, rows
    for level, stride in enumerate(strides):
        for _ in range(int(math.log2(stride))):  # feature_grid_sizes, for all boxes at once
            grid[:, level] = (grid[:, level] + 1) // 2
    cells_per_level = grid.prod(dim=2) * num_shapes  # (M, L) anchors of each level
    level_start = torch.cumsum(cells_per_level, dim=1) - cells_per_level
    stride = torch.tensor(strides, dtype=torch.float32)[None, :, None]  # (1, L, 1)
    box_wh = (boxes[:, 2:] - boxes[:, :2])[:, None, None, :]  # (M, 1, 1, 2)
    reach = ((box_wh + shape_wh[None]) / 2 - fg_iou_thresh * torch.maximum(box_wh, shape_wh[None])).amax(dim=2)
    reach = reach + 1.0  # (M, L, 2); 1 px of slack against rounding: a superset is harmless
    centers = ((boxes[:, :2] + boxes[:, 2:]) / 2)[:, None, :]  # (M, 1, 2) x, y
    last = grid - 1
    below = torch.minimum(torch.floor(centers / stride), last).clamp(min=0).long()
    above = torch.minimum(torch.ceil(centers / stride), last).clamp(min=0).long()
    low = torch.minimum(torch.ceil((centers - reach) / stride).clamp(min=0).long(), below)
    high = torch.maximum(torch.minimum(torch.floor((centers + reach) / stride).long(), last), above)
    extent = high - low + 1  # (M, L, 2) columns, rows of each rectangle
    cells = extent.prod(dim=2).flatten()  # (M * L,)
    rectangle = torch.repeat_interleave(torch.arange(cells.numel()), cells)
    within = torch.arange(rectangle.numel()) - torch.repeat_interleave(torch.cumsum(cells, 0) - cells, cells)
    columns = extent.view(-1, 2)[rectangle, 0]
    low = low.view(-1, 2)[rectangle]
    cell_index = (low[:, 1] + within // columns) * grid.view(-1, 2)[rectangle, 0] + low[:, 0] + within % columns
    indices = (level_start.flatten()[rectangle] + cell_index * num_shapes)[:, None] + torch.arange(num_shapes)
    per_box = cells.view(-1, num_levels).sum(dim=1) * num_shapes
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(per_box, 0)]).tolist()
    return indices.flatten(), offsets


def coverage_summary(boxes: TrainingBoxes, coverage: AnchorCoverage, strides: Sequence[int]) -> dict[str, Any]:
    """Coverage and foreground anchors per box, overall, by COCO size bucket (area in the resized
    frame) and by the pyramid level of each box's best anchor, as plain numbers."""
    areas = boxes.widths_heights().prod(dim=1)

    def stats(mask: Tensor) -> dict[str, Any]:
        count = int(mask.sum())
        if count == 0:
            return {"boxes": 0, "coverage": None, "mean_best_iou": None, "positives_mean": None,
                    "positives_median": None, "zero_positive_share": None}
        positives = coverage.num_positive[mask]
        return {
            "boxes": count,
            "coverage": float(coverage.covered()[mask].float().mean()),
            "mean_best_iou": float(coverage.best_iou[mask].mean()),
            "positives_mean": float(positives.float().mean()),
            "positives_median": float(positives.float().median()),
            "zero_positive_share": float((positives == 0).float().mean()),
        }

    by_size = {}
    for name, low, high in SIZE_BUCKETS:
        by_size[name] = {"area_range": [low, high if math.isfinite(high) else None],
                         **stats((areas >= low) & (areas < high))}
    by_level = {}
    for level, stride in enumerate(strides):
        by_level[f"P{int(math.log2(stride))}"] = {"stride": stride, **stats(coverage.best_level == level)}
    return {"all": stats(torch.ones_like(areas, dtype=torch.bool)), "by_size": by_size, "by_level": by_level}


# ----------------------------------------------------------------------------------------------
# Anchor search.


def nearest_anchor_offsets(boxes: TrainingBoxes, strides: Sequence[int]) -> Tensor:
    """(N, L, 2) |dx|, |dy| from each box centre to the nearest anchor centre of each level.

    Anchor centres sit at (column * stride, row * stride) of the level's grid (AnchorGenerator).
    """
    centers = (boxes.boxes[:, :2] + boxes.boxes[:, 2:]).double() / 2  # (N, 2) x, y
    padded = boxes.padded_sizes[boxes.image_index]  # (N, 2) h, w
    offsets = []
    for stride in strides:
        grid_hw = padded.clone()
        for _ in range(int(math.log2(stride))):  # feature_grid_sizes, vectorised
            grid_hw = (grid_hw + 1) // 2
        last = grid_hw.flip(1).double() - 1  # (N, 2) last column, last row
        nearest = torch.minimum(torch.round(centers / stride), last).clamp(min=0) * stride
        offsets.append((centers - nearest).abs())
    return torch.stack(offsets, dim=1)


def best_iou_nearest(box_wh: Tensor, offsets: Tensor, anchor_wh: Tensor) -> Tensor:
    """Best IoU of each box over all anchors, from box shapes and grid offsets only.

    For an anchor shape, the overlap along x only shrinks as |dx| grows, and along y as |dy| grows,
    so the best anchor of each shape and level is the one centred nearest the box centre in both
    axes: L * A IoUs per box give the exact best over the whole grid (the full IoU matrix has
    ~sum_l H_l W_l A).

    Args:
        box_wh: (N, 2) width, height of the boxes.
        offsets: (N, L, 2) from nearest_anchor_offsets.
        anchor_wh: (L, A, 2) width, height of each level's anchors.
    Returns:
        (N,) best IoU, in the dtype of the inputs.
    """
    # Intervals of lengths b and a whose centres are d apart overlap by min(b, a, (b + a) / 2 - d),
    # at least 0. In-place steps on (N, L, A) buffers: this runs once per candidate of the search.
    overlaps = []
    for axis in (0, 1):
        box_side = box_wh[:, axis, None, None]  # (N, 1, 1)
        anchor_side = anchor_wh[None, :, :, axis]  # (1, L, A)
        overlap = (anchor_side / 2 - offsets[:, :, axis, None]).add_(box_side / 2)
        overlap = torch.minimum(overlap, torch.minimum(box_side, anchor_side), out=overlap).clamp_(min=0)
        overlaps.append(overlap)
    inter = overlaps[0].mul_(overlaps[1])
    union = (box_wh.prod(dim=1)[:, None, None] + anchor_wh.prod(dim=-1)[None]).sub_(inter)
    return inter.div_(union).amax(dim=(1, 2))


def anchor_shapes(
    sizes: Sequence[float], scales: Sequence[float], aspect_ratios: Sequence[float], torchvision_compat: bool = False
) -> Tensor:
    """(L, A, 2) float64 width, height of each level's anchors, as AnchorGenerator makes them."""
    shapes = []
    for size in sizes:
        cell = cell_anchors(size, list(scales), list(aspect_ratios), torchvision_compat).double()
        shapes.append(cell[:, 2:] - cell[:, :2])
    return torch.stack(shapes)


@dataclass
class AnchorFit:
    """Result of fit_anchors: the anchors found and their score on the fitting sample.

    Attributes:
        sizes: one per level, px, ascending, rounded to 0.1 px.
        aspect_ratios: height / width, ascending, rounded to 3 decimals.
        coverage_before, coverage_after: share of the fitting sample's boxes covered by the given
            and by the found anchors.
        num_boxes: boxes the search scored candidates on.
        generations: mutations tried.
    """

    sizes: list[float]
    aspect_ratios: list[float]
    coverage_before: float
    coverage_after: float
    num_boxes: int
    generations: int

    def overrides(self) -> list[str]:
        """The KEY=VALUE config overrides that select these anchors."""
        return [f"model.anchors.sizes={_yaml_list(self.sizes)}",
                f"model.anchors.aspect_ratios={_yaml_list(self.aspect_ratios)}"]


def _yaml_list(values: Sequence[float]) -> str:
    return "[" + ",".join(f"{value:g}" for value in values) + "]"


# The search's knobs. Mutations follow YOLOv5's anchor evolution (utils/autoanchor.py): each
# parameter changes with probability 0.9 by a factor exp(N(0, sigma)), sigma = 0.1 times one
# uniform draw per generation (small and large steps both occur).
MUTATION_PROB = 0.9
MUTATION_SIGMA = 0.1
# The starting point is the best of the given pyramid scaled by 2^(k/4), k = -24..12 (1/64x to 8x),
# each with the given ratios and with ratios at the data's quantiles.
GLOBAL_SCALE_STEPS = range(-24, 13)
FIT_MAX_BOXES = 10000  # a larger training set is subsampled (seeded) for the search: ~1% standard error


def fit_anchors(
    boxes: TrainingBoxes,
    sizes: Sequence[float],
    scales: Sequence[float],
    aspect_ratios: Sequence[float],
    strides: Sequence[int],
    fg_iou_thresh: float,
    generations: int = 1000,
    seed: int = 0,
    torchvision_compat: bool = False,
    max_boxes: int = FIT_MAX_BOXES,
) -> AnchorFit:
    """Search anchor sizes (one per level) and aspect ratios that maximise the coverage.

    The number of sizes and ratios and the scales stay as given. The score of a candidate is its
    coverage (share of boxes with best IoU >= fg_iou_thresh), ties broken by the mean best IoU,
    computed exactly on the real anchor grid (best_iou_nearest). Start: the best global rescaling
    of the given anchors; then a (1+1) evolution strategy (YOLOv5's): mutate the log sizes and log
    ratios, keep the child when it scores at least as well as its parent.

    Args:
        boxes: the training boxes in the resized frame (collect_training_boxes).
        sizes, scales, aspect_ratios: the current anchors (model.anchors.*); ratios are height / width.
        strides: pyramid strides, one per size.
        fg_iou_thresh: model.matcher.fg_iou_thresh.
        generations: mutations to try.
        seed: seeds the subsample and the mutations; same inputs, same result.
        max_boxes: score candidates on at most this many boxes (a seeded random subset).
    """
    if boxes.boxes.shape[0] == 0:
        raise ValueError("fit_anchors: the training set has no box to fit anchors to")
    with one_thread():
        return _evolve(boxes, sizes, scales, aspect_ratios, strides, fg_iou_thresh, generations, seed,
                       torchvision_compat, max_boxes)


def _evolve(
    boxes: TrainingBoxes,
    sizes: Sequence[float],
    scales: Sequence[float],
    aspect_ratios: Sequence[float],
    strides: Sequence[int],
    fg_iou_thresh: float,
    generations: int,
    seed: int,
    torchvision_compat: bool,
    max_boxes: int,
) -> AnchorFit:
    generator = torch.Generator().manual_seed(seed)
    if boxes.boxes.shape[0] > max_boxes:
        boxes = boxes.subset(torch.randperm(boxes.boxes.shape[0], generator=generator)[:max_boxes].sort().values)
    box_wh = boxes.widths_heights()
    offsets = nearest_anchor_offsets(boxes, strides).float()
    max_side = float(boxes.padded_sizes.max())

    def score(log_sizes: Tensor, log_ratios: Tensor) -> tuple[float, float]:
        shapes = anchor_shapes(log_sizes.exp().tolist(), scales, log_ratios.exp().tolist(), torchvision_compat)
        best = best_iou_nearest(box_wh, offsets, shapes.float())
        return float((best >= fg_iou_thresh).double().mean()), float(best.double().mean())

    def normalise(log_sizes: Tensor, log_ratios: Tensor) -> tuple[Tensor, Tensor]:
        # Sizes ascend with the level as the strides do (a small anchor on a coarse grid lies far
        # from most box centres); the bounds keep a wild mutation from outgrowing the image.
        return (log_sizes.clamp(0.0, math.log(2 * max_side)).sort().values,
                log_ratios.clamp(-math.log(32), math.log(32)).sort().values)

    given = (torch.tensor(sizes, dtype=torch.float64).log(), torch.tensor(aspect_ratios, dtype=torch.float64).log())
    quantiles = (torch.arange(len(aspect_ratios), dtype=torch.float64) + 0.5) / len(aspect_ratios)
    data_ratios = torch.quantile(torch.log(box_wh[:, 1] / box_wh[:, 0]).double(), quantiles)
    parent, parent_score = given, score(*given)
    coverage_before = parent_score[0]
    for step in GLOBAL_SCALE_STEPS:
        for log_ratios in (given[1], data_ratios):
            candidate = normalise(given[0] + step * math.log(2) / 4, log_ratios)
            candidate_score = score(*candidate)
            if candidate_score > parent_score:
                parent, parent_score = candidate, candidate_score
    num_params = len(sizes) + len(aspect_ratios)
    for _ in range(generations):
        sigma = MUTATION_SIGMA * float(torch.rand(1, generator=generator))
        mutate = torch.rand(num_params, generator=generator) < MUTATION_PROB
        step = torch.randn(num_params, generator=generator, dtype=torch.float64) * sigma * mutate
        child = normalise(parent[0] + step[: len(sizes)], parent[1] + step[len(sizes):])
        child_score = score(*child)
        if child_score >= parent_score:  # equal scores move too: a walk along a plateau
            parent, parent_score = child, child_score
    fitted_sizes = [round(float(v), 1) for v in parent[0].exp()]
    fitted_ratios = [round(float(v), 3) for v in parent[1].exp()]
    rounded = (torch.tensor(fitted_sizes, dtype=torch.float64).log(),
               torch.tensor(fitted_ratios, dtype=torch.float64).log())
    return AnchorFit(
        sizes=fitted_sizes, aspect_ratios=fitted_ratios, coverage_before=coverage_before,
        coverage_after=score(*rounded)[0], num_boxes=boxes.boxes.shape[0], generations=generations,
    )
