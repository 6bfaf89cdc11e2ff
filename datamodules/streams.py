"""Resumable training streams, shared by every DataModule: a stream's order and every sample's augmentations
follow from the run seed and the position alone, and the position travels with checkpoints, so a run resumed
mid-epoch sees the batches of an uninterrupted one, whatever ``num_workers`` is.

A DataModule declares its streams (``Stream``: name, items, keys read, batch size); ``stream_loaders`` makes one
``StreamLoader`` each, and several streams are combined by Lightning's ``CombinedLoader`` in ``max_size_cycle``
mode (the shorter stream cycles, as SSL4MIS's TwoStreamBatchSampler cycles labeled permutations against an endless
unlabeled stream): the batch is then ``{name: batch}`` in declaration order, one name: the batch itself.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, DistributedSampler


@dataclass
class Stream:
    """One training stream a DataModule declares.

    name: its key in the batch dict; items: the ids it draws from; keys: what is read for an item (``("image",)``
    for unlabeled data: labels that are not read cannot reach the model); batch_size; drop_last: whether a pass's
    last partial batch is dropped (two-stream batches need full halves).
    """

    name: str
    items: list[str]
    keys: tuple[str, ...]
    batch_size: int
    drop_last: bool = True


class SampleDataset(Dataset):
    """Items read by ``load(item) -> dict`` and turned into tensors by ``make(sample) -> dict``.

    A key is an index, or ``(index, seed)`` from a ``StreamSampler``: then ``make`` (the augmentations) draws
    from that seed alone (see ``seeded``).
    """

    def __init__(self, items: list[str], load: Callable[[str], dict], make: Callable[[dict], dict]):
        self.items, self.load, self.make = items, load, make

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        if isinstance(key, tuple):
            index, seed = key
            with seeded(seed):
                return self.make(self.load(self.items[index]))
        return self.make(self.load(self.items[key]))


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch (CPU), numpy and ``random`` seeded by ``seed``, then put their states back.

    A sample's augmentations then depend on its seed only: not on the worker that makes it, on what training drew
    before, nor on a restart; and making it leaves the caller's random stream untouched. CUDA generators are left
    alone (augmentations run on CPU; ``torch.manual_seed`` would reseed them too).
    """
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


class StreamSampler(DistributedSampler):
    """``(index, augmentation seed)`` pairs of one training stream, one shuffled pass after another.

    Pass ``cycle`` of epoch ``epoch`` (Lightning calls ``set_epoch``; the shorter of two streams runs several
    passes per epoch) is drawn from (seed, stream, epoch, cycle) alone, so a resumed run redraws the interrupted
    pass and starts at ``start``. Under DDP each rank takes every ``num_replicas``-th item of the pass, padded
    to equal length as DistributedSampler does; being a DistributedSampler, Lightning keeps it rather than
    injecting its own.
    """

    def __init__(self, dataset: Dataset, seed: int, stream: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.stream = stream
        self.cycle, self.start = 0, 0  # set by StreamLoader before each pass

    def __iter__(self) -> Iterator[tuple[int, int]]:
        entropy = np.random.SeedSequence([self.seed, self.stream, self.epoch, self.cycle])
        generator = torch.Generator().manual_seed(int(entropy.generate_state(1, np.uint64)[0]))
        n = len(self.dataset)
        order = torch.randperm(n, generator=generator).tolist()
        seeds = torch.randint(0, 2**31, (n,), generator=generator).tolist()
        order = (order * -(-self.total_size // n))[:self.total_size]
        mine = order[self.rank:self.total_size:self.num_replicas]
        return iter([(i, seeds[i]) for i in mine[self.start:]])


class StreamLoader(DataLoader):
    """The DataLoader of one training stream; its position travels with checkpoints.

    Lightning's fit loop stores ``state_dict()`` of training loaders that have one and gives it back through
    ``load_state_dict`` when a run resumes. The state is the pass under way (seed, epoch, cycle) and the batches
    it has yielded to training, counted here rather than in the sampler, which runs ahead when workers prefetch.
    A pass is chosen at the first ``next()`` after ``iter()``, so after Lightning's ``set_epoch``: a resumed run
    continues the saved pass if its epoch is still under way, and starts the next epoch's first pass otherwise.
    """

    sampler: StreamSampler

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch, self.cycle, self.batches = 0, -1, 0
        self._resuming = False

    def __iter__(self) -> Iterator:
        self._begin_pass()
        for batch in super().__iter__():
            self.batches += 1
            yield batch

    def _begin_pass(self) -> None:
        epoch = self.sampler.epoch
        if not (self._resuming and epoch == self.epoch):
            self.cycle, self.batches = (self.cycle + 1 if epoch == self.epoch else 0), 0
        self.epoch, self._resuming = epoch, False
        self.sampler.cycle, self.sampler.start = self.cycle, self.batches * self.batch_size

    def state_dict(self) -> dict:
        return {"seed": self.sampler.seed, "epoch": self.epoch, "cycle": self.cycle, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.seed = state["seed"]
        self.epoch, self.cycle, self.batches = state["epoch"], state["cycle"], state["batches"]
        self._resuming = True


def collate_case(batch: list[dict]) -> dict:
    """One whole case per batch: tensors get a batch axis, everything else becomes a one-item list."""
    (case,) = batch
    return {k: v[None] if isinstance(v, torch.Tensor) else [v] for k, v in case.items()}


def stream_loaders(streams: list[Stream], datasets: dict[str, Dataset], seed: int, world: int = 1, rank: int = 0,
                   **loader_options):
    """The training loader of declared streams: one ``StreamLoader`` per stream (the stream's index in the list
    is part of its sampler's seed), combined in ``max_size_cycle`` mode when there are several."""
    loaders = {}
    for index, stream in enumerate(streams):
        dataset = datasets[stream.name]
        sampler = StreamSampler(dataset, seed, index, num_replicas=world, rank=rank)
        loaders[stream.name] = StreamLoader(dataset, batch_size=stream.batch_size, sampler=sampler,
                                            drop_last=stream.drop_last, **loader_options)
    if len(loaders) == 1:
        return next(iter(loaders.values()))
    return CombinedLoader(loaders, mode="max_size_cycle")
