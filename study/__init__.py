"""The study's vocabulary, importable by every layer: config and presets (``study.config``), the
student setups (``study.setups``), the sweep's grid (``study.sweep``), the run directory's layout
(``study.layout``), atomic file writes (``study.files``) and one-line errors (``study.errors``).

Importing this package sets ``NM_DISABLE_ANALYTICS=1`` (unless already set): the Neural Magic
packages (SparseML, DeepSparse, SparseZoo) otherwise try to send usage analytics at import, and
these machines have no network. Every module that imports them imports ``study`` first, so this
is the one place the variable is set; Ray workers inherit it from the driver (and a remote
cluster gets it through the job's ``runtime_env``). It also holds the known-noisy library loggers
at a quieter level unless the run is ``--verbose`` (``study.noise``).
"""

import os

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

from study.config import (  # noqa: E402
    ARCHS, PRESETS, RUNTIME_FIELDS, SPARSIFY_LOSSES, STAGES, STEMS, TASK_BATCH_RANGE, StudyConfig, StudyError,
    decision_rule, make_config, selection_metric, validate)
from study.layout import ONNX_MODELS, RunLayout  # noqa: E402
from study.noise import quiet_loggers  # noqa: E402
from study.setups import (  # noqa: E402
    FEATURE_LAYERS, LOSS_TERMS, SETUP_INFO, SETUPS, LossTerm, Setup, needs_teacher, setup_needs)

quiet_loggers()

__all__ = ["ARCHS", "FEATURE_LAYERS", "LOSS_TERMS", "ONNX_MODELS", "PRESETS", "RUNTIME_FIELDS", "SETUP_INFO",
           "SETUPS", "SPARSIFY_LOSSES", "STAGES", "STEMS", "TASK_BATCH_RANGE", "LossTerm", "RunLayout", "Setup",
           "StudyConfig", "StudyError", "decision_rule", "make_config", "needs_teacher", "selection_metric",
           "setup_needs", "validate"]
