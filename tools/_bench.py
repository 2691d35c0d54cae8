"""Measurement pieces shared by the benchmark tools: peak memory, device sync, timing, and the
results file, so every tool measures and records the same way."""
import json
import os
import threading
import time
from pathlib import Path


def rss_bytes():
    """Resident set size of this process now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak so far is the best there is
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def max_rss_mb():
    """Peak resident set size of this process so far, in MiB (``ru_maxrss``: KiB on Linux);
    it cannot be reset, see :func:`reset_peak_rss`."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mb(field):
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``, ...) in MiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss():
    """Linux: restart VmHWM from the current RSS (ru_maxrss cannot be reset, and it even keeps
    the parent's peak across fork + exec)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


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


def call_timed(fn):
    """(``fn()``, wall seconds of that one call)."""
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def write_json(path, result):
    """The results file, written atomically (an interrupted run never leaves half of one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"written {path}")
