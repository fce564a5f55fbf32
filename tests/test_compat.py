"""trainables/compress/compat.py: each workaround for SparseML 1.7 on a newer stack, on both profiles.

Each test is built to fail without its workaround: on a stand-in of the broken API (a QConfig with
``__slots__``, a torch version string) on every profile, and on the real breakage where the
installed torch has it (the Python 3.12 profile); on the default profile (torch 2.1.2) each
workaround must change nothing.
"""

import collections
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import study  # noqa: F401  (NM_DISABLE_ANALYTICS)
from study.requirements import TESTED_TORCH, torch_note
from trainables.compress import compat

REPO_ROOT = Path(__file__).resolve().parents[1]
TORCH = compat.torch_release()
SLOTTED_QCONFIG = "__slots__" in vars(compat._TORCH_QCONFIG)  # torch >= 2.7


def test_torch_release_parses_local_and_prerelease_versions():
    assert compat.torch_release("2.1.2") == (2, 1, 2)
    assert compat.torch_release("2.9.0+cu128") == (2, 9, 0)
    assert compat.torch_release("2.11") == (2, 11, 0)
    assert compat.torch_release("2.15.0.dev20260101+cpu") == (2, 15, 0)
    assert compat.torch_release("2.1.10a1") == (2, 1, 10)
    with pytest.raises(ValueError, match=r"version 'nightly' is not MAJOR.MINOR"):
        compat.torch_release("nightly")


# ---------------------------------------------------------------- 1. MAX_TORCH (torch >= 2.2)

def test_max_torch_is_set_only_above_sparseml_s_limit():
    env = {}
    assert compat.max_torch_env("2.1.2", env) is False and env == {}  # the default profile: untouched
    assert compat.max_torch_env("2.5.1+cu124", env) is True and env == {"MAX_TORCH": "99"}
    env = {"MAX_TORCH": "2.6"}
    assert compat.max_torch_env("2.14.1", env) is False and env == {"MAX_TORCH": "2.6"}  # the user's wins


def test_sparseml_imports_with_the_installed_torch_only_with_max_torch():
    """SparseML 1.7 checks torch at import (``sparseml.pytorch.base``, ``MAX_TORCH`` default 2.1.10)."""
    env = {k: v for k, v in os.environ.items() if k != "MAX_TORCH"}
    plain = "import study, sparseml.pytorch.optim; print('imported')"
    shimmed = "import study, trainables.compress.compat, sparseml.pytorch.optim; print('imported')"
    results = [subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=300) for code in (plain, shimmed)]
    assert results[1].returncode == 0 and "imported" in results[1].stdout, results[1].stderr[-2000:]
    if TORCH >= (2, 2, 0):  # the breakage the shim exists for
        assert results[0].returncode != 0 and "torch" in results[0].stderr, results[0].stdout
    else:
        assert results[0].returncode == 0, results[0].stderr[-2000:]
        assert "MAX_TORCH" not in os.environ  # importing compat on torch 2.1 set nothing


# ---------------------------------------------------------------- 2. QConfig without __slots__ (torch >= 2.7)

def _slotted_qconfig():
    """A stand-in of torch >= 2.7's QConfig: a namedtuple subclass with ``__slots__ = ()``."""
    class QConfig(collections.namedtuple("QConfig", ["activation", "weight"])):
        __slots__ = ()
    return QConfig


def test_qconfig_replacement_accepts_sparseml_s_attribute_on_a_slotted_qconfig():
    base = _slotted_qconfig()
    with pytest.raises(AttributeError):  # the breakage: SparseML's `qconfig.quantization_scheme = ...`
        base(1, 2).quantization_scheme = "scheme"

    class Replacement(base):
        pass

    modules = [types.SimpleNamespace(QConfig=base), types.SimpleNamespace(QConfig=base),
               types.SimpleNamespace(QConfig=object)]
    changed = compat.install_qconfig(modules, base=base, replacement=Replacement)
    assert changed == modules[:2] and modules[2].QConfig is object
    qconfig = modules[0].QConfig(activation=1, weight=2)
    qconfig.quantization_scheme = "scheme"
    assert (qconfig.activation, qconfig.weight, qconfig.quantization_scheme) == (1, 2, "scheme")
    assert isinstance(qconfig, base) and tuple(qconfig) == (1, 2)


def test_qconfig_is_left_alone_where_torch_has_no_slots():
    class Unslotted(collections.namedtuple("QConfig", ["activation", "weight"])):
        pass

    module = types.SimpleNamespace(QConfig=Unslotted)
    assert compat.install_qconfig([module], base=Unslotted) == [] and module.QConfig is Unslotted


def test_sparseml_qat_qconfig_on_the_installed_torch():
    """SparseML's own QConfig construction (``QuantizationScheme.get_qconfig``), after compat."""
    from sparseml.pytorch.sparsification.quantization.quantization_scheme import QuantizationScheme

    qconfig = QuantizationScheme().get_qconfig()
    assert isinstance(qconfig.quantization_scheme, QuantizationScheme)
    assert isinstance(qconfig, compat._TORCH_QCONFIG)
    assert (type(qconfig) is compat.QConfig) == SLOTTED_QCONFIG  # replaced only where torch has __slots__
    assert (torch.quantization.QConfig is compat.QConfig) == SLOTTED_QCONFIG


