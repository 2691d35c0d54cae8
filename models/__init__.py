"""DualMem models: every module a config's ``net:`` list can name registers here on import."""
from dualmem.models import backbones, heads, necks, reconstructions  # noqa: F401
from dualmem.models.model_builder import ModelHelper  # noqa: F401
from dualmem.models.registry import MODELS  # noqa: F401
