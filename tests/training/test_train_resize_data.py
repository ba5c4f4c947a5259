"""The data position of a checkpoint resumed on another number of ranks (data_pipeline.shards.reader.regroup_position):
with data.split=global_batch no sample of the interrupted epoch is seen twice and none is left out bar the tail of a
worker stream that fills no batch; with split=node the run goes on at the next epoch; bad input is one line."""

from __future__ import annotations

import copy
from collections import Counter

import pytest

from data_pipeline.shards import BatchStream, resolve_shards
from data_pipeline.shards.reader import DataPosition, regroup_position
from infra.core.errors import UserError

MICRO = 2


def _stream(shards, rank, world, workers, split="global_batch", position=None):
    return BatchStream(
        resolve_shards(str(shards)),
        size=64,
        want_lr=False,
        batch_size=MICRO,
        workers=workers,
        seed=3,
        rank=rank,
        world=world,
        split=split,
        shuffle_buffer=8,
        position=position,
    )


def _rest_of_epoch(streams):
    """Every rank's keys until its stream moves to the next epoch (ranks read in lockstep, one batch each)."""
    its = [iter(s) for s in streams]
    epoch = streams[0].pos.epoch
    keys: list[str] = []
    while True:
        batch = [next(it) for it in its]
        if streams[0].pos.epoch != epoch:  # the batch just read is the next epoch's first
            return keys
        for b in batch:
            keys.extend(b["key"])


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (1, 2)])
@pytest.mark.parametrize("workers", [0, 2])
def test_global_batch_resize_sees_each_sample_once(shards, old_world, new_world, workers):
    total = resolve_shards(str(shards)).num_samples
    old = [_stream(shards, r, old_world, workers) for r in range(old_world)]
    its = [iter(s) for s in old]
    before: list[str] = []
    for _ in range(2):  # two steps on the old ranks
        for it in its:
            before.extend(next(it)["key"])
    positions = [copy.deepcopy(s.pos) for s in old]
    assert len({tuple(p.worker_samples) for p in positions}) == 1  # every rank counts the whole global batch
    new_pos = [regroup_position(positions, new_world, r, "global_batch", workers)[0] for r in range(new_world)]
    assert all(p.epoch == 0 and p.epoch_skip == positions[0].worker_samples for p in new_pos)
    after = _rest_of_epoch([_stream(shards, r, new_world, workers, position=p) for r, p in enumerate(new_pos)])
    seen = Counter(before + after)
    assert max(seen.values()) == 1, f"seen twice: {[k for k, n in seen.items() if n > 1]}"
    # what is left out: only the tail of each worker stream that fills no global batch of the new size
    assert total - len(seen) < max(1, workers) * MICRO * new_world, (total, len(seen))
    assert len(before) == 2 * MICRO * old_world


def test_same_size_resume_inside_a_regrouped_epoch_is_exact(shards):
    """After a resize, a checkpoint of the new size resumes to exactly the batches an uninterrupted run reads."""
    old = [_stream(shards, r, 2, 2) for r in range(2)]
    its = [iter(s) for s in old]
    for it in its:
        next(it)
    pos, _ = regroup_position([copy.deepcopy(s.pos) for s in old], 1, 0, "global_batch", 2)
    s = _stream(shards, 0, 1, 2, position=pos)
    it = iter(s)
    next(it)
    saved = copy.deepcopy(s.pos)
    want = [next(it)["key"] for _ in range(3)]
    s2 = _stream(shards, 0, 1, 2, position=saved)
    it2 = iter(s2)
    assert [next(it2)["key"] for _ in range(3)] == want
    assert s2.pos == s.pos


def test_node_split_resize_goes_on_at_next_epoch(shards):
    old = [_stream(shards, r, 2, 0, split="node") for r in range(2)]
    for s in old:
        next(iter(s))
    pos, note = regroup_position([s.pos for s in old], 1, 0, "node", 0)
    assert pos.epoch == 1 and pos.batches_in_epoch == 0 and not pos.epoch_skip
    assert "epoch 1" in note and "global_batch" in note
    s = _stream(shards, 0, 1, 0, split="node", position=pos)
    keys = _rest_of_epoch([s])
    assert s.pos.epoch == 2 and len(keys) == len(set(keys)) > 0  # a whole epoch 1, each sample once


def test_regroup_refusals_are_one_line():
    old = DataPosition(epoch=0, batches_in_epoch=3, samples_consumed=6)  # a checkpoint from before per-worker counts
    with pytest.raises(UserError, match="predates per-worker data positions") as e:
        regroup_position([old, old], 1, 0, "global_batch", 0)
    assert "\n" not in str(e.value)
    pos = DataPosition(epoch=0, batches_in_epoch=3, worker_samples=[4, 2])
    with pytest.raises(UserError, match=r"set data.workers=2") as e:
        regroup_position([pos, pos], 1, 0, "global_batch", 0)
    assert "\n" not in str(e.value)
