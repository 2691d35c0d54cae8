"""Anomaly-scoring heads (DMAD)."""
from models.heads.dmad import DMAD, PatchBCELoss, PatchFocalLoss  # noqa: F401
