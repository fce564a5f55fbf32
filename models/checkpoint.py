"""This project's checkpoint file: ``torch.save`` of a dict with the model's build settings and
weights, written atomically, read back with ``torch.load(weights_only=True)`` (no code runs).
``models.resnet.load_checkpoint`` rebuilds the model from it."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from models.checks import check_arch, check_num_classes, check_role, check_stem, first_line
from study.files import atomic_output

CHECKPOINT_FORMAT = "distill-sparsify/1"

_PLAIN_SCALARS = (type(None), bool, int, float, str, bytes)


def _plain(value: Any, where: str) -> Any:
    """Convert ``extra`` to types ``torch.load(weights_only=True)`` can read."""
    if type(value) in _PLAIN_SCALARS or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise ValueError(f"extra{where}: dict key {key!r} must be str or int")
            out[key] = _plain(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        items = [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    item = getattr(value, "item", None)  # numpy scalars / 0-d arrays
    if callable(item) and getattr(value, "shape", None) == ():
        return _plain(item(), where)
    tolist = getattr(value, "tolist", None)  # numpy arrays
    if callable(tolist) and hasattr(value, "shape"):
        return _plain(tolist(), where)
    for kind in (bool, int, float, str, bytes):  # subclasses, e.g. IntEnum
        if isinstance(value, kind):
            return kind(value)
    raise ValueError(
        f"extra{where}: {type(value).__name__} cannot be stored; allowed: None, bool, int, "
        f"float, str, bytes, list, tuple, dict, torch.Tensor, numpy scalars/arrays"
    )


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    arch: str,
    stem: str,
    num_classes: int,
    role: str,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Write ``model``'s weights and build settings to ``path`` atomically.

    The file is ``torch.save`` of ``{"format": "distill-sparsify/1", "arch",
    "stem", "num_classes", "role", "state_dict", "extra"}``; tensors are moved
    to CPU first. It is written to a temporary file in the same directory and
    then ``os.replace``-d, so a reader never sees a half-written file. Parent
    directories are created.

    Args:
        model: the module whose ``state_dict()`` is saved.
        path: destination file.
        arch, stem, num_classes: the values the model was built with.
        role: "teacher" or "student" (decides the builder used on load).
        extra: optional dict of plain values (metrics, config): None, bool,
            int, float, str, bytes, list, tuple, dict, tensors; numpy scalars
            and arrays are converted to Python numbers/lists.

    Returns:
        ``path`` as a str.

    Raises:
        ValueError: bad arch/stem/num_classes/role, or an ``extra`` value that
            cannot be stored (one line).
    """
    check_arch(arch)
    check_stem(stem)
    check_num_classes(num_classes)
    check_role(role)
    extra = _plain(dict(extra) if extra is not None else {}, "")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "stem": stem,
        "num_classes": num_classes,
        "role": role,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra,
    }
    path = os.fspath(path)
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)
    return path


def _read_checkpoint(path: str | os.PathLike, map_location: Any) -> dict[str, Any]:
    """Read and validate a checkpoint file; one-line ValueError on any problem."""
    spath = os.fspath(path)
    if not os.path.isfile(spath):
        raise ValueError(f"checkpoint {spath!r} does not exist or is not a file")
    try:
        with warnings.catch_warnings():
            # torch 2.1's weights_only unpickler touches TypedStorage and warns about it.
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            ckpt = torch.load(spath, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle/zip/EOF errors all mean "not readable"
        raise ValueError(
            f"checkpoint {spath!r} is corrupt or not a torch file ({first_line(exc)})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(
            f"checkpoint {spath!r} is not a {CHECKPOINT_FORMAT!r} checkpoint (found format {found!r})"
        )
    missing = [k for k in ("arch", "stem", "num_classes", "role", "state_dict") if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {spath!r} lacks the keys {', '.join(missing)}")
    for key, check in (
        ("arch", check_arch),
        ("stem", check_stem),
        ("num_classes", check_num_classes),
        ("role", check_role),
    ):
        try:
            check(ckpt[key])
        except ValueError as exc:
            raise ValueError(f"checkpoint {spath!r}: {exc}") from None
    return ckpt


def _load_state_strict(model: nn.Module, state: Mapping[str, Any], path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} weights do not fit the model: {detail[:300]}"
        ) from None
