"""The exceptions that mean "the user's input is wrong": tools print them as one line."""
from utils.checkpoint import CheckpointError
from utils.workdir_lock import WorkDirBusyError


def _user_errors():
    errors = [ValueError, FileNotFoundError, CheckpointError, WorkDirBusyError]
    try:
        from models.backbones.pretrained import PretrainedWeightsUnavailable
        errors.append(PretrainedWeightsUnavailable)
    except ImportError:  # pragma: no cover - backbones always ship
        pass
    from utils.trainer import NonFiniteLossError
    errors.append(NonFiniteLossError)
    return tuple(errors)


USER_ERRORS = _user_errors()
