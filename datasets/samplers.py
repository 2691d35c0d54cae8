"""A shuffling sampler whose order is a function of (seed, epoch), so training can resume
mid-epoch: the interrupted epoch's order is rebuilt and the finished batches skipped."""
import torch
from torch.utils.data import Sampler


class ResumableRandomSampler(Sampler):
    def __init__(self, num_samples, seed):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch, start=0):
        """``start``: samples of this epoch already consumed before an interruption."""
        self.epoch, self.start = epoch, start

    def order(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self):
        return iter(self.order()[self.start:])

    def __len__(self):
        return self.num_samples - self.start
