"""`retinanet analyze-data`: box statistics, anchor coverage and the anchor search.

Hand-made cases on one 128 x 128 image with one anchor per location (scale 1, ratio 1, sizes 32..512
on strides 8..128): a P3 anchor is a 32 x 32 square centred on a multiple of 8.
"""

import json
import logging
import math
import sys

import pytest
import torch

from retinanet import build_model, load_config
from retinanet.analysis import anchors as analysis
from retinanet.analysis import (
    TrainingBoxes,
    anchor_coverage,
    collect_training_boxes,
    coverage_summary,
    feature_grid_sizes,
    fit_anchors,
)
from retinanet.analysis.anchors import anchor_shapes, best_iou_nearest, nearest_anchor_offsets
from retinanet.cli import main
from retinanet.data import make_synthetic
from retinanet.modeling.anchors import AnchorGenerator
from retinanet.modeling.matcher import FOREGROUND, Matcher, pairwise_iou
from retinanet.modeling.preprocess import Preprocessor

from conftest import tiny_overrides

STRIDES = [8, 16, 32, 64, 128]
SIZES = [32.0, 64.0, 128.0, 256.0, 512.0]
DEFAULT_SCALES = [1.0, 2 ** (1 / 3), 2 ** (2 / 3)]


def one_image(*boxes: list[float], size: int = 128) -> TrainingBoxes:
    """Boxes (xyxy, resized frame) of one size x size image, padded to itself."""
    return TrainingBoxes(
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        image_index=torch.zeros(len(boxes), dtype=torch.int64),
        image_sizes=torch.tensor([[size, size]]),
        padded_sizes=torch.tensor([[size, size]]),
    )


def square_anchors() -> AnchorGenerator:
    return AnchorGenerator(SIZES, [1.0], [1.0], STRIDES)


class TargetList:
    """The part of CocoDetection that the analysis reads."""

    def __init__(self, targets):
        self.targets = targets

    def __len__(self):
        return len(self.targets)

    def load_target(self, index):
        return self.targets[index]


@pytest.mark.parametrize(
    "box, best_iou, positives, level",
    [
        # Equal to the P3 anchor at (64, 64): IoU 1. Its 4 neighbours 8 px away overlap 24 x 32 of
        # 32 x 32: IoU 768 / 1280 = 0.6, foreground too; the diagonal ones 576 / 1472 = 0.39 do not.
        ([48, 48, 80, 80], 1.0, 5, 0),
        # Half the side (a quarter of the area) of that anchor, same centre: IoU 256 / 1024 = 0.25
        # with it, less with any other: not covered, no foreground anchor.
        ([56, 56, 72, 72], 0.25, 0, 0),
        # Centred halfway between the P3 anchors at x = 64 and 72: IoU 28 * 32 / (2048 - 896) = 7/9
        # with both; the next ones (12 px, or 4 and 8 px away) fall below 0.5.
        ([52, 48, 84, 80], 7 / 9, 2, 0),
        # 32 x 64, between two anchor sizes: IoU exactly 0.5 with the 32 x 32 P3 anchors inside it
        # (5 of them, x = 64, y = 48..80) and with the 64 x 64 P4 anchors at x = 48, 64, 80; the
        # first anchor (P3) is the best one of the tie.
        ([48, 32, 80, 96], 0.5, 8, 0),
    ],
    ids=["equal", "half-side", "between-two-anchors", "between-two-sizes"],
)
def test_hand_made_coverage(box, best_iou, positives, level):
    coverage = anchor_coverage(one_image(box), square_anchors(), fg_iou_thresh=0.5, bg_iou_thresh=0.4)
    assert coverage.best_iou.tolist() == pytest.approx([best_iou], abs=1e-6)
    assert coverage.covered().tolist() == [best_iou >= 0.5]
    assert coverage.num_positive.tolist() == [positives]
    assert coverage.best_level.tolist() == [level]


def test_an_anchor_counts_for_the_box_it_overlaps_most():
    # Two 32 x 32 boxes centred 16 px apart: the P3 anchor halfway (IoU 0.6 with both) goes to the
    # first box of the tie, as in the matcher; each box keeps its own centred anchor and its other 3
    # neighbours, and the first also gets the shared one: 5 and 4 foreground anchors.
    coverage = anchor_coverage(one_image([48, 48, 80, 80], [64, 48, 96, 80]), square_anchors(), 0.5, 0.4)
    assert coverage.num_positive.tolist() == [5, 4]
    assert coverage.best_iou.tolist() == [1.0, 1.0]


