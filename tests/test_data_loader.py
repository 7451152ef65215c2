"""Samplers and loaders: sharding, grouping, determinism, exact resume, dataset wiring."""

import dataclasses
import itertools
import multiprocessing
import sys

import pytest
import torch

from retinanet.config import ConfigError, load_config
from retinanet.data.coco import TrainSample
from retinanet.data.loader import (
    InfiniteGroupedBatchSampler,
    ShardedSequentialSampler,
    build_datasets,
    build_train_loader,
    build_val_loader,
    collate,
    worker_context,
)


def take(sampler, num_batches):
    return list(itertools.islice(iter(sampler), num_batches))


def landscape_groups(num_samples):
    """An uneven mix of two aspect groups (1 in 3 portrait)."""
    return [0 if i % 3 == 0 else 1 for i in range(num_samples)]


def test_collate_keeps_lists():
    batch = [(torch.zeros(3, 4, 5), {"image_id": 1}), (torch.zeros(3, 6, 2), {"image_id": 2})]
    images, targets = collate(batch)
    assert [im.shape for im in images] == [(3, 4, 5), (3, 6, 2)]
    assert targets == [{"image_id": 1}, {"image_id": 2}]


def test_two_ranks_split_each_epoch_without_grouping():
    # 24 samples, 2 ranks x 3 per batch: epoch 0 is exactly the first 4 batches of each rank.
    ranks = [take(InfiniteGroupedBatchSampler(24, 3, seed=1, rank=r, world_size=2), 8) for r in range(2)]
    epoch0 = [s for rank in ranks for batch in rank[:4] for s in batch]
    assert sorted(s.index for s in epoch0) == list(range(24))
    assert all(s.epoch == 0 for s in epoch0)
    epoch1 = [s for rank in ranks for batch in rank[4:] for s in batch]
    assert sorted(s.index for s in epoch1) == list(range(24)) and all(s.epoch == 1 for s in epoch1)
    assert [s.index for s in epoch0] != [s.index for s in epoch1]  # reshuffled
    assert all(len(batch) == 3 for rank in ranks for batch in rank)


def test_two_ranks_disjoint_with_grouping_and_every_batch_single_group():
    num_samples, groups = 40, landscape_groups(40)
    ranks = [
        take(InfiniteGroupedBatchSampler(num_samples, 3, seed=7, group_ids=groups, rank=r, world_size=2), 30)
        for r in range(2)
    ]
    for batch in ranks[0] + ranks[1]:
        assert len(batch) == 3
        assert len({groups[s.index] for s in batch}) == 1
    for batch0, batch1 in zip(*ranks):  # step b of both ranks comes from one global batch: same group
        assert groups[batch0[0].index] == groups[batch1[0].index]
    # 30 batches x 6 samples = 4.5 epochs: every sample of epochs 0..2 has been emitted exactly once.
    samples = [s for rank in ranks for batch in rank for s in batch]
    for epoch in range(3):
        assert sorted(s.index for s in samples if s.epoch == epoch) == list(range(num_samples))
    # The first batches hold only epoch 0 and are disjoint across ranks.
    first = [s.index for rank in ranks for batch in rank[:4] for s in batch]
    assert len(set(first)) == len(first) == 24


def test_grouping_with_a_group_smaller_than_a_batch():
    groups = [0, 0] + [1] * 14  # 2 portrait images, global batch 4: they wait across epochs
    sampler = InfiniteGroupedBatchSampler(16, 2, seed=0, group_ids=groups, world_size=2)
    batches = take(sampler, 40)
    assert all(len({groups[s.index] for s in batch}) == 1 for batch in batches)
    assert sum(groups[batch[0].index] == 0 for batch in batches) >= 3
    # Global batches (index, epoch, seed) rows: each portrait one joins two epochs' leftovers.
    global_batches = list(itertools.islice(sampler.global_batches(), 40))
    portrait = [batch for batch in global_batches if groups[batch[0, 0]] == 0]
    assert portrait and all(sorted(batch[:, 0].tolist()) == [0, 0, 1, 1] for batch in portrait)
    assert all(len(set(batch[:, 1].tolist())) == 2 for batch in portrait)


