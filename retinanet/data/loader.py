"""Batching: the infinite, resumable training sampler, the sharded evaluation sampler, the loaders.

Training data is one infinite stream. Epoch e is a permutation of the dataset drawn from a
torch.Generator seeded with (seed, e), plus one transform seed per position of that permutation;
epochs follow each other. The stream is cut into *global* batches of batch_size * world_size
samples, by aspect group when grouping is on, and global batch b is split between the ranks:
rank r takes its r-th slice as its b-th batch. Hence:

- every rank sees a disjoint share of each epoch, and all ranks take the same number of batches;
- what a rank's b-th batch holds, and with which transform seeds, depends only on
  (seed, b, rank, world_size, dataset aspect groups): not on workers, timing, or interruptions;
- resuming at iteration k is `start_batch=k`: the sampler replays the stream (cheap tensor work,
  no image is read) and starts yielding at batch k, exactly what the uninterrupted run yielded.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import random
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from retinanet.config import Config, DataConfig, DatasetConfig
from retinanet.data.coco import CocoDetection, TrainSample, check_image_files, describe_bad_images, find_bad_images
from retinanet.data.formats import read_dataset
from retinanet.data.synthetic import ensure_synthetic
from retinanet.data.transforms import build_eval_transforms, build_train_transforms

logger = logging.getLogger(__name__)

SEED_BITS = 62  # transform seeds are drawn in [0, 2**62), within torch's manual_seed range


def derive_seed(*values: int) -> int:
    """A 63-bit seed mixing several integers (e.g. (seed, epoch)); distinct tuples do not collide
    in practice, unlike `seed + epoch`."""
    digest = hashlib.blake2b(repr(tuple(int(v) for v in values)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def collate(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """[(image, target), ...] -> ([image, ...], [target, ...]); images keep their own sizes (the
    model resizes and pads them on the device)."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets


class InfiniteGroupedBatchSampler(Sampler[list[TrainSample]]):
    """Endless batches of TrainSample(index, epoch, seed) for one rank (see the module docstring).

    Args:
        num_samples: dataset size.
        batch_size: samples per batch of this rank.
        seed: the run's seed; all ranks must pass the same one.
        group_ids: (num_samples,) aspect group of each sample (e.g. 1 landscape, 0 portrait); a
            batch only holds one group. None: no grouping.
        rank, world_size: this process and the number of processes.
        start_batch: index of the first batch to yield (number of batches already consumed).

    With grouping, samples wait in their group's queue until it holds a full global batch; what is
    left at the end of an epoch is carried into the next one, so no sample is dropped, and a batch
    may mix the end of one epoch with the start of the next.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        group_ids: Sequence[int] | None = None,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"InfiniteGroupedBatchSampler: the dataset is empty (num_samples={num_samples})")
        if batch_size < 1:
            raise ValueError(f"InfiniteGroupedBatchSampler: batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"InfiniteGroupedBatchSampler: need 0 <= rank < world_size, got {rank}, {world_size}")
        if start_batch < 0:
            raise ValueError(f"InfiniteGroupedBatchSampler: start_batch must be >= 0, got {start_batch}")
        if group_ids is not None and len(group_ids) != num_samples:
            raise ValueError(f"InfiniteGroupedBatchSampler: {len(group_ids)} group ids for {num_samples} samples")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        # Contiguous group ids 0..G-1.
        groups = torch.zeros(num_samples, dtype=torch.int64) if group_ids is None else torch.as_tensor(group_ids)
        _, self.group_ids = torch.unique(groups.to(torch.int64), return_inverse=True)
        self.num_groups = int(self.group_ids.max()) + 1

    def epoch_stream(self, epoch: int) -> tuple[Tensor, Tensor]:
        """The stream's epoch `epoch`: (num_samples,) dataset indices and their transform seeds."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        order = torch.randperm(self.num_samples, generator=generator)
        seeds = torch.randint(0, 2**SEED_BITS, (self.num_samples,), generator=generator)
        return order, seeds

    def global_batches(self, start_batch: int = 0) -> Iterator[Tensor]:
        """Endless global batches from `start_batch` on: (B, 3) int64 rows (index, epoch, seed),
        B = batch_size * world_size, all of one group."""
        global_batch_size = self.batch_size * self.world_size
        # Per group, the samples waiting for a full batch: (n, 3) rows (index, epoch, seed).
        pending = [torch.zeros((0, 3), dtype=torch.int64) for _ in range(self.num_groups)]
        to_skip = start_batch
        epoch = 0
        while True:
            order, seeds = self.epoch_stream(epoch)
            rows = torch.stack([order, torch.full_like(order, epoch), seeds], dim=1)
            positions = torch.arange(self.num_samples)
            group_of_row = self.group_ids[order]
            batches, completed_at = [], []
            for group in range(self.num_groups):
                in_group = group_of_row == group
                queue = torch.cat([pending[group], rows[in_group]])
                queue_positions = torch.cat([torch.full((len(pending[group]),), -1), positions[in_group]])
                num_full = len(queue) // global_batch_size
                used = num_full * global_batch_size
                batches.append(queue[:used].view(num_full, global_batch_size, 3))
                # A batch is complete when its last sample arrives; that is when a sequential
                # bucketing loop would emit it, which sets the order of batches across groups.
                completed_at.append(queue_positions[global_batch_size - 1 : used : global_batch_size])
                pending[group] = queue[used:]
            epoch_batches = torch.cat(batches)[torch.argsort(torch.cat(completed_at))]
            if to_skip >= len(epoch_batches):
                to_skip -= len(epoch_batches)
            else:
                yield from epoch_batches[to_skip:]
                to_skip = 0
            epoch += 1

    def __iter__(self) -> Iterator[list[TrainSample]]:
        start, end = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for global_batch in self.global_batches(self.start_batch):
            yield [TrainSample(*row) for row in global_batch[start:end].tolist()]


