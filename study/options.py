"""How a StudyConfig field is declared (``option``: default, help text, CLI parser) and the CLI
parsers its fields use besides the plain types (``optional_str``, ``optional_number``, ``csv_of``).

``orchestrate.build_parser`` turns each field's ``metadata`` into one option; ``study.config``
re-exports every name.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any, Callable


def optional_str(text: str) -> str | None:
    """CLI parser: ``none`` (any case) or an empty string -> None, else the text."""
    return None if text.lower() in ("none", "") else text


def optional_number(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """CLI parser for an int/float field that may be ``none`` (= decide from the cluster)."""
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = f"optional {kind.__name__}"
    return parse


def csv_of(kind: Callable[[str], Any]) -> Callable[[str], tuple]:
    """CLI parser for a comma-separated list: ``"1,32"`` -> ``(1, 32)``; ValueError (argparse's
    "invalid ... value") for a text with no value, e.g. ``""``."""
    def parse(text: str) -> tuple:
        values = tuple(kind(part) for part in text.split(",") if part.strip())
        if not values:  # an empty list given on purpose would silently mean "not given"
            raise ValueError(f"no value in {text!r}")
        return values
    parse.__name__ = f"comma-separated {kind.__name__}"
    return parse


def option(default: Any, help: str, parse: Callable[[str], Any], append: bool = False,
           const: Any = None) -> Any:
    """A StudyConfig field: its default (the ``full`` preset's), help text and CLI parser
    (``bool`` makes a ``--flag/--no-flag`` pair; ``append``: a repeatable option, its values
    collected in order, argparse ``action="append"``; ``const``: the value of the flag given
    alone, argparse ``nargs="?"``)."""
    return field(default=default, metadata={"help": help, "parse": parse, "append": append, "const": const})
