"""Necks: align multi-stage backbone features into one map."""
from models.necks.mfcn import MFCN  # noqa: F401
from models.necks.patchcore import PatchCoreNeck  # noqa: F401