def test_deterministic_and_seed_dependent():
    def make(seed):
        return take(InfiniteGroupedBatchSampler(30, 4, seed=seed, group_ids=landscape_groups(30)), 20)

    assert make(3) == make(3)
    assert make(3) != make(4)
    seeds = [s.seed for batch in make(3) for s in batch]
    assert len(set(seeds)) == len(seeds)  # every draw has its own transform seed


@pytest.mark.parametrize("world_size,rank", [(1, 0), (2, 1)])
@pytest.mark.parametrize("start_batch", [1, 5, 11, 23])
def test_resume_yields_the_tail_of_the_uninterrupted_stream(world_size, rank, start_batch):
    kwargs = dict(num_samples=26, batch_size=2, seed=11, group_ids=landscape_groups(26), rank=rank,
                  world_size=world_size)
    full = take(InfiniteGroupedBatchSampler(**kwargs), start_batch + 10)
    resumed = take(InfiniteGroupedBatchSampler(**kwargs, start_batch=start_batch), 10)
    assert resumed == full[start_batch:]


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match="empty"):
        InfiniteGroupedBatchSampler(0, 2, seed=0)
    with pytest.raises(ValueError, match="rank"):
        InfiniteGroupedBatchSampler(4, 2, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="3 group ids for 4 samples"):
        InfiniteGroupedBatchSampler(4, 2, seed=0, group_ids=[0, 1, 0])


def test_sharded_sequential_sampler_counts_each_index_once():
    shards = [list(ShardedSequentialSampler(7, rank, 3)) for rank in range(3)]
    assert shards == [[0, 1], [2, 3], [4, 5, 6]]
    assert [len(ShardedSequentialSampler(7, rank, 3)) for rank in range(3)] == [2, 2, 3]
    assert list(ShardedSequentialSampler(2, 2, 3)) == [1]


@pytest.fixture(scope="module")
def synthetic_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader") / "syn"
    return load_config(overrides=[
        f"data.synthetic.root={root}", "data.synthetic.num_train=20", "data.synthetic.num_val=7",
        "data.synthetic.image_size=32", "model.num_classes=3", "data.num_workers=0",
    ])


def test_build_datasets_from_synthetic(synthetic_cfg):
    train, val = build_datasets(synthetic_cfg)
    assert len(train) == 20 and len(val) == 7
    assert train.category_ids == val.category_ids == [1, 3, 5]
    image, _ = val[0]
    assert torch.equal(image, val.load_image(0))  # eval: no transform


def test_build_datasets_explicit_files_win_and_errors(synthetic_cfg, tmp_path):
    root = synthetic_cfg.data.synthetic.root
    cfg = load_config(overrides=[
        f"data.synthetic.root={root}", "data.synthetic.num_train=20", "data.synthetic.num_val=7",
        "data.synthetic.image_size=32", "model.num_classes=3",
        f"data.train.ann_file={root}/annotations/instances_val.json", f"data.train.img_dir={root}/val",
    ])
    train, val = build_datasets(cfg)
    assert len(train) == 7 and len(val) == 7
    with pytest.raises(ValueError, match=r"data\.train\.ann_file and data\.train\.img_dir must be set"):
        build_datasets(load_config())
    too_few = load_config(overrides=[f"data.synthetic.root={root}", "data.synthetic.num_train=20",
                                     "data.synthetic.num_val=7", "data.synthetic.image_size=32",
                                     "model.num_classes=2"])
    with pytest.raises(ValueError, match=r"3 categories but model\.num_classes = 2"):
        build_datasets(too_few)


def flatten(loader, num_batches):
    """[(image_id, image, boxes)] of the first num_batches batches."""
    out = []
    for images, targets in itertools.islice(iter(loader), num_batches):
        out.extend((t["image_id"], im, t["boxes"]) for im, t in zip(images, targets))
    return out


def assert_same(a, b):
    assert [x[0] for x in a] == [x[0] for x in b]
    for (_, image_a, boxes_a), (_, image_b, boxes_b) in zip(a, b):
        assert torch.equal(image_a, image_b) and torch.equal(boxes_a, boxes_b)


