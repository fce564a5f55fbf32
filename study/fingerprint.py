"""The fingerprint of what a stage read, recorded next to its outputs, and how two compare.

What a stage reads is declared by the stage (``Declared``: its module in ``stages/``) and handed
in. A stage's fingerprint (``RunLayout.fingerprint(stage)``, ``fingerprints/<stage>.json``) holds:

* ``fields``: the values of the StudyConfig fields the stage reads (each field declared by the
  first stage that reads it); a field that names a file (``FILE_FIELDS``) is recorded by content,
  in ``files``;
* ``files``: label -> ``{"path", "sha256"}`` of every file the stage reads (the recipe, the
  teacher's initial weights, ``teacher.pt``, the winning checkpoint, the ONNX models);
* ``data``: split -> sha256 of the uint8 images and labels the stage trained or tested on
  (after subsetting), so the data root may move but its images may not change;
* ``code``: relative path -> sha256 of every source file of this project that the stage runs
  (its entry modules and what they import, ``study.sources``), so an edit to the code a stage
  runs reruns it; ``report/`` and ``bench/perf/`` are in no stage's code;
* ``complete``: False while the stage runs in place (an interrupted first attempt), True once its
  outputs are complete.

Two fingerprints are the same input when their ``fields``, the sha256 of their ``files``, their
``data`` and their ``code`` agree: paths of files and data are not compared (a moved file or data
root is the same input).
Pure data and hashlib: nothing heavy is imported here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

from study.files import atomic_write_text, sha256_file

FINGERPRINT_FORMAT = 1

#: Fields no stage reads as a value: the preset is only the name of the values the other fields
#: hold (and those are compared).
LABEL_FIELDS: tuple[str, ...] = ("preset",)


class Declared(Protocol):
    """What a stage declares it reads (``stages.base.Stage``): its ``name``, the config ``fields``
    it reads and the data splits (``data``: ``train``, ``val``, ``test``) it trains or tests on."""

    name: str
    fields: tuple[str, ...]
    data: tuple[str, ...]


#: Fields that name a file: the stage records the file's sha256 (``files[field]``), not its path.
#: ``teacher_weights`` names a file unless it is one of ``NOT_A_FILE``.
FILE_FIELDS: tuple[str, ...] = ("recipe", "teacher_weights")
NOT_A_FILE: dict[str, tuple] = {"teacher_weights": (None, "imagenet")}
#: What ``fields`` holds for a file field: the file itself is in ``files``.
FILE_MARK = "<file>"

DATA_NAMES = {"train": "training images", "val": "validation images", "test": "test images"}


def file_field(name: str, value: Any) -> bool:
    """Whether config field ``name`` with ``value`` names a file (recorded by its content)."""
    return name in FILE_FIELDS and value not in NOT_A_FILE.get(name, ())


def stage_fields(fields: tuple[str, ...], config: dict) -> dict:
    """The values of the config ``fields`` (a stage's), from ``config`` (``config.json``'s dict); a
    file field holds ``FILE_MARK`` (its file is fingerprinted by content)."""
    return {name: FILE_MARK if file_field(name, config.get(name)) else config.get(name) for name in fields}


def file_inputs(fields: tuple[str, ...], config: dict) -> dict[str, str]:
    """label -> path of the files named by the config ``fields`` (a stage's: the recipe, a teacher
    weights file) in ``config``; files made by earlier stages are added by the caller."""
    return {name: str(config[name]) for name in fields if file_field(name, config.get(name))}


def make_fingerprint(stage: Declared, config: dict, data: dict, files: dict[str, str], complete: bool = True,
                     root: str | os.PathLike | None = None, code: dict[str, str] | None = None) -> dict:
    """The fingerprint of ``stage`` (its declaration: ``Declared``) run with ``config`` (a
    StudyConfig as ``config.json``'s dict), on ``data`` (split -> sha256, None for a split the run
    has not) and ``files`` (label -> path, hashed here; a relative path is relative to ``root``, the
    run directory, and recorded so; a missing file's digest is None), by the source files ``code``
    (path -> sha256, ``study.sources.code_digests``; None: none)."""
    hashed = {}
    for label, path in files.items():
        try:
            digest = sha256_file(Path(root or ".") / path)
        except OSError:
            digest = None
        hashed[label] = {"path": str(path), "sha256": digest}
    return {"format": FINGERPRINT_FORMAT, "stage": stage.name, "complete": bool(complete),
            "fields": stage_fields(stage.fields, config), "files": hashed,
            "data": {split: data.get(split) for split in stage.data}, "code": dict(code or {})}


def _short(digest: str | None) -> str:
    return "missing" if digest is None else digest[:4] + "\u2026"


def changed_code(old: dict, new: dict) -> list[str] | None:
    """The source files (paths) whose sha256 differ from fingerprint ``old`` to ``new``, sorted (a
    file in one only counts); None when ``old`` records no ``code``."""
    if "code" not in old:
        return None
    before, after = old["code"], new.get("code", {})
    return sorted(path for path in set(before) | set(after) if before.get(path) != after.get(path))


def _code_phrase(paths: list[str] | None) -> str | None:
    if paths is None:
        return "code (not recorded)"
    if not paths:
        return None
    more = f" and {len(paths) - 3} more files" if len(paths) > 3 else ""
    return f"code {', '.join(paths[:3])}{more} changed"


def differences(old: dict, new: dict) -> list[str]:
    """What changed from fingerprint ``old`` to ``new``, one phrase each (empty: the same inputs):
    ``recipe my-recipe.yaml changed (sha256 3f2a… -> 9b1c…)``, ``temperature 4.0 -> 2.0``,
    ``training images changed (sha256 …)``, ``code trainables/losses.py changed`` (at most three
    paths named, then ``and N more files``). Paths of files and data are not compared."""
    out = []
    old_fields, new_fields = old.get("fields", {}), new.get("fields", {})
    for name in new_fields:
        if name in old_fields and old_fields[name] != new_fields[name]:
            out.append(f"{name} {old_fields[name]!r} -> {new_fields[name]!r}")
        elif name not in old_fields:
            out.append(f"{name} (not recorded) -> {new_fields[name]!r}")
    old_files, new_files = old.get("files", {}), new.get("files", {})
    for label in sorted(set(old_files) | set(new_files)):
        before, after = old_files.get(label, {}).get("sha256"), new_files.get(label, {}).get("sha256")
        if before != after:
            name = Path((new_files.get(label) or old_files[label])["path"]).name
            what = label if label == name else f"{label} {name}"
            out.append(f"{what} changed (sha256 {_short(before)} -> {_short(after)})")
    old_data, new_data = old.get("data", {}), new.get("data", {})
    for split in new_data:
        if old_data.get(split) != new_data[split]:
            out.append(f"{DATA_NAMES[split]} changed (sha256 {_short(old_data.get(split))} -> "
                       f"{_short(new_data[split])})")
    code = _code_phrase(changed_code(old, new))
    return out + ([code] if code else [])


def changed_inputs(old: dict, new: dict) -> set[str]:
    """The names of what differs from ``old`` to ``new``: field names, ``file:<label>``,
    ``data:<split>`` and ``code:<path>`` (``code`` when ``old`` records none) (empty: the same
    inputs; the same comparison as ``differences``)."""
    out = {name for name in set(old.get("fields", {})) | set(new.get("fields", {}))
           if old.get("fields", {}).get(name, FILE_MARK + "?") != new.get("fields", {}).get(name, FILE_MARK + "?")}
    for label in set(old.get("files", {})) | set(new.get("files", {})):
        if old.get("files", {}).get(label, {}).get("sha256") != new.get("files", {}).get(label, {}).get("sha256"):
            out.add(f"file:{label}")
    out |= {f"data:{split}" for split in new.get("data", {}) if old.get("data", {}).get(split) != new["data"][split]}
    code = changed_code(old, new)
    return out | ({"code"} if code is None else {f"code:{path}" for path in code})


def read_fingerprint(path: str | os.PathLike) -> dict | None:
    """The fingerprint at ``path``, or None when there is none (or it is unreadable: unknown)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and value.get("format") == FINGERPRINT_FORMAT else None


def write_fingerprint(path: str | os.PathLike, fingerprint: dict) -> None:
    """Write ``fingerprint`` to ``path`` atomically."""
    atomic_write_text(path, json.dumps(fingerprint, indent=2))

