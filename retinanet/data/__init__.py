"""Data pipeline: COCO, VOC and YOLO datasets, flip augmentation, the synthetic dataset and the loaders."""

from retinanet.data.coco import BadImageError, CocoDetection, TrainSample, check_image_files, find_bad_images
from retinanet.data.formats import DATASET_FORMATS, VOC_CLASSES, read_dataset, read_voc, read_yolo
from retinanet.data.image import IMAGE_SUFFIXES, UnreadableImageError, read_image
from retinanet.data.loader import (
    InfiniteGroupedBatchSampler,
    ShardedSequentialSampler,
    build_datasets,
    build_train_loader,
    build_val_dataset,
    build_val_loader,
    collate,
    derive_seed,
    head_class_names,
    open_dataset,
)
from retinanet.data.synthetic import CATEGORIES as SYNTHETIC_CATEGORIES
from retinanet.data.synthetic import ensure_synthetic, make_synthetic
from retinanet.data.transforms import DetectionTransforms, build_eval_transforms, build_train_transforms

__all__ = [
    "BadImageError",
    "CocoDetection",
    "TrainSample",
    "check_image_files",
    "find_bad_images",
    "DATASET_FORMATS",
    "VOC_CLASSES",
    "read_dataset",
    "read_voc",
    "read_yolo",
    "IMAGE_SUFFIXES",
    "UnreadableImageError",
    "read_image",
    "InfiniteGroupedBatchSampler",
    "ShardedSequentialSampler",
    "build_datasets",
    "build_train_loader",
    "build_val_dataset",
    "build_val_loader",
    "collate",
    "derive_seed",
    "head_class_names",
    "open_dataset",
    "SYNTHETIC_CATEGORIES",
    "ensure_synthetic",
    "make_synthetic",
    "DetectionTransforms",
    "build_eval_transforms",
    "build_train_transforms",
]
