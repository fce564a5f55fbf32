"""The source files a stage runs: its entry modules and every module of this project they import,
transitively, each with the sha256 of its bytes (``code_digests``).

The imports are read with ``ast``, not executed: every ``import`` and ``from ... import`` in a
module counts, at its top or inside a function, a conditional or a ``try``. A name is this
project's when it lies in one of its packages (``PACKAGES``) and resolves to a file under the
project directory (``<root>/a/b.py`` or ``<root>/a/b/__init__.py``); everything else (the standard
library, torch, Ray, ...) is left out, also where it is installed beside the project.
Importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` too, so those count. Paths are
relative to the project directory, with ``/``. Pure ``ast`` and ``hashlib``: nothing is imported.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path
from typing import Iterable

#: The directory that holds the project's packages (``study/``, ``trainables/``, ...).
ROOT = Path(__file__).resolve().parent.parent
#: The project's top-level packages (the import-linter's ``root_packages`` in ``pyproject.toml``).
PACKAGES: tuple[str, ...] = ("stages", "report", "bench", "driver", "trainables", "models", "study")


def module_file(name: str, root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> Path | None:
    """The file of module ``name`` (dotted) under ``root``, or None when it is not in ``packages``
    or has no file there."""
    if name.split(".")[0] not in packages:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base.with_name(base.name + ".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _with_parents(name: str) -> list[str]:
    """``a.b.c`` -> ``["a", "a.b", "a.b.c"]``: what importing it runs."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name an import in the file ``path`` (module ``module``) may load: for
    ``from m import x`` both ``m`` and ``m.x`` (``x`` may be a submodule); relative imports
    resolved against ``module``. SyntaxError when the file does not parse."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1] if package else []
                base = ".".join([*anchor, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return {name for name in names if name}


def source_files(entries: Iterable[str], root: Path = ROOT,
                 packages: tuple[str, ...] = PACKAGES) -> tuple[str, ...]:
    """The files (relative to ``root``, sorted) that importing the modules ``entries`` runs from
    the project's ``packages``: each entry, its packages' ``__init__.py`` and, transitively, every
    module of them they import. ValueError when an entry is not a module of those packages."""
    todo, seen = [], {}
    for entry in entries:
        if module_file(entry, root, packages) is None:
            raise ValueError(f"{entry!r} is not a module under {root}")
        todo.extend(_with_parents(entry))
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = seen[name] = module_file(name, root, packages)
        if path is None:
            continue
        for imported in imported_names(path, name):
            todo.extend(n for n in _with_parents(imported) if n not in seen)
    return tuple(sorted({path.relative_to(root).as_posix() for path in seen.values() if path is not None}))


def code_digests(entries: Iterable[str], root: Path = ROOT) -> dict[str, str]:
    """``{relative path: sha256 hex}`` of ``source_files(entries, root)``."""
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in source_files(entries, root)}
