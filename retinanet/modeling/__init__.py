"""The model's parts, one module each, named after the paper's components."""

from .anchors import AnchorGenerator
from .backbone import ResNetBackbone
from .box_coder import BoxCoder
from .fpn import FPN
from .head import RetinaNetHead
from .losses import RetinaNetLoss, sigmoid_focal_loss, softmax_focal_loss
from .matcher import BACKGROUND, FOREGROUND, IGNORE, Matcher
from .postprocess import PostProcessor
from .preprocess import Preprocessor
from .retinanet import RetinaNet, build_model

__all__ = [
    "AnchorGenerator", "BACKGROUND", "BoxCoder", "FOREGROUND", "FPN", "IGNORE", "Matcher", "PostProcessor",
    "Preprocessor", "ResNetBackbone", "RetinaNet", "RetinaNetHead", "RetinaNetLoss", "build_model",
    "sigmoid_focal_loss", "softmax_focal_loss",
]
