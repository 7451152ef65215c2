"""Anchor boxes for the P3-P7 feature maps, cached per feature-map shape."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def cell_anchors(size: float, scales: list[float], aspect_ratios: list[float], torchvision_compat: bool = False) -> Tensor:
    """The A = len(aspect_ratios) * len(scales) anchors of one location, centred on (0, 0).

    Ordered ratio-major (all scales of the first ratio, then the next ratio), the order of
    torchvision's AnchorGenerator, so heads convert between the two without reshuffling.
    aspect_ratio = height / width; each anchor has area (size * scale)^2.

    Returns:
        (A, 4) xyxy in pixels.
    """
    if torchvision_compat:  # torchvision truncates size * scale to an integer pixel count
        sizes = torch.tensor([float(int(size * s)) for s in scales])
    else:
        sizes = torch.tensor([size * s for s in scales], dtype=torch.float64)
    ratios = torch.tensor(aspect_ratios, dtype=sizes.dtype)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    widths = (w_ratios[:, None] * sizes[None, :]).reshape(-1)
    heights = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
    anchors = torch.stack([-widths, -heights, widths, heights], dim=1) / 2
    if torchvision_compat:
        anchors = anchors.round()
    return anchors.float()


class AnchorGenerator(nn.Module):
    """Anchors of every pyramid level for a padded batch, all levels concatenated.

    Args:
        sizes: base anchor size per level in pixels (P3..P7: 32..512 in the paper).
        scales: multipliers per octave ({2^0, 2^(1/3), 2^(2/3)}).
        aspect_ratios: height / width ({0.5, 1, 2}).
        strides: pixel stride of each level (8..128).
        torchvision_compat: reproduce torchvision's integer sizes and rounded base anchors.
    """

    def __init__(
        self,
        sizes: list[float],
        scales: list[float],
        aspect_ratios: list[float],
        strides: list[int],
        torchvision_compat: bool = False,
    ):
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"need one anchor size per level: {len(sizes)} sizes for {len(strides)} strides")
        self.strides = list(strides)
        self.num_anchors_per_location = len(scales) * len(aspect_ratios)
        for level, size in enumerate(sizes):
            base = cell_anchors(size, scales, aspect_ratios, torchvision_compat)
            self.register_buffer(f"cell_anchors_{level}", base, persistent=False)
        self._cache: dict[tuple, Tensor] = {}

    def num_anchors(self, grid_sizes: list[tuple[int, int]]) -> list[int]:
        """Anchors per level for feature maps of the given (H, W) per level."""
        self._check_levels(grid_sizes)
        return [h * w * self.num_anchors_per_location for h, w in grid_sizes]

    def _check_levels(self, grid_sizes: list[tuple[int, int]]) -> None:
        # Fewer grids would silently drop levels (the head's outputs would not line up with the
        # anchors); more would look up a level with no base anchors.
        if len(grid_sizes) != len(self.strides):
            raise ValueError(
                f"got {len(grid_sizes)} grid sizes for {len(self.strides)} levels (strides {self.strides}): "
                "need one (H, W) per pyramid level"
            )

    def forward(self, grid_sizes: list[tuple[int, int]]) -> Tensor:
        """Anchors for feature maps of the given (H, W) per level.

        Returns:
            (sum_l H_l * W_l * A, 4) xyxy pixels of the padded image; level-major, then row, column,
            anchor: the order in which the head's outputs are flattened.
        """
        self._check_levels(grid_sizes)
        device = self.cell_anchors_0.device
        key = (tuple(grid_sizes), device)
        cached = self._cache.get(key)
        if cached is None:
            cached = torch.cat(
                [self._grid_anchors(level, h, w) for level, (h, w) in enumerate(grid_sizes)], dim=0
            )
            self._cache[key] = cached
        return cached

    def _grid_anchors(self, level: int, height: int, width: int) -> Tensor:
        return shifted_anchors(getattr(self, f"cell_anchors_{level}"), self.strides[level], height, width)

    def _apply(self, fn, recurse=True):  # a .to(device) invalidates the cache
        self._cache = {}
        return super()._apply(fn, recurse)


def shifted_anchors(cell_anchors: Tensor, stride: int, height: int | Tensor, width: int | Tensor) -> Tensor:
    """One level's anchors: the cell anchors placed at every location of an (H, W) feature map.

    Args:
        cell_anchors: (A, 4) xyxy anchors of one location, centred on (0, 0).
        stride: the level's stride in px.
        height, width: the feature map's size; ints, or 0-dim tensors of a traced shape (export).
    Returns:
        (H * W * A, 4) xyxy px of the padded image, ordered row, column, anchor.
    """
    device = cell_anchors.device
    shift_x = torch.arange(width, device=device, dtype=torch.float32) * stride
    shift_y = torch.arange(height, device=device, dtype=torch.float32) * stride
    yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
    shifts = torch.stack((xx, yy, xx, yy), dim=-1).reshape(-1, 1, 4)
    return (shifts + cell_anchors.view(1, -1, 4)).reshape(-1, 4)


def level_strides(num_levels: int = 5, first_level: int = 3) -> list[int]:
    return [int(math.pow(2, first_level + i)) for i in range(num_levels)]


def feature_grid_sizes(height: int, width: int, strides: Sequence[int]) -> list[tuple[int, int]]:
    """(H_l, W_l) of each pyramid level for a (height, width) padded input.

    Every stride-2 layer of the ResNet stem and stages, and the P6 / P7 convs, is a 3x3 (7x7 in
    the stem) conv or pool with padding k // 2, whose output side is ceil(side / 2): level 2^k is
    ceil applied k times (height / 2^k exactly when size_divisibility is a multiple of the stride).
    """
    grids = []
    for stride in strides:
        halvings = int(math.log2(stride))
        if 2**halvings != stride:
            raise ValueError(f"pyramid strides must be powers of 2, got {stride}")
        h, w = height, width
        for _ in range(halvings):
            h, w = (h + 1) // 2, (w + 1) // 2
        grids.append((h, w))
    return grids