# ---------------------------------------------------------------- 3. legacy ONNX exporter (torch >= 2.9)

def test_onnx_export_kwargs_ask_for_the_legacy_exporter_from_torch_2_9():
    assert compat.onnx_export_kwargs("2.1.2") == {}
    assert compat.onnx_export_kwargs("2.8.0") == {}
    assert compat.onnx_export_kwargs("2.9.0+cu128") == {"dynamo": False}
    assert compat.onnx_export_kwargs("2.14.1") == {"dynamo": False}


@pytest.mark.skipif(TORCH < (2, 9, 0), reason="torch < 2.9 exports with the legacy exporter by default")
def test_sparseml_export_fails_without_the_legacy_exporter(tmp_path):
    """The breakage: torch >= 2.9's default (dynamo) exporter under SparseML's export_onnx."""
    from sparseml.pytorch.utils import ModuleExporter

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten())
    sample = torch.zeros(1, 3, 8, 8)
    ModuleExporter(model, str(tmp_path)).export_onnx(sample, name="legacy.onnx", **compat.onnx_export_kwargs())
    assert (tmp_path / "legacy.onnx").stat().st_size > 0
    with pytest.raises(Exception):
        ModuleExporter(model, str(tmp_path)).export_onnx(sample, name="dynamo.onnx")


# ---------------------------------------------------------------- 4. onnx.mapping (onnx >= 1.19)

def test_onnx_mapping_is_there_for_sparsezoo(monkeypatch):
    compat.check_onnx_mapping()  # the pinned onnx (1.14.1 / 1.18.0) has it
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx.mapping" else real(name, *a))
    with pytest.raises(ImportError, match=r"has no onnx.mapping \(removed in onnx 1.19\).*onnx==1.18.0"):
        compat.check_onnx_mapping()


# ---------------------------------------------------------------- 5. the newer stack's harmless warnings

def test_known_harmless_warnings_are_silenced_unless_verbose(monkeypatch):
    import warnings

    texts = ["pkg_resources is deprecated as an API. See https://setuptools.pypa.io/...",
             "torch.quantize_per_tensor, torch.quantize_per_channel and other quantized tensor creation functions "
             "that produce tensors with dtype torch.quint8 ... are deprecated"]
    for verbose, expected in (("0", 0), ("1", 2)):
        monkeypatch.setenv("DISTILL_SPARSIFY_VERBOSE", verbose)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compat.quiet_warnings()
            for text in texts:
                warnings.warn(text, UserWarning)
            warnings.warn("another warning", UserWarning)
        assert [str(w.message) for w in caught][:expected] == texts[:expected]
        assert len(caught) == expected + 1 and str(caught[-1].message) == "another warning"


# ---------------------------------------------------------------- 6. imghdr (Python >= 3.13): a dependency

def test_sparsezoo_finds_imghdr_on_this_python():
    """sparsezoo 1.7 imports imghdr: the stdlib's through Python 3.12; from 3.13, which removed it, the
    standard-imghdr backport (pyproject.toml)."""
    import importlib.util
    import sysconfig

    spec = importlib.util.find_spec("imghdr")
    assert spec is not None
    if sys.version_info >= (3, 13):
        from importlib import metadata

        assert metadata.version("standard-imghdr")
        assert Path(spec.origin).is_relative_to(sysconfig.get_paths()["purelib"])
    import sparsezoo.objects.file

    assert sparsezoo.objects.file.imghdr.what


# ---------------------------------------------------------------- tested range

def test_torch_outside_the_tested_range_is_one_line():
    assert torch_note("2.1.2", (3, 11, 7)) is None
    assert torch_note("2.1.2+cu121", (3, 10, 13)) is None
    assert torch_note("2.5.1", (3, 12, 1)) is None and torch_note("2.14.1+cu130", (3, 12, 1)) is None
    assert torch_note("2.15.0", (3, 12, 1)) == ("note: torch 2.15.0 is outside the tested range for Python 3.12 "
                                                "(torch >= 2.5.0, < 2.15.0); carrying on")
    assert torch_note("2.4.1", (3, 12, 1)).startswith("note: torch 2.4.1 is outside")
    assert torch_note("2.14.1", (3, 13, 0)) is None  # 3.13: the Python 3.12 profile's range
    assert torch_note("2.15.0", (3, 13, 0)).startswith("note: torch 2.15.0 is outside the tested range for "
                                                       "Python 3.12 (torch >= 2.5.0")
    assert torch_note("2.2.0", (3, 11, 7)) == ("note: torch 2.2.0 is outside the tested range for Python "
                                               "3.10/3.11 (torch 2.1.2); carrying on")
    assert set(TESTED_TORCH) == {"Python 3.10/3.11", "Python 3.12"}
    assert torch_note(version=sys.version_info) is None  # the profile's own install is in range