def test_coverage_summary_buckets_use_areas_in_the_resized_frame():
    # Areas 31^2 (small), exactly 32^2 (medium: COCO's ranges are [low, high)), 96^2 (large).
    boxes = one_image([0, 0, 31, 31], [0, 0, 32, 32], [0, 0, 96, 96], size=256)
    coverage = analysis.AnchorCoverage(
        best_iou=torch.tensor([0.2, 0.6, 0.9]), best_level=torch.tensor([0, 0, 2]),
        num_positive=torch.tensor([0, 3, 6]), fg_iou_thresh=0.5,
    )
    summary = coverage_summary(boxes, coverage, STRIDES)
    assert [summary["by_size"][name]["boxes"] for name in ("small", "medium", "large")] == [1, 1, 1]
    assert summary["by_size"]["small"]["coverage"] == 0.0 and summary["by_size"]["large"]["coverage"] == 1.0
    assert summary["by_level"]["P3"]["boxes"] == 2 and summary["by_level"]["P5"]["boxes"] == 1
    assert summary["by_level"]["P4"]["coverage"] is None
    assert summary["all"]["coverage"] == pytest.approx(2 / 3)
    assert summary["all"]["positives_mean"] == pytest.approx(3.0)
    assert summary["all"]["positives_median"] == 3.0
    assert summary["all"]["zero_positive_share"] == pytest.approx(1 / 3)


def random_boxes(num_images: int, seed: int = 0) -> TrainingBoxes:
    """Images of assorted sizes (grids of odd sizes included) with 0-7 boxes of 3-200 px each."""
    generator = torch.Generator().manual_seed(seed)
    boxes, image_index, sizes = [], [], []
    for image in range(num_images):
        height, width = (int(v) for v in torch.randint(40, 300, (2,), generator=generator))
        count = int(torch.randint(0, 8, (), generator=generator))
        wh = torch.rand(count, 2, generator=generator) * torch.tensor([min(width, 200) - 3, min(height, 200) - 3]) + 3
        xy = torch.rand(count, 2, generator=generator) * (torch.tensor([width, height]) - wh)
        boxes.append(torch.cat([xy, xy + wh], dim=1))
        image_index.append(torch.full((count,), image))
        sizes.append((height, width))
    sizes = torch.tensor(sizes)
    # size_divisibility 1: the padded image is the image, grids are ceil(side / stride) (odd ones too).
    return TrainingBoxes(torch.cat(boxes), torch.cat(image_index), sizes, sizes.clone())


@pytest.mark.parametrize("fg_iou_thresh, compat", [(0.5, False), (0.4, True), (0.7, False)])
def test_coverage_equals_the_matcher_over_all_anchors(monkeypatch, fg_iou_thresh, compat):
    """The candidate anchors lose nothing: the same foreground count, coverage and best IoU as the
    full IoU matrix of every anchor through the training Matcher, and the same level for covered
    boxes. (An uncovered box's best IoU may be another anchor's by one float rounding: where an
    anchor lies inside the box along an axis, moving it keeps the IoU mathematically equal.)"""
    monkeypatch.setattr(analysis, "CANDIDATE_CHUNK_BOXES", 9)  # several chunks
    boxes = random_boxes(40)
    generator = AnchorGenerator(SIZES, DEFAULT_SCALES, [0.5, 1.0, 2.0], STRIDES, torchvision_compat=compat)
    coverage = anchor_coverage(boxes, generator, fg_iou_thresh, 0.3)
    matcher = Matcher(fg_iou_thresh, 0.3)
    offsets = [0] + torch.cumsum(boxes.boxes_per_image(), 0).tolist()
    for image in range(boxes.num_images):
        start, end = offsets[image], offsets[image + 1]
        if start == end:
            continue
        grid_sizes = feature_grid_sizes(*boxes.padded_sizes[image].tolist(), STRIDES)
        anchors = generator(grid_sizes)
        iou = pairwise_iou(boxes.boxes[start:end], anchors)
        best, best_anchor = iou.max(dim=1)
        level = torch.searchsorted(torch.tensor(generator.num_anchors(grid_sizes)).cumsum(0), best_anchor, right=True)
        matched, labels = matcher.match_iou(iou[None], torch.ones(1, end - start, dtype=torch.bool))
        positives = torch.bincount(matched[labels == FOREGROUND], minlength=end - start)
        covered = best >= fg_iou_thresh
        torch.testing.assert_close(coverage.best_iou[start:end], best, atol=1e-6, rtol=0)
        assert torch.equal(coverage.covered()[start:end], covered)
        assert torch.equal(coverage.best_iou[start:end][covered], best[covered])
        assert torch.equal(coverage.best_level[start:end][covered], level[covered])
        assert torch.equal(coverage.num_positive[start:end], positives)
    assert 0 < coverage.covered().float().mean() < 1


