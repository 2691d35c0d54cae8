"""One run per work folder: an OS lock that dies with its process, so no stale-lock cleanup."""
import contextlib
import fcntl
import os
import socket
from dualmem.utils.errors import UserError


class WorkDirBusyError(UserError):
    pass


class WorkDirLock:
    def __init__(self, work_dir):
        self.path = os.path.join(str(work_dir), ".lock")
        self._fd = None

    def acquire(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise WorkDirBusyError(
                f"work_dir {os.path.dirname(self.path)} is in use by {holder}; wait for it, "
                f"or pass another --work_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd
        return self

    def release(self):
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def record_lock(work_dir):
    """Held while ``run.json`` is read, changed and written. Separate from the run's own lock,
    which a training holds throughout while an evaluation of the same run may record its
    override; this one is held for a moment only, so waiting for it is fine."""
    os.makedirs(str(work_dir), exist_ok=True)
    fd = os.open(os.path.join(str(work_dir), ".record.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
