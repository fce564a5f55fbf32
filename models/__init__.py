"""ResNet teacher/student builders (``models.resnet``), their feature maps (``models.features``)
and this project's checkpoint file (``models.checkpoint``)."""

from .checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from .checks import ROLES
from .resnet import (
    ARCHS,
    FEATURE_LAYERS,
    STEMS,
    WeightsUnavailableError,
    build_student,
    build_teacher,
    count_parameters,
    load_checkpoint,
)
from .features import feature_extractor, forward_features

__all__ = [
    "ARCHS",
    "CHECKPOINT_FORMAT",
    "FEATURE_LAYERS",
    "ROLES",
    "STEMS",
    "WeightsUnavailableError",
    "build_student",
    "build_teacher",
    "count_parameters",
    "feature_extractor",
    "forward_features",
    "load_checkpoint",
    "save_checkpoint",
]
