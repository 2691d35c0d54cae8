"""Necks: align multi-stage backbone features into one map."""
from dualmem.models.necks.mfcn import MFCN  # noqa: F401
from dualmem.models.necks.patchcore import PatchCoreNeck  # noqa: F401