class ShardedSequentialSampler(Sampler[int]):
    """Indices of one rank's contiguous share of the dataset, in order, each index on exactly one
    rank (no padding duplicates: ranks may get one sample more or less than each other).

    Rank r gets [r * N // world_size, (r + 1) * N // world_size).
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardedSequentialSampler: need 0 <= rank < world_size, got {rank}, {world_size}")
        self.begin = rank * num_samples // world_size
        self.end = (rank + 1) * num_samples // world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin


# The stop signals a terminal sends to the whole process group, workers included: Ctrl-C's SIGINT,
# a closed session's SIGHUP. Not SIGTERM: multiprocessing ends leftover workers with it at exit.
TERMINAL_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGHUP") if hasattr(signal, name))


def _ignore_stop_signals() -> None:
    """Leave a stop to the main process: it finishes the iteration with the workers' batches and
    saves. A worker that died of the signal would break the loader first (a forked worker inherits
    the trainer's handler, a spawned one the default, which ends it)."""
    for sig in TERMINAL_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _seed_worker(worker_id: int) -> None:
    """Seed Python's `random` in a worker from torch's per-worker seed, which the DataLoader derives
    from its (seeded) generator. Transforms do not depend on it: they are seeded per sample. Stop
    signals are left to the main process (_ignore_stop_signals)."""
    _ignore_stop_signals()
    random.seed(torch.initial_seed() % 2**32)


def _init_val_worker(worker_id: int) -> None:
    _ignore_stop_signals()


def worker_context(start_method: str) -> str | None:
    """The multiprocessing start method of DataLoader workers for data.start_method, None meaning
    the platform's default.

    "auto" is fork on Linux: workers start at once (no re-import of torch, no pickled copy of the
    dataset each), and CocoDetection's flat arrays keep what they share with the main process from
    being copied as they read samples. Elsewhere "auto" leaves the platform's default (spawn on
    macOS, where forking a process that has loaded system frameworks is unsafe, and on Windows).

    Raises:
        ValueError: the method does not exist on this platform (fork on Windows).
    """
    available = multiprocessing.get_all_start_methods()
    if start_method == "auto":
        return "fork" if sys.platform.startswith("linux") and "fork" in available else None
    if start_method not in available:
        raise ValueError(f"data.start_method={start_method} is not available on this platform (available: "
                         f"{', '.join(available)}, or auto)")
    return start_method


def _worker_options(num_workers: int, start_method: str) -> dict[str, Any]:
    """The DataLoader's worker arguments; the start method only with workers (DataLoader refuses it
    without)."""
    if num_workers == 0:
        return {"num_workers": 0}
    return {"num_workers": num_workers, "multiprocessing_context": worker_context(start_method)}


def build_train_loader(
    data_cfg: DataConfig,
    dataset: CocoDetection,
    batch_size_per_process: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
) -> DataLoader:
    """Endless training loader yielding (images, targets) from `collate`.

    Args:
        data_cfg: cfg.data (num_workers, start_method, aspect_ratio_grouping).
        dataset: the training CocoDetection (its transforms get seeded per sample).
        batch_size_per_process: solver.ims_per_batch // world_size.
        seed: the run's seed, the same on every rank.
        start_batch: batches this process already consumed (the iteration to resume at).
    """
    group_ids = np.asarray(dataset.is_landscape, dtype=np.int64) if data_cfg.aspect_ratio_grouping else None
    sampler = InfiniteGroupedBatchSampler(
        len(dataset), batch_size_per_process, seed, group_ids=group_ids,
        rank=rank, world_size=world_size, start_batch=start_batch,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        **_worker_options(data_cfg.num_workers, data_cfg.start_method),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=data_cfg.num_workers > 0,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(derive_seed(seed, rank)),
    )


def build_val_loader(
    dataset: Dataset, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1,
    start_method: str = "auto",
) -> DataLoader:
    """Finite, ordered loader over this rank's share of `dataset` (see ShardedSequentialSampler);
    the ranks' results together cover every image exactly once. Ranks may run a different number
    of batches, so no collective call may happen per batch. start_method: data.start_method."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardedSequentialSampler(len(dataset), rank, world_size),
        collate_fn=collate,
        **_worker_options(num_workers, start_method),
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_init_val_worker,
    )


def build_datasets(cfg: Config) -> tuple[CocoDetection, CocoDetection]:
    """The (train, val) datasets of cfg.data, with their transforms.

    If data.synthetic.root is set, the synthetic dataset is generated there when missing and
    provides each split whose data.<split>.ann_file is empty (see `split_paths`). Only the training
    set follows data.on_bad_image; the validation set always raises on a bad image, as dropping it
    would change the AP. data.check_images decodes every image of both now (see `_check_image_files`).
    """
    train_paths, val_paths = split_paths(cfg, "train"), split_paths(cfg, "val")  # both set before reading any
    train = _open_train_dataset(cfg, train_paths)
    val = open_dataset(val_paths, transforms=build_eval_transforms())
    _check_categories(train, val, train_paths, val_paths, cfg.model.num_classes)
    if cfg.data.check_images:
        _check_image_files(train, val)
    return train, val


def build_train_dataset(cfg: Config) -> CocoDetection:
    """The training CocoDetection of cfg.data as `build_datasets` builds it, without reading the
    validation files (for `retinanet analyze-data`); data.check_images decodes its images now."""
    train = _open_train_dataset(cfg, split_paths(cfg, "train"))
    if cfg.data.check_images:
        _check_image_files(train)
    return train


def split_paths(cfg: Config, split: str) -> DatasetConfig:
    """The files of data.<split> ("train" or "val"): as configured, or, when data.synthetic.root is
    set and data.<split>.ann_file is not, the synthetic dataset's (generated there when missing).

    Raises:
        ValueError: ann_file or img_dir is left unset.
    """
    paths = getattr(cfg.data, split)
    if not paths.ann_file and cfg.data.synthetic.root:
        paths = dict(zip(("train", "val"), ensure_synthetic(cfg.data.synthetic)))[split]
    if not paths.ann_file or not paths.img_dir:
        raise ValueError(
            f"data.{split}.ann_file and data.{split}.img_dir must be set (got {paths.ann_file!r}, "
            f"{paths.img_dir!r}), or data.synthetic.root to use the synthetic dataset"
        )
    return paths


def _open_train_dataset(cfg: Config, paths: DatasetConfig) -> CocoDetection:
    # Training never evaluates: its ground truth (all of train2017's annotations as Python dicts)
    # would only take memory.
    return open_dataset(
        paths, filter_empty=cfg.data.filter_empty, transforms=build_train_transforms(cfg.data.hflip_prob),
        on_bad_image=cfg.data.on_bad_image, keep_ground_truth=False,
    )


def open_dataset(paths: DatasetConfig, **options: Any) -> CocoDetection:
    """The CocoDetection of data.<split>: its json, or its VOC / YOLO files read into a COCO dict
    (paths.format; retinanet.data.formats). options: CocoDetection's keyword arguments."""
    if paths.format == "coco":
        return CocoDetection(paths.ann_file, paths.img_dir, **options)
    dataset, image_dir = read_dataset(paths.format, paths.ann_file, paths.img_dir)
    return CocoDetection(paths.ann_file, image_dir, dataset=dataset, **options)


def _check_image_files(
    train: CocoDetection, val: CocoDetection | None = None, num_threads: int | None = None
) -> None:
    """Decode every image of both splits (or of `train` alone) once. Bad training images are marked
    to be skipped when train.on_bad_image is "skip" (one warning each); any other bad image is an
    error, and all of them, in both splits, are listed in one ValueError so they can be fixed in one go."""
    errors, advice = [], "fix or remove these files"
    train_problems = find_bad_images(train, num_threads)
    if train.on_bad_image == "skip":
        index_of = {image_id: index for index, image_id in enumerate(train.image_ids)}
        for err in train_problems:
            train.mark_bad(index_of[err.image_id], err.reason)
    elif train_problems:
        errors.append(describe_bad_images(train, train_problems))
        advice += ", or set data.on_bad_image=skip to train without the bad training images"
    val_problems = [] if val is None else find_bad_images(val, num_threads)
    if val_problems:
        errors.append(describe_bad_images(val, val_problems))
        advice += " (evaluation never skips an image: it would change the AP)"
    if errors:
        raise ValueError("\n".join(errors + [advice]))


def head_class_names(class_names: Sequence[str], num_classes: int) -> list[str]:
    """Names of the classifier's `num_classes` outputs: the dataset's categories, then "unused_<k>"
    for spare outputs (model.num_classes above the category count, e.g. room for classes added when
    fine-tuning later). Spare outputs only ever see negatives, so their scores stay low."""
    if len(class_names) > num_classes:
        raise ValueError(f"{len(class_names)} categories do not fit model.num_classes = {num_classes}")
    return list(class_names) + [f"unused_{k}" for k in range(len(class_names), num_classes)]


def _check_categories(
    train: CocoDetection, val: CocoDetection, train_paths: DatasetConfig, val_paths: DatasetConfig, num_classes: int
) -> None:
    """Labels must mean the same in both splits and fit the classifier's K outputs."""
    if train.category_ids != val.category_ids:
        raise ValueError(
            f"{train_paths.ann_file} has category ids {train.category_ids} but {val_paths.ann_file} has "
            f"{val.category_ids}; labels would mean different classes"
        )
    if len(train.category_ids) > num_classes:
        raise ValueError(
            f"{train_paths.ann_file} has {len(train.category_ids)} categories but model.num_classes = {num_classes}"
        )
    if len(train.category_ids) < num_classes:
        logger.warning(
            "%s has %d categories but model.num_classes = %d: the %d spare classifier outputs (named unused_%d..) "
            "are trained on negatives only, and their detections are left out of the evaluation",
            train_paths.ann_file, len(train.category_ids), num_classes, num_classes - len(train.category_ids),
            len(train.category_ids),
        )


def build_val_dataset(cfg: Config) -> CocoDetection:
    """The CocoDetection of cfg.data.val (or of the synthetic dataset's val split when
    data.synthetic.root is set and data.val.ann_file is not), without building the training set.
    With data.check_images, every image is decoded now and all bad ones are named in one error."""
    dataset = open_dataset(split_paths(cfg, "val"), transforms=build_eval_transforms())
    if cfg.data.check_images:
        check_image_files(dataset)
    return dataset
