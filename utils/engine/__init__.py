"""The engine: training loop, feature cache, checkpoints and resume, evaluation and reporting,
stage one. See README.md in this folder."""
from dualmem.utils.engine.builders import amp_dtype_for, build_optimizer, build_scheduler  # noqa: F401
from dualmem.utils.engine.trainer import Trainer, TrainingInterrupted  # noqa: F401
from dualmem.utils.errors import NonFiniteLossError  # noqa: F401
