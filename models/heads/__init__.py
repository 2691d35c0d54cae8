"""Anomaly-scoring heads (DMAD, and DMAD as its authors' code does it)."""
from models.heads.dmad import DMAD, PatchBCELoss, PatchFocalLoss  # noqa: F401
from models.heads.dmad_reference import DMADReference  # noqa: F401
