"""Feature pyramid: P3-P5 from C3-C5 by a top-down path, P6 and P7 by stride-2 convs."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class FPN(nn.Module):
    """RetinaNet's feature pyramid (paper, sec. 4; Lin et al. FPN).

    P5..P3: 1x1 lateral conv on C_l plus the nearest-upsampled coarser level, then a 3x3 conv.
    P6: 3x3 stride-2 conv on C5 (paper) or on P5 (torchvision v1). P7: ReLU then 3x3 stride-2 on P6.

    Args:
        in_channels: channels of C3, C4, C5.
        channels: C, the width of every output level (256).
        p6_from: "c5" or "p5".
    """

    def __init__(self, in_channels: tuple[int, int, int], channels: int = 256, p6_from: str = "c5"):
        super().__init__()
        if p6_from not in ("c5", "p5"):
            raise ValueError(f"p6_from must be 'c5' or 'p5', got {p6_from!r}")
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output_convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)
        self.p6_from = p6_from
        self.p6 = nn.Conv2d(in_channels[-1] if p6_from == "c5" else channels, channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.out_channels = channels
        for conv in self.modules():
            if isinstance(conv, nn.Conv2d):
                # "Xavier" fill of Caffe2 / detectron2 (c2_xavier_fill), also torchvision's FPN init.
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.constant_(conv.bias, 0)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """[C3, C4, C5] -> [P3, P4, P5, P6, P7], each (B, channels, H_l, W_l)."""
        inner = self.lateral_convs[-1](features[-1])
        outputs = [self.output_convs[-1](inner)]
        for level in range(len(features) - 2, -1, -1):
            lateral = self.lateral_convs[level](features[level])
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            outputs.insert(0, self.output_convs[level](inner))
        p6 = self.p6(features[-1] if self.p6_from == "c5" else outputs[-1])
        p7 = self.p7(F.relu(p6))
        return outputs + [p6, p7]
