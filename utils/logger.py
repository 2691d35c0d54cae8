"""One logger per run: console and ``log.txt``.

A run folder is created only once its config and data have been checked, so the log file can
be attached after the first messages: they are held in memory until then and written first.
"""
import logging
import sys

_FMT = logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S")


class _Held(logging.Handler):
    """Keeps records until a log file exists to receive them."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def setup_logger(log_file=None, name="dualmem", rank=0, hold=False):
    """``hold=True``: no file yet; ``attach_log_file`` writes the held messages later."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(_FMT)
    logger.addHandler(console)
    if log_file is not None and rank == 0:
        attach_log_file(logger, log_file)
    elif hold and rank == 0:
        logger.addHandler(_Held())
    logger.propagate = False
    return logger


def attach_log_file(logger, log_file):
    fh = logging.FileHandler(log_file, encoding="utf-8")
    fh.setFormatter(_FMT)
    for handler in [h for h in logger.handlers if isinstance(h, _Held)]:
        for record in handler.records:
            fh.emit(record)
        logger.removeHandler(handler)
    logger.addHandler(fh)
    return logger