def test_search_iou_from_shapes_equals_the_real_grid():
    """best_iou_nearest (the search's score: L x A IoUs per box) gives each box's best IoU over
    the AnchorGenerator's whole grid."""
    boxes = random_boxes(30, seed=1)
    sizes, ratios = [20.0, 45.0, 90.0, 150.0, 300.0], [0.3, 1.0, 2.5]
    coverage = anchor_coverage(boxes, AnchorGenerator(sizes, DEFAULT_SCALES, ratios, STRIDES), 0.5, 0.4)
    fast = best_iou_nearest(
        boxes.widths_heights().double(), nearest_anchor_offsets(boxes, STRIDES),
        anchor_shapes(sizes, DEFAULT_SCALES, ratios),
    )
    torch.testing.assert_close(fast.float(), coverage.best_iou, atol=1e-5, rtol=0)


def test_feature_grid_sizes_match_the_network():
    cfg = load_config(None, tiny_overrides())
    model = build_model(cfg).eval()
    for height, width in ((128, 128), (100, 130), (37, 250)):
        with torch.no_grad():
            features = model.fpn(model.backbone(torch.zeros(1, 3, height, width)))
        assert feature_grid_sizes(height, width, STRIDES) == [tuple(f.shape[-2:]) for f in features]


def test_boxes_are_resized_as_the_preprocessor_resizes_the_targets():
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 110.0, 70.0], [0.5, 0.5, 3.3, 7.7]]), "orig_size": (333, 517)},
        {"boxes": torch.zeros(0, 4), "orig_size": (64, 48)},
        {"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]), "orig_size": (401, 97)},
    ]
    min_sizes, max_size = [200, 240], 300
    boxes = collect_training_boxes(TargetList(targets), min_sizes, max_size, size_divisibility=32)
    assert boxes.boxes_per_image().tolist() == [2, 0, 1]
    for row, target in enumerate(targets):
        preprocessor = Preprocessor([min_sizes[row % 2]], max_size, 800, 1333, [0.0] * 3, [1.0] * 3, 32).train()
        image = torch.zeros(3, *target["orig_size"])
        _, image_sizes, _, scaled = preprocessor([image], [{"boxes": target["boxes"], "labels": torch.zeros(
            len(target["boxes"]), dtype=torch.int64)}])
        assert tuple(boxes.image_sizes[row].tolist()) == image_sizes[0]
        assert boxes.padded_sizes[row].tolist() == [math.ceil(side / 32) * 32 for side in image_sizes[0]]
        assert torch.equal(boxes.boxes[boxes.image_index == row], scaled[0]["boxes"])


def test_max_images_draws_a_seeded_sample():
    targets = [{"boxes": torch.tensor([[0.0, 0.0, i + 1.0, i + 1.0]]), "orig_size": (100, 100)} for i in range(20)]
    first = collect_training_boxes(TargetList(targets), [100], 100, 1, max_images=5, seed=3)
    again = collect_training_boxes(TargetList(targets), [100], 100, 1, max_images=5, seed=3)
    assert first.num_images == 5 and torch.equal(first.boxes, again.boxes)
    assert len(set(first.boxes[:, 2].tolist())) == 5


