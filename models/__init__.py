"""DualMem models: every module a config's ``net:`` list can name registers here on import."""
from models import backbones, heads, necks, reconstructions  # noqa: F401
from models.model_builder import ModelHelper  # noqa: F401
from models.registry import MODELS  # noqa: F401
