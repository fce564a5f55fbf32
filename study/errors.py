"""One line of what an exception says, for the one-line error messages of every layer."""

from __future__ import annotations

import re


def error_line(exc: BaseException, *, typed: bool = False, whole: bool = False) -> str:
    """``exc``'s message as one line: its first line, stripped (``""`` when it has none).

    ``whole``: every line of the message, each run of whitespace squeezed into one space.
    ``typed``: prefixed with the exception's type, ``"ValueError: first line"`` (just
    ``"ValueError"`` when the message is empty). For a Ray error pass its ``cause`` to name the
    innermost exception.
    """
    text = str(exc)
    line = re.sub(r"\s+", " ", text).strip() if whole else next(iter(text.strip().splitlines()), "")
    if typed:
        return f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line
