"""Data pipeline: COCO-format datasets, flip augmentation, the synthetic dataset and the loaders."""

from retinanet.data.coco import CocoDetection, TrainSample
from retinanet.data.loader import (
    InfiniteGroupedBatchSampler,
    ShardedSequentialSampler,
    build_datasets,
    build_train_loader,
    build_val_loader,
    collate,
    derive_seed,
)
from retinanet.data.synthetic import CATEGORIES as SYNTHETIC_CATEGORIES
from retinanet.data.synthetic import ensure_synthetic, make_synthetic
from retinanet.data.transforms import DetectionTransforms, build_eval_transforms, build_train_transforms

__all__ = [
    "CocoDetection",
    "TrainSample",
    "InfiniteGroupedBatchSampler",
    "ShardedSequentialSampler",
    "build_datasets",
    "build_train_loader",
    "build_val_loader",
    "collate",
    "derive_seed",
    "SYNTHETIC_CATEGORIES",
    "ensure_synthetic",
    "make_synthetic",
    "DetectionTransforms",
    "build_eval_transforms",
    "build_train_transforms",
]
