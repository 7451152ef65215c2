import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_overrides(num_classes: int = 3, size: int = 128) -> list[str]:
    """A ResNet-18 RetinaNet on small images: the suite's standard model."""
    return [
        "model.backbone.depth=18",
        "model.backbone.norm=bn",
        "model.backbone.freeze_at=0",
        f"model.num_classes={num_classes}",
        f"model.input.min_size_train=[{size}]",
        f"model.input.max_size_train={2 * size}",
        f"model.input.min_size_test={size}",
        f"model.input.max_size_test={2 * size}",
        "model.fpn.channels=64",
        "model.head.channels=64",
    ]


@pytest.fixture
def tiny_cfg():
    from retinanet import load_config

    return load_config(None, tiny_overrides())
