"""The classification and box subnets, each shared across pyramid levels."""

from __future__ import annotations

import math

from torch import Tensor, nn


def _subnet(channels: int, num_convs: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=norm == "none"))
        if norm == "gn":
            layers.append(nn.GroupNorm(32, channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class RetinaNetHead(nn.Module):
    """Two subnets of the same shape: num_convs x (3x3 conv, ReLU), then K*A class logits or 4*A deltas.

    Args:
        in_channels: channels of every pyramid level (256).
        num_anchors: A per location (9).
        num_classes: K.
        num_convs: 4 in the paper.
        norm: "none" (paper) or "gn" (GroupNorm(32) after each conv, torchvision v2).
        prior_prob: pi, the initial foreground probability of every anchor (0.01).
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        num_convs: int = 4,
        norm: str = "none",
        prior_prob: float = 0.01,
    ):
        super().__init__()
        if norm not in ("none", "gn"):
            raise ValueError(f"head norm must be 'none' or 'gn', got {norm!r}")
        self.num_anchors = num_anchors
        self.num_classes = num_classes
        self.cls_subnet = _subnet(in_channels, num_convs, norm)
        self.box_subnet = _subnet(in_channels, num_convs, norm)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.box_deltas = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        # pi = 0.01 so every anchor starts as background with p ~ 0.01 (paper, sec. 4.1):
        # without it the loss of ~100k easy negatives swamps the first iterations.
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """[P3..P7], each (B, C, H_l, W_l) -> per level (B, H_l*W_l*A, K) logits and (B, H_l*W_l*A, 4) deltas.

        Anchors are flattened row, column, anchor: the order of AnchorGenerator.
        """
        cls_per_level, box_per_level = [], []
        for feature in features:
            cls_per_level.append(self._flatten(self.cls_logits(self.cls_subnet(feature)), self.num_classes))
            box_per_level.append(self._flatten(self.box_deltas(self.box_subnet(feature)), 4))
        return cls_per_level, box_per_level

    def _flatten(self, output: Tensor, channels_per_anchor: int) -> Tensor:
        batch, _, height, width = output.shape
        output = output.view(batch, self.num_anchors, channels_per_anchor, height, width)
        return output.permute(0, 3, 4, 1, 2).reshape(batch, height * width * self.num_anchors, channels_per_anchor)

