"""Reconstruction heads: UniAD and DuMeNet's dual-memory extension."""
from dualmem.models.reconstructions.uniad import UniAD  # noqa: F401
from dualmem.models.reconstructions.uniad_memory import UniADMemory  # noqa: F401
