"""Reconstruction heads: UniAD and DuMeNet's dual-memory extension."""
from models.reconstructions.uniad import UniAD  # noqa: F401
from models.reconstructions.uniad_memory import UniADMemory  # noqa: F401