def test_fit_finds_the_ratio_of_4_to_1_boxes_and_raises_coverage():
    # Only wide 4:1 boxes (height / width = 0.25), 8..24 px high, centred on P3 anchor centres so
    # that the shape is the only mismatch. The default anchors' widest ratio is 0.5: a 4a x a box
    # and a 2:1 anchor of the same area overlap by 2.83 a^2 of 5.17 a^2, IoU 0.547 at best, and
    # below 0.5 when the size is off by more than ~5% (sizes step by 2^(1/3)).
    generator = torch.Generator().manual_seed(0)
    count = 600
    heights = 8 + 16 * torch.rand(count, generator=generator)
    wh = torch.stack([4 * heights, heights], dim=1)
    centers = torch.randint(16, 48, (count, 2), generator=generator) * 8.0
    boxes = TrainingBoxes(torch.cat([centers - wh / 2, centers + wh / 2], 1), torch.arange(count) // 6,
                          torch.full((100, 2), 512), torch.full((100, 2), 512))
    fit = fit_anchors(boxes, SIZES, DEFAULT_SCALES, [0.5, 1.0, 2.0], STRIDES, 0.5, generations=300, seed=0)
    assert min(abs(math.log(ratio / 0.25)) for ratio in fit.aspect_ratios) < math.log(1.1), fit
    assert fit.coverage_before < 0.8 and fit.coverage_after > 0.95, fit
    # The real anchors agree with the search's score.
    after = anchor_coverage(boxes, AnchorGenerator(fit.sizes, DEFAULT_SCALES, fit.aspect_ratios, STRIDES), 0.5, 0.4)
    assert after.covered().double().mean().item() == pytest.approx(fit.coverage_after, abs=1e-9)
    # Its overrides are valid config overrides that select these anchors.
    cfg = load_config(None, fit.overrides())
    assert cfg.model.anchors.sizes == fit.sizes and cfg.model.anchors.aspect_ratios == fit.aspect_ratios
    assert fit == fit_anchors(boxes, SIZES, DEFAULT_SCALES, [0.5, 1.0, 2.0], STRIDES, 0.5, generations=300, seed=0)


@pytest.fixture(scope="module")
def tiny_synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze_synthetic")
    make_synthetic(root, num_train=12, num_val=2, image_size=64, seed=0)
    return root


def analyze_argv(root, output, *extra):
    return ["analyze-data", *tiny_overrides(size=64), f"data.synthetic.root={root}", "data.synthetic.num_train=12",
            "data.synthetic.num_val=2", "data.synthetic.image_size=64", "--output", str(output), *extra]


def test_cli_writes_summary_and_plots(tiny_synthetic, tmp_path, caplog):
    out = tmp_path / "analysis"
    caplog.set_level(logging.INFO)
    argv = analyze_argv(tiny_synthetic, out, "--max-images", "10", "--fit-anchors", "--generations", "30")
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"]["images_total"] == 12 and summary["dataset"]["images_analysed"] == 10
    assert summary["frame"]["min_size_train"] == [64]
    assert set(summary["coverage"]["by_size"]) == {"small", "medium", "large"}
    assert set(summary["coverage"]["by_level"]) == {"P3", "P4", "P5", "P6", "P7"}
    assert summary["fitted"]["overrides"][0].startswith("model.anchors.sizes=[")
    assert summary["fitted"]["coverage"]["all"]["coverage"] >= summary["coverage"]["all"]["coverage"]
    for name in ("boxes_per_image", "box_sizes", "aspect_ratios", "anchor_coverage"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "summary.txt").read_text()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "coverage" in table and table.splitlines()[0] in logged
    assert " ".join(summary["fitted"]["overrides"]) in logged


def test_cli_without_matplotlib_writes_the_numbers_and_says_how_to_get_plots(
    tiny_synthetic, tmp_path, caplog, monkeypatch
):
    # As on a machine without matplotlib: any `import matplotlib...` raises ImportError, and the
    # plots module is imported afresh.
    for name in [name for name in sys.modules if name.startswith(("matplotlib.", "retinanet.analysis.plots"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "analysis"
    assert main(analyze_argv(tiny_synthetic, out)) == 0
    assert (out / "summary.json").is_file() and (out / "summary.txt").is_file()
    assert not list(out.glob("*.png"))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("pip install 'retinanet[plots]'" in message for message in warnings)


def test_cli_user_errors_exit_2(tiny_synthetic, tmp_path):
    assert main(["analyze-data", str(tmp_path / "missing.yaml")]) == 2
    assert main(analyze_argv(tiny_synthetic, tmp_path / "out", "model.anchors.sizes=[1,2]")) == 2
    missing = ["data.synthetic.root=",
               f"data.train.ann_file={tmp_path / 'none.json'}", f"data.train.img_dir={tmp_path}",
               f"data.val.ann_file={tmp_path / 'none.json'}", f"data.val.img_dir={tmp_path}"]
    assert main(["analyze-data", *missing, "--output", str(tmp_path / "out")]) == 2
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(analyze_argv(tiny_synthetic, blocker / "analysis")) == 2
