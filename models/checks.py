"""Argument checks shared by the model builders and the checkpoint format: one-line ValueErrors
that name the value and what is allowed."""

from __future__ import annotations

from typing import Any

from study import ARCHS, STEMS
from study.errors import error_line

#: Roles a checkpoint can hold (decides the builder used on load).
ROLES = ("teacher", "student")


def check_arch(arch: Any) -> str:
    """``arch`` if it is one of ``ARCHS``; ValueError naming it and the allowed ones otherwise."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(ARCHS)}")
    return arch


def check_stem(stem: Any) -> str:
    """``stem`` if it is one of ``STEMS``; ValueError naming it and the allowed ones otherwise."""
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; allowed: {', '.join(STEMS)}")
    return stem


def check_num_classes(num_classes: Any) -> int:
    """``num_classes`` if it is an int >= 1 (not a bool); ValueError otherwise."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def check_role(role: Any) -> str:
    """``role`` if it is one of ``ROLES``; ValueError otherwise."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; allowed: {', '.join(ROLES)}")
    return role


def first_line(exc: BaseException) -> str:
    """``"ExceptionType: first line of its message"``, for one-line error messages
    (``study.errors.error_line``)."""
    return error_line(exc, typed=True)
