"""retinanet: a small, exact and fast RetinaNet training framework."""

from .config import Config, ConfigError, load_config
from .modeling import build_model, sigmoid_focal_loss, softmax_focal_loss

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "build_model", "load_config", "sigmoid_focal_loss", "softmax_focal_loss"]
