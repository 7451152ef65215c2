"""ResNet backbone (torchvision builders) returning C3, C4, C5."""

from __future__ import annotations

import logging
from pathlib import Path

import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from .frozen_bn import fold_frozen_batchnorm

logger = logging.getLogger(__name__)

# Output channels of C3, C4, C5 per depth (basic blocks for 18/34, bottlenecks above).
RESNET_CHANNELS = {18: (128, 256, 512), 34: (128, 256, 512), 50: (512, 1024, 2048), 101: (512, 1024, 2048), 152: (512, 1024, 2048)}
NORM_LAYERS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d, "sync_bn": nn.BatchNorm2d}


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its classifier, returning the stride 8, 16 and 32 maps.

    Args:
        depth: 18, 34, 50, 101 or 152.
        norm: "frozen_bn" (fixed statistics and affine, the paper's choice with ImageNet weights;
            folded into the convolutions when fold_frozen_bn, see frozen_bn.py),
            "bn" or "sync_bn" (plain BatchNorm; the trainer converts it to SyncBatchNorm under DDP).
        freeze_at: 0 trains everything; 1 freezes the stem; k >= 2 also freezes res2..res(k)
            (detectron2's FREEZE_AT; 2 = torchvision's trainable_layers=3).
    """

    def __init__(self, depth: int = 50, norm: str = "frozen_bn", freeze_at: int = 2, fold_frozen_bn: bool = True):
        super().__init__()
        if depth not in RESNET_CHANNELS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_CHANNELS)}, got {depth}")
        if norm not in NORM_LAYERS:
            raise ValueError(f"backbone norm must be one of {sorted(NORM_LAYERS)}, got {norm!r}")
        resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=NORM_LAYERS[norm])
        self.body = nn.ModuleDict(
            {name: getattr(resnet, name) for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")}
        )
        if norm == "frozen_bn" and fold_frozen_bn:
            fold_frozen_batchnorm(self.body)  # same state dict, one pass less per conv
        self.depth = depth
        self.out_channels = RESNET_CHANNELS[depth]
        self.freeze_at = freeze_at
        self._freeze()

    def _freeze(self) -> None:
        frozen = []
        if self.freeze_at >= 1:
            frozen += ["conv1", "bn1"]
        frozen += [f"layer{i}" for i in range(1, min(self.freeze_at, 5))]
        for name in frozen:
            for param in self.body[name].parameters():
                param.requires_grad_(False)

    def load_weights(self, source: str) -> None:
        """Load ImageNet weights from a local .pth file or "torchvision:<ENUM>" (needs the network).

        Raises:
            FileNotFoundError: no file at `source`.
            CheckpointError: the file is not a readable PyTorch file (truncated, pickled code, ...).
            ValueError: it holds no ResNet state dict of this depth.
        """
        if source.startswith("torchvision:"):
            enum_name = source.split(":", 1)[1]
            weights = torchvision.models.get_weight(f"ResNet{self.depth}_Weights.{enum_name}")
            state = weights.get_state_dict(progress=False)
        else:
            from ..checkpoint import read_torch_file  # retinanet.checkpoint imports this package

            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"model.backbone.weights: no file at {path}")
            state = read_torch_file(path, "model.backbone.weights file")
            for key in ("model", "state_dict"):
                if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                    state = state[key]
            if not isinstance(state, dict):
                raise ValueError(f"model.backbone.weights={source}: not a ResNet-{self.depth} state dict "
                                 f"(the file holds a {type(state).__name__})")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            missing, unexpected = self.body.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(f"model.backbone.weights={source}: not a ResNet-{self.depth} state dict: {err}") from None
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(
                f"model.backbone.weights={source}: not a ResNet-{self.depth} state dict "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        logger.info("loaded backbone weights from %s", source)

    def forward(self, images: Tensor) -> list[Tensor]:
        """(B, 3, H, W) normalised images -> [C3, C4, C5] at strides 8, 16, 32."""
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(images))))
        c2 = b.layer1(x)
        c3 = b.layer2(c2)
        c4 = b.layer3(c3)
        c5 = b.layer4(c4)
        return [c3, c4, c5]
