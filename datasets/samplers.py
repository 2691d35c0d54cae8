"""Samplers whose order is a function of (seed, epoch) and, under DDP, of the rank.

Training can then resume mid-epoch: the interrupted epoch's order is rebuilt and the finished
batches skipped. Evaluation shards the test set without padding, so no image counts twice.
"""
import math

import torch
from torch.utils.data import Sampler


class ResumableRandomSampler(Sampler):
    def __init__(self, num_samples, seed, num_replicas=1, rank=0):
        self.num_samples = num_samples
        self.seed = seed
        self.num_replicas, self.rank = num_replicas, rank
        self.per_replica = math.ceil(num_samples / num_replicas)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch, start=0):
        """``start``: samples of this epoch (on this rank) consumed before an interruption."""
        self.epoch, self.start = epoch, start

    def order(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        if self.num_replicas > 1:  # pad as DistributedSampler does, so ranks step together
            order += order[:self.per_replica * self.num_replicas - len(order)]
            order = order[self.rank::self.num_replicas]
        return order

    def __iter__(self):
        return iter(self.order()[self.start:])

    def __len__(self):
        return len(self.order()) - self.start


class ShardSampler(Sampler):
    """Every ``num_replicas``-th index from ``rank``: each test image on exactly one rank."""

    def __init__(self, num_samples, num_replicas=1, rank=0):
        self.indices = list(range(rank, num_samples, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