def test_train_loader_resume_reproduces_images_and_flips(synthetic_cfg):
    train, _ = build_datasets(synthetic_cfg)
    full = flatten(build_train_loader(synthetic_cfg.data, train, 4, seed=5), 9)
    resumed = flatten(build_train_loader(synthetic_cfg.data, train, 4, seed=5, start_batch=6), 3)
    assert_same(resumed, full[6 * 4 :])
    # Batches are single-orientation (aspect grouping is on by default).
    for start in range(0, len(full), 4):
        orientations = {im.shape[2] >= im.shape[1] for _, im, _ in full[start : start + 4]}
        assert len(orientations) == 1
    # Every image is the file or its mirror image, and both happen.
    flipped = []
    for image_id, image, _ in full:
        original = train.load_image(train.image_ids.tolist().index(image_id))
        assert torch.equal(image, original) or torch.equal(image, original.flip(-1))
        flipped.append(not torch.equal(image, original))
    assert 0 < sum(flipped) < len(flipped)


def test_train_loader_is_independent_of_worker_count(synthetic_cfg):
    train, _ = build_datasets(synthetic_cfg)
    without = flatten(build_train_loader(synthetic_cfg.data, train, 3, seed=2, rank=1, world_size=2), 4)
    synthetic_cfg.data.num_workers = 2
    try:
        loader = build_train_loader(synthetic_cfg.data, train, 3, seed=2, rank=1, world_size=2)
        assert loader.num_workers == 2 and loader.persistent_workers
        with_workers = flatten(loader, 4)
    finally:
        synthetic_cfg.data.num_workers = 0
    assert_same(with_workers, without)


def test_spawned_workers_give_the_batches_of_the_main_process(synthetic_cfg):
    """spawn pickles the dataset into every worker (forkserver, Python 3.14's default on Linux, too);
    samples depend on the sampler's keys alone, so the batches equal those without workers."""
    train, val = build_datasets(synthetic_cfg)
    without = flatten(build_train_loader(synthetic_cfg.data, train, 3, seed=4), 3)
    spawn = dataclasses.replace(synthetic_cfg.data, num_workers=2, start_method="spawn")
    loader = build_train_loader(spawn, train, 3, seed=4)
    assert loader.multiprocessing_context.get_start_method() == "spawn"
    assert_same(flatten(loader, 3), without)
    del loader  # persistent workers: stop them now
    assert build_val_loader(val, 2, num_workers=2, start_method="spawn").multiprocessing_context.get_start_method() \
        == "spawn"
    assert build_val_loader(val, 2, num_workers=0, start_method="spawn").multiprocessing_context is None


def test_start_method_auto_is_fork_on_linux_else_the_platform_default(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    assert worker_context("auto") == "fork" and worker_context("spawn") == "spawn"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert worker_context("auto") is None  # spawn: forking after macOS frameworks load is unsafe
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])  # Windows
    assert worker_context("auto") is None
    with pytest.raises(ValueError, match=r"data\.start_method=fork is not available on this platform \(available: spawn"):
        worker_context("fork")
    with pytest.raises(ConfigError, match=r"data\.start_method: 'thread' is not one of \['auto', 'fork', 'spawn', 'forkserver'\]"):
        load_config(overrides=["data.start_method=thread"])
    assert load_config().data.start_method == "auto"


def test_val_loader_covers_every_image_once_across_ranks(synthetic_cfg):
    _, val = build_datasets(synthetic_cfg)
    seen = []
    for rank in range(3):
        for images, targets in build_val_loader(val, batch_size=2, num_workers=0, rank=rank, world_size=3):
            assert all(im.dtype == torch.uint8 and im.shape[0] == 3 for im in images)
            seen.extend(t["image_id"] for t in targets)
    assert seen == val.image_ids.tolist()


def test_train_sample_is_a_plain_tuple():
    sample = TrainSample(3, 0, 99)
    assert sample == (3, 0, 99) and sample.index == 3
