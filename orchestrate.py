#!/usr/bin/env python
"""Distill, sparsify, benchmark: the whole model-compression study, orchestrated by Ray.

Stages (one module each under ``stages/``; ``ARCHITECTURE.md`` draws the whole picture):
  1. teacher   ``stages.teacher``   - fine-tune a ResNet teacher (one Tune trial)
  2. students  ``stages.students``  - three setups (ce, kd, kd_feat) at once under Tune
  3. sparsify  ``stages.sparsify``  - best student -> SparseML recipe / structured thinning -> ONNX
  4. bench     ``stages.bench``     - DeepSparse / onnxruntime / OpenVINO on a CPU-only actor
  5. report    ``stages.report``    - executed report.ipynb -> HTML/PDF (``--report``)

This file holds only the command line and the start-up checks; ``stages.runner.run_study`` runs
the stages. The settings live in ``study.config``, the run directory's layout in ``study.layout``.

Usage: ``python orchestrate.py --preset smoke --data-root DIR`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
from pathlib import Path

from stages.bench import check_deepsparse_python
from stages.report import stage_report
from stages.runner import dry_run, run_study
from study import PRESETS, StudyConfig, StudyError, make_config
from study.noise import set_verbose
from study.requirements import (check_packages, check_python, required_packages, runs_deepsparse, sparsify_stages,
                                torch_note)


# ---------------------------------------------------------------------------------------------
# Command line


def _shown(value) -> str:
    """A default as the user would type it: ``ce,kd`` for a tuple, ``none`` for None."""
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def build_parser() -> argparse.ArgumentParser:
    """argparse parser: one option per StudyConfig field, declared by the field itself (its help
    text and parser in ``metadata``); the help shows each preset's default. Options the user does
    not give are absent from the parsed namespace (``argparse.SUPPRESS``), so the preset fills them
    and everything given, ``none``/``0``/``false`` included, wins."""
    presets = "\n".join(textwrap.fill(
        f"{name}: {', '.join(f'{k}={_shown(v)}' for k, v in values.items()) or 'the defaults above'}",
        width=100, initial_indent="  ", subsequent_indent="    ") for name, values in PRESETS.items())
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Presets (each sets these fields; every other field keeps the default above):\n" + presets,
        argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(StudyConfig):
        defaults = {p: _shown(PRESETS[p].get(f.name, f.default)) for p in PRESETS}
        shown = _shown(f.default) if len(set(defaults.values())) == 1 else \
            ", ".join(f"{p}: {v}" for p, v in defaults.items())
        text = f"{f.metadata['help']} (default: {shown})"
        flag = "--" + f.name.replace("_", "-")
        if f.metadata["parse"] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif f.metadata.get("append"):
            parser.add_argument(flag, type=f.metadata["parse"], action="append", help=text)
        elif f.metadata.get("const") is not None:
            parser.add_argument(flag, type=f.metadata["parse"], nargs="?", const=f.metadata["const"], help=text)
        else:
            parser.add_argument(flag, type=f.metadata["parse"], help=text)
    parser.add_argument("--overwrite", action="store_true", default=False,
                        help="start from nothing: remove the earlier run in --output-dir (default: keep it; "
                             "rerun only the stages whose inputs changed, and those after them)")
    parser.add_argument("--dry-run", action="store_true", default=False,
                        help="print for every stage whether it would be skipped, run or rerun, and why; "
                             "then exit without starting Ray")
    parser.add_argument("--report-only", action="store_true", default=False,
                        help="only (re)build the report of the run in --output-dir")
    return parser


def config_from_args(argv: list[str] | None = None) -> tuple[StudyConfig, argparse.Namespace]:
    """Parse ``argv`` into a validated StudyConfig (StudyError on bad values): the preset's
    values, then every option given on the command line. Without ``--data-root`` the data root is
    ``data`` and ``--download`` is on (unless ``--no-download``): the bare ``python orchestrate.py``
    fetches CIFAR-10 there when it holds no copy; a given ``--data-root`` is only read."""
    args = build_parser().parse_args(argv)
    fields = {f.name for f in dataclasses.fields(StudyConfig)} - {"preset"}
    overrides = {name: tuple(value) if isinstance(value, list) else value
                 for name, value in vars(args).items() if name in fields}
    if "data_root" not in overrides:
        overrides.setdefault("download", True)
    return make_config(getattr(args, "preset", "full"), **overrides), args


# ---------------------------------------------------------------------------------------------
# Start-up checks (Python and packages per stage: ``study.requirements``)


CPUINFO = Path("/proc/cpuinfo")


def check_avx2(cpuinfo: str | None = None) -> None:
    """StudyError unless the CPU has AVX2 (DeepSparse 1.7 needs AVX2, AVX-512 or NEON)."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return  # not Linux: let deepsparse decide
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    if "avx2" not in flags.split() and "asimd" not in flags.split():
        raise StudyError("this CPU has no AVX2; DeepSparse needs AVX2 or AVX-512: run with "
                         "--stop-after students, or on another machine")


# ---------------------------------------------------------------------------------------------
# Stages


def main(argv: list[str] | None = None) -> int:
    """Run the study; returns the process exit code (0 ok, 2 bad input or machine)."""
    try:
        config, args = config_from_args(argv)
        if args.dry_run:
            return dry_run(config, args.overwrite)
        set_verbose(config.verbose)  # before Ray starts: its workers inherit the choice
        sparsify = sparsify_stages(config.stop_after) and not args.report_only
        check_python(sparsify=sparsify)  # SparseML/DeepSparse only where those stages run
        check_packages(required_packages(config.stop_after if sparsify else "students"))
        note = torch_note()
        if note:
            print(note, flush=True)
        if args.report_only:
            return stage_report(config)
        if sparsify and runs_deepsparse(config.deepsparse_python):  # DeepSparse needs AVX2
            check_avx2()
        if config.deepsparse_python and config.stop_after == "bench":
            check_deepsparse_python(config.deepsparse_python)
        return run_study(config, args)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:  # leave the cluster now, not from an atexit hook while the interpreter shuts down
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()


if __name__ == "__main__":
    sys.exit(main())
