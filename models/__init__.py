"""ResNet teacher/student builders, feature hooks and checkpoints (see models.resnet)."""

from .resnet import (
    ARCHS,
    CHECKPOINT_FORMAT,
    FEATURE_LAYERS,
    ROLES,
    STEMS,
    WeightsUnavailableError,
    build_student,
    build_teacher,
    count_parameters,
    forward_features,
    load_checkpoint,
    save_checkpoint,
)

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
    "forward_features",
    "load_checkpoint",
    "save_checkpoint",
]
