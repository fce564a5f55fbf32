"""SparseML 1.7 on a newer stack than it was released for (the Python 3.12 profile): every
workaround, in one place.

SparseML 1.7 (archived 2025-06) was released for torch <= 2.1 and onnx < 1.15. Each workaround
below names what broke and from which version, and is a no-op where nothing broke: on the default
profile (Python 3.10/3.11, torch 2.1.2) none of them changes anything.

:func:`apply` runs when this module is imported; ``recipe.py``, ``core.py`` and ``export.py``
import it before they import SparseML (SparseML reads ``MAX_TORCH`` at import time, and its
quantization code looks ``QConfig`` up on ``torch.quantization`` at call time). ``export.py`` passes
:func:`onnx_export_kwargs` to SparseML's exporter.

Not needed with the pinned onnx 1.18: sparsezoo 1.7 imports ``onnx.mapping``, which onnx 1.19
removed; :func:`check_onnx_mapping` says so in one line instead of a traceback. Not code either
(item 6): on Python 3.13 sparsezoo 1.7's ``import imghdr`` is met by a dependency, ``standard-imghdr``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Iterable, MutableMapping, Optional

import torch

from study.noise import verbose
from study.requirements import release

__all__ = ["torch_release", "max_torch_env", "QConfig", "install_qconfig", "onnx_export_kwargs",
           "check_onnx_mapping", "apply"]


def torch_release(version: Optional[str] = None) -> tuple[int, int, int]:
    """``(major, minor, patch)`` of a torch version string (default: the installed torch's), local
    and pre-release parts dropped (``study.requirements.release``): ``"2.9.0+cu128"`` -> ``(2, 9, 0)``.
    ValueError on a string that does not start with ``MAJOR.MINOR``."""
    return release(version or torch.__version__)


# 1. SparseML's torch check. sparseml/pytorch/base.py 1.7: `_TORCH_MAX_VERSION =
#    os.environ.get("MAX_TORCH", "2.1.10")`, read once at import; `check_torch_install` then raises
#    ImportError for torch >= 2.2 ("torch ... not supported, max 2.1.10"). MAX_TORCH is SparseML's own
#    override (NM_BYPASS_TORCH_VERSION only covers torch 1.10/1.11). Broke from torch 2.2.
MAX_TORCH_VALUE = "99"


def max_torch_env(version: Optional[str] = None, environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """Set ``MAX_TORCH`` in ``environ`` (default ``os.environ``; Ray workers inherit it) when torch
    ``version`` is above SparseML 1.7's limit (2.1.x) and ``MAX_TORCH`` is not set yet. Returns
    whether it set it. Must run before ``sparseml.pytorch`` is first imported."""
    environ = os.environ if environ is None else environ
    if torch_release(version) < (2, 2, 0) or "MAX_TORCH" in environ:
        return False
    environ["MAX_TORCH"] = MAX_TORCH_VALUE
    return True


# 2. QConfig. SparseML 1.7 stores its scheme on torch's QConfig namedtuple
#    (`qconfig.quantization_scheme = self`, sparseml/pytorch/sparsification/quantization/
#    quantization_scheme.py and helpers.py). torch 2.7 gave QConfig `__slots__ = ()`, so the QAT start
#    fails with AttributeError: 'QConfig' object has no attribute 'quantization_scheme'. Broke from
#    torch 2.7. A subclass that declares no __slots__ has a __dict__ again; SparseML builds its
#    QConfigs as `torch.quantization.QConfig(...)`, looked up at call time, so the subclass is put on
#    the modules that export the name.
_TORCH_QCONFIG = torch.ao.quantization.qconfig.QConfig


class QConfig(_TORCH_QCONFIG):
    """torch's ``QConfig(activation, weight)`` with an instance ``__dict__`` (no ``__slots__``), so
    SparseML can attach ``quantization_scheme``; otherwise the same namedtuple."""


def _qconfig_modules() -> list:
    import torch.ao.quantization as ao_quantization
    import torch.ao.quantization.qconfig as ao_qconfig
    import torch.quantization as legacy_quantization

    modules = [ao_qconfig, ao_quantization, legacy_quantization]
    legacy_qconfig = getattr(legacy_quantization, "qconfig", None)
    return modules + ([legacy_qconfig] if legacy_qconfig is not None else [])


def install_qconfig(modules: Optional[Iterable[Any]] = None, base: Optional[type] = None,
                    replacement: Optional[type] = None) -> list:
    """Put ``replacement`` (default :class:`QConfig`) in place of ``base`` (default torch's
    ``QConfig``) as the attribute ``QConfig`` of each of ``modules`` that holds ``base`` (default:
    ``torch.ao.quantization(.qconfig)``, ``torch.quantization(.qconfig)``), only when ``base`` declares
    ``__slots__`` (torch >= 2.7). Returns the modules changed (empty: nothing to do)."""
    base = _TORCH_QCONFIG if base is None else base
    replacement = QConfig if replacement is None else replacement
    if "__slots__" not in vars(base):
        return []
    changed = []
    for module in _qconfig_modules() if modules is None else modules:
        if getattr(module, "QConfig", None) is base:
            setattr(module, "QConfig", replacement)
            changed.append(module)
    return changed


# 3. The ONNX exporter. torch 2.9 made `torch.onnx.export` default to the dynamo exporter
#    (`dynamo=True`): SparseML's export then fails with ModuleNotFoundError: onnxscript, and with
#    onnxscript installed the QAT export fails in SparseML's observer hooks. SparseML's `export_onnx`
#    passes extra keywords on to `torch.onnx.export`, so the legacy (TorchScript) exporter is asked
#    for there. Broke from torch 2.9; the `dynamo` keyword exists from torch 2.5 (default False).
def onnx_export_kwargs(version: Optional[str] = None) -> Dict[str, Any]:
    """Extra keywords for ``torch.onnx.export`` (through SparseML's ``export_onnx``):
    ``{"dynamo": False}`` on torch >= 2.9, else ``{}``."""
    return {"dynamo": False} if torch_release(version) >= (2, 9, 0) else {}


# 4. onnx.mapping. sparsezoo 1.7 (`sparsezoo/utils/node_inference.py`) does `from onnx.mapping import
#    TENSOR_TYPE_TO_NP_TYPE`; onnx 1.19 removed `onnx.mapping`. The Python 3.12 profile pins onnx 1.18
#    (pyproject.toml), so no shim: a newer onnx gets one clear line.
def check_onnx_mapping() -> None:
    """ImportError in one line when the installed onnx lacks ``onnx.mapping`` (onnx >= 1.19), which
    sparsezoo 1.7 imports."""
    import importlib.util

    import onnx

    if importlib.util.find_spec("onnx.mapping") is None:
        raise ImportError(f"onnx {onnx.__version__} has no onnx.mapping (removed in onnx 1.19), which "
                          "sparsezoo 1.7 imports; install onnx==1.18.0 (pyproject.toml)")


# 5. Warnings of the newer stack about APIs SparseML 1.7 uses, harmless while they still exist; silenced
#    unless --verbose (study/noise.py lists the other silenced output):
#    - `sparseml/base.py` imports pkg_resources; setuptools 80 (the newest below 81, which removed it)
#      warns "pkg_resources is deprecated as an API" in every process that imports SparseML.
#    - SparseML's convert_qat export builds int8 initializers with torch.quantize_per_tensor; newer
#      torch (seen on 2.14) warns once per export that quantized tensor creation functions are deprecated.
QUIET_WARNINGS = (
    ("pkg_resources is deprecated as an API", UserWarning),
    ("torch.quantize_per_tensor, torch.quantize_per_channel and other quantized tensor creation", UserWarning),
)


def quiet_warnings() -> None:
    """Ignore the warnings of ``QUIET_WARNINGS`` unless ``--verbose``."""
    if not verbose():
        for message, category in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)


# 6. imghdr. sparsezoo 1.7 (`sparsezoo/objects/file.py`) does `import imghdr` (used once,
#    `imghdr.what(self.path)`); Python 3.13 removed imghdr from the stdlib (PEP 594), so `import sparsezoo`
#    fails with ModuleNotFoundError: No module named 'imghdr'. Broke from Python 3.13. No shim: a
#    dependency, the PyPI backport `standard-imghdr` (pyproject.toml, Python >= 3.13 only), which warns
#    on import with a DeprecationWarning that Python's default filters hide (pytest's are in pyproject.toml).


def apply() -> None:
    """Install the import-time workarounds (1, 2, 5) and check 4; each is a no-op where nothing broke."""
    quiet_warnings()
    max_torch_env()
    install_qconfig()
    check_onnx_mapping()


apply()
