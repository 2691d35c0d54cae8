"""Anomaly-scoring heads: DMAD, DMAD as its authors' code does it, and PatchCore."""
from dualmem.models.heads.dmad import DMAD, PatchBCELoss, PatchFocalLoss  # noqa: F401
from dualmem.models.heads.dmad_reference import DMADReference  # noqa: F401
from dualmem.models.heads.patchcore import PatchCore  # noqa: F401
