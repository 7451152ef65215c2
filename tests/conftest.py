import os
import signal
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


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic COCO dataset shared by the training tests (generated once)."""
    from retinanet.data import make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, num_train=48, num_val=16, image_size=64, seed=0)
    return root


def train_overrides(synthetic_root, output_dir, max_iter: int = 6) -> list[str]:
    """A tiny, fast training run on the shared synthetic data."""
    root = Path(synthetic_root)
    return tiny_overrides(num_classes=3, size=64) + [
        f"data.train.ann_file={root / 'annotations' / 'instances_train.json'}",
        f"data.train.img_dir={root / 'train'}",
        f"data.val.ann_file={root / 'annotations' / 'instances_val.json'}",
        f"data.val.img_dir={root / 'val'}",
        "data.num_workers=0",
        "model.anchors.sizes=[8,16,32,64,128]",
        "solver.optimizer=adamw",
        "solver.base_lr=0.001",
        "solver.ims_per_batch=4",
        "solver.reference_batch_size=4",
        f"solver.max_iter={max_iter}",
        f"solver.steps=[{max_iter}]",
        "solver.warmup_iters=2",
        f"train.output_dir={output_dir}",
        "train.device=cpu",
        "train.log_period=1",
        "train.checkpoint_period=1000",
    ]


def varied_model(class_names=("cat", "dog", "bird"), score_bias: float = -11.0):
    """Tiny model whose scores spread over 0.05..0.99 on noise images, so that there are tens of
    detections of every class (an untrained head gives ~0.01 everywhere): Kaiming-initialised class
    subnet and a different prior per class. Returns (model in eval mode, cfg)."""
    from retinanet import build_model, load_config

    cfg = load_config(None, tiny_overrides(num_classes=len(class_names), size=128))
    torch.manual_seed(0)
    model = build_model(cfg, list(class_names)).eval()
    with torch.no_grad():
        for conv in [m for m in model.head.cls_subnet if isinstance(m, torch.nn.Conv2d)] + [model.head.cls_logits]:
            torch.nn.init.kaiming_normal_(conv.weight)
        biases = score_bias - torch.tensor([0.0, 1.0, 1.5])[: len(class_names)]
        model.head.cls_logits.bias.copy_(biases.repeat(9))  # channel = a * K + k
    return model, cfg


@pytest.fixture(scope="module")
def varied_checkpoint(tmp_path_factory):
    """(path, model): varied_model() saved as a checkpoint, with class names cat, dog, bird."""
    from retinanet.checkpoint import make_checkpoint, save_atomic

    model, cfg = varied_model()
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    save_atomic(make_checkpoint(model.state_dict(), cfg, model.class_names), path)
    return path, model


def default_stop_signals() -> None:
    """preexec_fn of a subprocess the test stops with a signal: SIGINT, SIGTERM and SIGHUP back to
    their default actions. A run keeps signals ignored when it starts (nohup), and a suite started in
    the background (CI under nohup, `cmd &` in a script) hands its children SIGHUP and SIGINT ignored."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The seam tests' dataset (tests/test_*_seams.py): 8 training and 4 validation images of 64 px."""
    from retinanet.data import make_synthetic

    root = tmp_path_factory.mktemp("seams_synthetic")
    make_synthetic(root, num_train=8, num_val=4, image_size=64, seed=0)
    return root
