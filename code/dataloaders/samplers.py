"""Batch samplers with the SSL4MIS semantics, made deterministic and resumable.

:class:`TwoStreamBatchSampler` keeps the anchors' batch composition: each batch holds ``primary_batch_size``
labelled indices first, then ``secondary_batch_size`` unlabelled ones, so ``[:labeled_bs]`` is the
labelled part; an epoch is one shuffled pass over the labelled indices (incomplete batches dropped), while
the unlabelled indices cycle through fresh permutations. Unlike the anchors, the permutations come from a
generator seeded by (seed, epoch) instead of the global numpy RNG, so epoch ``e`` is the same whoever asks.

:class:`InfiniteBatches` chains epochs into one endless stream starting at any iteration, and tags every
index with its own augmentation seed, which is what makes ``--resume`` bit-exact (see ``transforms``).
"""
import itertools
import random
import signal

import numpy as np
import torch

from utils.errors import UserError


def _epoch_rng(seed, epoch, stream):
    return np.random.RandomState(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def _grouper(iterable, n):
    """Collect data into fixed-length chunks, dropping an incomplete last chunk."""
    return zip(*[iter(iterable)] * n)


class TwoStreamBatchSampler:
    """Batches of ``primary_batch_size`` labelled then ``secondary_batch_size`` unlabelled indices."""

    def __init__(self, primary_indices, secondary_indices, batch_size, secondary_batch_size, seed=0):
        self.primary_indices = list(primary_indices)
        self.secondary_indices = list(secondary_indices)
        self.secondary_batch_size = int(secondary_batch_size)
        self.primary_batch_size = int(batch_size) - self.secondary_batch_size
        self.seed = int(seed)
        self.epoch = 0
        if self.primary_batch_size < 1:
            raise UserError(f"labelled batch size must be at least 1 (batch_size {batch_size}, "
                            f"unlabelled part {secondary_batch_size})")
        if self.secondary_batch_size < 1:
            raise UserError(f"labeled_bs ({self.primary_batch_size}) must be smaller than batch_size "
                            f"({batch_size}): no room is left for unlabelled data")
        if len(self.primary_indices) < self.primary_batch_size:
            raise UserError(f"{len(self.primary_indices)} labelled cases cannot fill a labelled batch of "
                            f"{self.primary_batch_size}")
        if len(self.secondary_indices) < self.secondary_batch_size:
            raise UserError(f"{len(self.secondary_indices)} unlabelled cases cannot fill an unlabelled batch "
                            f"of {self.secondary_batch_size}")

    def set_epoch(self, epoch):
        """Select which epoch's permutations the next ``iter()`` yields."""
        self.epoch = int(epoch)

    def __iter__(self):
        primary_rng = _epoch_rng(self.seed, self.epoch, 0)
        secondary_rng = _epoch_rng(self.seed, self.epoch, 1)
        primary = [self.primary_indices[i] for i in primary_rng.permutation(len(self.primary_indices))]
        secondary = itertools.chain.from_iterable(
            [self.secondary_indices[i] for i in secondary_rng.permutation(len(self.secondary_indices))]
            for _ in itertools.count())
        return (list(p) + list(s) for p, s in zip(_grouper(primary, self.primary_batch_size),
                                                  _grouper(secondary, self.secondary_batch_size)))

    def __len__(self):
        return len(self.primary_indices) // self.primary_batch_size


class RandomBatchSampler:
    """Shuffled batches of ``batch_size`` indices per epoch (incomplete batch dropped), seeded by epoch.

    The supervised baseline's sampler: the same epoch semantics as :class:`TwoStreamBatchSampler` with
    no unlabelled stream.
    """

    def __init__(self, indices, batch_size, seed=0):
        self.indices = list(indices)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = 0
        if self.batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        if len(self.indices) < self.batch_size:
            raise UserError(f"{len(self.indices)} cases cannot fill a batch of {self.batch_size}")

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __iter__(self):
        order = _epoch_rng(self.seed, self.epoch, 0).permutation(len(self.indices))
        return (list(batch) for batch in _grouper([self.indices[i] for i in order], self.batch_size))

    def __len__(self):
        return len(self.indices) // self.batch_size


def sample_seed(seed, iteration, slot):
    """Augmentation seed of the ``slot``-th sample of batch ``iteration`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, iteration, slot]).generate_state(1)[0])


class InfiniteBatches:
    """An endless stream of batches from an epoch-based batch sampler, starting at ``start_iteration``.

    Yields lists of ``(index, augmentation_seed)`` keys for a dataset that accepts them. Resuming at
    iteration ``k`` yields exactly what an uninterrupted stream yields from its ``k``-th batch on: the
    epochs are recomputed from their seeds and the first ``k mod len(epoch)`` batches are skipped
    (indices only, no data is loaded).
    """

    def __init__(self, batch_sampler, seed, start_iteration=0):
        self.batch_sampler = batch_sampler
        self.seed = int(seed)
        self.start_iteration = int(start_iteration)

    def __iter__(self):
        per_epoch = len(self.batch_sampler)
        epoch, skip = divmod(self.start_iteration, per_epoch)
        iteration = self.start_iteration
        while True:
            self.batch_sampler.set_epoch(epoch)
            for batch in itertools.islice(iter(self.batch_sampler), skip, None):
                yield [(index, sample_seed(self.seed, iteration, slot)) for slot, index in enumerate(batch)]
                iteration += 1
            epoch, skip = epoch + 1, 0


def seed_worker(worker_id):
    """DataLoader ``worker_init_fn``: seed ``random`` and numpy from the worker's torch seed, and leave
    SIGINT and SIGTERM to the main process.

    The anchors seed only ``random``, so numpy-based augmentation draws the same numbers in every worker;
    here each worker gets its own distinct numpy and ``random`` streams, derived from the loader's seed.
    A worker ignores the stop signals (Ctrl-C reaches every process of the terminal's group): the main
    process saves a checkpoint and shuts the workers down itself, and a worker whose parent was killed
    exits on its own (PyTorch's watchdog).
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    worker_seed = torch.initial_seed() % 2 ** 32
    np.random.seed(worker_seed)
    random.seed(worker_seed)
