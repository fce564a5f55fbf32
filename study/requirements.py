"""What each stage needs from the machine: the Python versions and packages it imports.

The training stages (teacher, students) need only torch, torchvision and Ray (with the pandas and
tabulate that Ray Tune's results and the results table use), on any Python >= 3.10; SparseML and
ONNX are demanded only when a run reaches the sparsify or bench stage. Two profiles run those
(docs/profiles.md): the default one, Python 3.10/3.11 with the pinned stack, DeepSparse included;
and Python 3.12 or 3.13 with a newer torch, SparseML installed by ``requirements/py312-sparseml.txt`` and no
DeepSparse (the bench stage runs onnxruntime, and DeepSparse only through ``--deepsparse-python``).
Nothing here imports the packages it checks for, so ``orchestrate.py`` can run these checks before
it loads the stack.
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
#: The Python 3.12 profile's sparsify/bench packages: DeepSparse has no wheel past 3.11 (the bench
#: stage runs it from another Python with ``--deepsparse-python``, or leaves it out).
SPARSIFY_PACKAGES_312 = ("sparseml", "sparsezoo", "onnx", "onnxruntime", "openvino", "nncf", "yaml")
#: The newest Python whose sparsify/bench stages were verified (the Python 3.12 profile, which covers
#: 3.12 and 3.13).
NEWEST_SPARSIFY_PYTHON = (3, 13)
#: How the Python 3.12 profile gets SparseML/SparseZoo 1.7, whose metadata refuses Python 3.12.
PY312_SPARSEML_INSTALL = "pip install --no-deps --ignore-requires-python -r {project}/requirements/py312-sparseml.txt"
#: torch versions verified per profile, as [lowest, above-highest) releases (docs/profiles.md, "Tested versions").
TESTED_TORCH = {
    "Python 3.10/3.11": ((2, 1, 2), (2, 1, 3)),
    "Python 3.12": ((2, 5, 0), (2, 15, 0)),
}


def sparsify_stages(stop_after: str) -> bool:
    """Whether a run that stops after ``stop_after`` reaches the sparsify/bench stages, the only
    ones that need SparseML, DeepSparse and ONNX (and so Python 3.10/3.11)."""
    return stop_after in ("sparsify", "bench")


def check_python(version=sys.version_info, sparsify: bool = True) -> None:
    """StudyError unless Python is 3.10 to 3.13, or, when the run stops before the sparsify
    stage (``sparsify=False``), any Python >= 3.10 (the training stages need only torch,
    torchvision and Ray; the sparsify/bench stages were verified on 3.10 to 3.13)."""
    major_minor = tuple(version[:2])
    if major_minor < (3, 10) or (sparsify and major_minor > NEWEST_SPARSIFY_PYTHON):
        hint = " or run only the training stages (--stop-after students)" if major_minor > (3, 11) else ""
        raise StudyError(f"Python {version[0]}.{version[1]} is not supported; use Python 3.10 or 3.11 (the "
                         f"default profile) or 3.12 or 3.13 (the Python 3.12 profile, docs/profiles.md){hint}")


def sparsify_packages(version=sys.version_info) -> tuple[str, ...]:
    """The sparsify/bench stages' packages on Python ``version``: ``SPARSIFY_PACKAGES`` on 3.10/3.11,
    ``SPARSIFY_PACKAGES_312`` (no DeepSparse) from 3.12 (3.12 and 3.13: the Python 3.12 profile)."""
    return SPARSIFY_PACKAGES_312 if tuple(version[:2]) >= (3, 12) else SPARSIFY_PACKAGES


def required_packages(stop_after: str, version=sys.version_info) -> tuple[str, ...]:
    """The packages a run that stops after ``stop_after`` imports (``TRAINING_PACKAGES``, plus
    ``sparsify_packages(version)`` when it reaches the sparsify or bench stage)."""
    return TRAINING_PACKAGES + sparsify_packages(version) if sparsify_stages(stop_after) else TRAINING_PACKAGES


def release(version: str) -> tuple[int, int, int]:
    """``(major, minor, patch)`` of a version string, local and pre-release parts dropped:
    ``"2.9.0+cu128"`` -> ``(2, 9, 0)``, ``"2.1.10a1"`` -> ``(2, 1, 10)``. ValueError on a string
    that does not start with ``MAJOR.MINOR``."""
    import re

    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise ValueError(f"version {version!r} is not MAJOR.MINOR[.PATCH]")
    return int(match[1]), int(match[2]), int(match[3] or 0)


def torch_note(torch_version: str | None = None, version=sys.version_info) -> str | None:
    """One line naming ``torch_version`` (default: the installed torch's, read from its metadata,
    not imported) and this Python's tested torch range when it lies outside it; None inside it or
    when torch is not installed. The run carries on either way."""
    from importlib import metadata

    if torch_version is None:
        try:
            torch_version = metadata.version("torch")
        except metadata.PackageNotFoundError:
            return None
    profile = "Python 3.12" if tuple(version[:2]) >= (3, 12) else "Python 3.10/3.11"
    low, high = TESTED_TORCH[profile]
    if low <= release(torch_version) < high:
        return None
    tested = ".".join(map(str, low)) if high == low[:2] + (low[2] + 1,) else \
        f">= {'.'.join(map(str, low))}, < {'.'.join(map(str, high))}"
    return (f"note: torch {torch_version} is outside the tested range for {profile} (torch {tested}); "
            "carrying on")


def has_deepsparse() -> bool:
    """Whether this Python can import DeepSparse (not on the Python 3.12 profile)."""
    import importlib.util

    return importlib.util.find_spec("deepsparse") is not None


def runs_deepsparse(deepsparse_python: str | None = None) -> bool:
    """Whether the bench stage runs DeepSparse: in this Python (:func:`has_deepsparse`) or through
    ``deepsparse_python``'s ``deepsparse.benchmark`` command (``--deepsparse-python``). The bench
    stage's fingerprint records it, so a finished run given DeepSparse later reruns its bench."""
    return bool(deepsparse_python) or has_deepsparse()


def check_packages(names=REQUIRED_PACKAGES, prefix: str = sys.prefix, project: Path = PROJECT_DIR,
                   version=sys.version_info) -> None:
    """StudyError naming the packages of the stack that cannot be found, and how to get them: activate
    the project's ``.venv`` when it exists and this Python (``prefix``) is not it, else install (on
    Python ``version`` >= 3.12, SparseML/SparseZoo by ``requirements/py312-sparseml.txt``)."""
    import importlib.util

    missing = [name for name in names if importlib.util.find_spec(name) is None]
    venv = Path(project) / ".venv"
    if missing and venv.is_dir() and Path(prefix).resolve() != venv.resolve():
        raise StudyError(f"package(s) {', '.join(missing)} not found by {sys.executable}; activate the "
                         f"project's virtual environment first (. {venv}/bin/activate) or run "
                         f"{venv}/bin/python orchestrate.py")
    if missing and tuple(version[:2]) >= (3, 12) and set(missing) <= {"sparseml", "sparsezoo"}:
        python = f"{version[0]}.{version[1]}"
        raise StudyError(f"package(s) {', '.join(missing)} not installed: on Python {python} the sparsify and "
                         f"bench stages need SparseML 1.7, whose metadata refuses {python}; run: "
                         f"{PY312_SPARSEML_INSTALL.format(project=project)} (or run only the training stages: "
                         "--stop-after students)")
    if missing:
        raise StudyError(f"package(s) {', '.join(missing)} not installed; run: pip install -e "
                         f"'{project}[report,test]'")
