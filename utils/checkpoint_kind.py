"""What a checkpoint file is, in one line: DualMem's (and of which method), or something else.

A ``.pth`` can be many things: a DualMem training checkpoint, a bare state dict of weights
(torchvision, timm), another framework's checkpoint (PyTorch Lightning's ``state_dict``, which
anomalib writes). A message that says "has no 'model' entry", or a traceback about missing
``reconstruction.pos_embed`` weights when a DMAD checkpoint meets a UniAD config, leaves the
user guessing; these functions name what the file is and what was expected instead.
``utils.detector.load_model`` uses them; run planning (``--evaluate`` / ``--resume`` with a
config of another method) calls :func:`check_checkpoint_method` before it compares configs.
"""
from pathlib import Path

import torch

from dualmem.utils.errors import UserError

EXPECTED = "a checkpoint written by DualMem's training (RUN/checkpoints/last.pth)"
# keys other frameworks put in their checkpoints, and what the file then is
FOREIGN_KEYS = (("pytorch-lightning_version", "a PyTorch Lightning checkpoint (as anomalib "
                                              "writes)"),
                ("state_dict", "another framework's checkpoint (weights under 'state_dict')"),
                ("model_state_dict", "another framework's checkpoint (weights under "
                                     "'model_state_dict')"))


class CheckpointKindError(UserError):
    """The checkpoint is not the kind the command needs (another method, not DualMem's)."""


def head_of(net):
    """(method name, module type) of a ``net:`` list: its last module, the method's head, e.g.
    ('DMAD', 'models.heads.DMAD'); None for an empty or malformed list."""
    if not isinstance(net, (list, tuple)) or not net or not isinstance(net[-1], dict):
        return None
    kind = str(net[-1].get("type") or "")
    return (kind.rsplit(".", 1)[-1], kind) if kind else None


def describe(state):
    """What a loaded checkpoint object is: 'a DMAD checkpoint (models.heads.DMAD)', 'a bare
    state dict of 62 tensors (conv1.weight, ...)', 'a PyTorch Lightning checkpoint ...'."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}"
    cfg = state.get("config")
    head = head_of(cfg.get("net")) if isinstance(cfg, dict) else None
    if head and "model" in state:
        return f"a {head[0]} checkpoint ({head[1]})"
    for key, what in FOREIGN_KEYS:
        if key in state:
            return what
    if state and all(torch.is_tensor(v) for v in state.values()):
        names = ", ".join(str(k) for k in list(state)[:2])
        return (f"a bare state dict of {len(state)} tensors ({names}, ...), a network's "
                f"weights without a config")
    return f"a dictionary with keys {', '.join(map(str, list(state)[:8])) or '(none)'}"


def _load(path, trusted=False):
    """The file's object, or None when it cannot be opened safely (``weights_only`` unless
    ``trusted``): corrupt, or needs code to open (``load_checkpoint`` says which)."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=not trusted)
    except Exception:
        return None


def is_dualmem(state):
    """A DualMem checkpoint: weights under 'model' and the config that builds them."""
    cfg = state.get("config") if isinstance(state, dict) else None
    return isinstance(cfg, dict) and bool(head_of(cfg.get("net"))) and "model" in state


def inspect_file(path, trusted=False):
    """:func:`describe` of a file that is not a DualMem checkpoint; None when it is one or
    cannot be opened safely (then ``load_checkpoint``'s own error stands)."""
    state = _load(path, trusted)
    return None if state is None or is_dualmem(state) else describe(state)


def not_dualmem(path, what):
    """The one-line error for a file that is not a DualMem checkpoint."""
    return CheckpointKindError(f"{path} is not a DualMem checkpoint: it is {what}; expected "
                               f"{EXPECTED}")


def method_mismatch(checkpoint, checkpoint_net, run_net):
    """The message when a checkpoint's method (its net's head) differs from the one a run's
    config builds, else None: 'RUN/checkpoints/last.pth is a DMAD checkpoint
    (models.heads.DMAD); this run's config builds UniAD (models.reconstructions.UniAD)'."""
    have, want = head_of(checkpoint_net), head_of(run_net)
    if not have or not want or have[1] == want[1]:
        return None
    return (f"{checkpoint} is a {have[0]} checkpoint ({have[1]}); this run's config builds "
            f"{want[0]} ({want[1]}): use a config of {have[0]} (or the run's own, without "
            f"--config), or a {want[0]} checkpoint")


def check_checkpoint_method(checkpoint, run_cfg, trusted=False):
    """Raise :class:`CheckpointKindError` (one line) when ``checkpoint`` is not DualMem's or
    holds another method than ``run_cfg`` builds; run planning calls this before it lists
    config differences (they would all follow from the method)."""
    state = _load(checkpoint, trusted)
    if state is None:
        from dualmem.utils.checkpoint import load_checkpoint

        load_checkpoint(checkpoint, map_location="cpu", trusted=trusted)  # raises, saying why
        return
    if not is_dualmem(state):
        raise not_dualmem(checkpoint, describe(state))
    message = method_mismatch(checkpoint, state["config"].get("net"), (run_cfg or {}).get("net"))
    if message:
        raise CheckpointKindError(message)
