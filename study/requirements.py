"""What each stage needs from the machine: the Python versions and packages it imports.

The training stages (teacher, students) need only torch, torchvision and Ray (with the pandas and
tabulate that Ray Tune's results and the results table use), on any Python >= 3.10; SparseML,
DeepSparse and ONNX, which ship wheels for Python 3.10/3.11 only, are demanded only when a run
reaches the sparsify or bench stage. Nothing here imports the packages it checks for, so
``orchestrate.py`` can run these checks before it loads the stack.
"""

from __future__ import annotations

import sys
from pathlib import Path

from study.config import PROJECT_DIR, StudyError

#: What the training stages (teacher, students) import: torch, torchvision, Ray and what Ray Tune
#: and the results tables use (scipy: the intervals over seeds). Any Python >= 3.10 with these
#: runs ``--stop-after students``.
TRAINING_PACKAGES = ("torch", "torchvision", "ray", "pandas", "numpy", "scipy", "tabulate")
#: Only the sparsify and bench stages import these (wheels for Python 3.10/3.11 only).
SPARSIFY_PACKAGES = ("sparseml", "deepsparse", "onnx", "onnxruntime", "openvino", "nncf", "yaml")
REQUIRED_PACKAGES = TRAINING_PACKAGES + SPARSIFY_PACKAGES


def sparsify_stages(stop_after: str) -> bool:
    """Whether a run that stops after ``stop_after`` reaches the sparsify/bench stages, the only
    ones that need SparseML, DeepSparse and ONNX (and so Python 3.10/3.11)."""
    return stop_after in ("sparsify", "bench")


def check_python(version=sys.version_info, sparsify: bool = True) -> None:
    """StudyError unless Python is 3.10 or 3.11, or, when the run stops before the sparsify
    stage (``sparsify=False``), any Python >= 3.10 (the training stages need only torch,
    torchvision and Ray; deepsparse/sparseml 1.7 ship wheels for 3.10/3.11 only)."""
    major_minor = tuple(version[:2])
    if major_minor < (3, 10) or (sparsify and major_minor > (3, 11)):
        hint = " or run only the training stages (--stop-after students)" if major_minor > (3, 11) else ""
        raise StudyError(f"Python {version[0]}.{version[1]} is not supported; use Python 3.10 or 3.11 "
                         f"(deepsparse/sparseml 1.7 ship wheels only for those){hint}")


def required_packages(stop_after: str) -> tuple[str, ...]:
    """The packages a run that stops after ``stop_after`` imports (``TRAINING_PACKAGES``, plus
    ``SPARSIFY_PACKAGES`` when it reaches the sparsify or bench stage)."""
    return REQUIRED_PACKAGES if sparsify_stages(stop_after) else TRAINING_PACKAGES


def check_packages(names=REQUIRED_PACKAGES, prefix: str = sys.prefix, project: Path = PROJECT_DIR) -> None:
    """StudyError naming the packages of the stack that cannot be found, and how to get them: activate
    the project's ``.venv`` when it exists and this Python (``prefix``) is not it, else install."""
    import importlib.util

    missing = [name for name in names if importlib.util.find_spec(name) is None]
    venv = Path(project) / ".venv"
    if missing and venv.is_dir() and Path(prefix).resolve() != venv.resolve():
        raise StudyError(f"package(s) {', '.join(missing)} not found by {sys.executable}; activate the "
                         f"project's virtual environment first (. {venv}/bin/activate) or run "
                         f"{venv}/bin/python orchestrate.py")
    if missing:
        raise StudyError(f"package(s) {', '.join(missing)} not installed; run: pip install -e "
                         f"'{project}[report,test]'")
