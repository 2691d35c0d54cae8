"""Measurement pieces shared by the benchmark tools: peak memory, device sync, timing."""
import os
import threading
import time


def rss_bytes():
    """Resident set size of this process now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak so far is the best there is
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """Highest resident set size seen while the block runs (a sampling thread); ``start`` and
    ``peak`` in bytes, ``start_mb`` / ``peak_mb`` in MiB."""

    def __init__(self, interval=0.005):
        self.interval = interval

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def start_mb(self):
        return self.start / 2 ** 20

    @property
    def peak_mb(self):
        return self.peak / 2 ** 20


def sync(device):
    """Wait for queued GPU work, so a timer measures it."""
    if getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.synchronize()


def timed(fn, steps, device):
    """(wall seconds, process CPU seconds) of ``steps`` calls; CPU time is the steadier figure
    on a shared CPU."""
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    sync(device)
    return time.perf_counter() - t, time.process_time() - c
