"""Library output that is known to be harmless, silenced at its source unless ``--verbose``.

A run prints one line per epoch of every trial, one per recipe epoch, one per benchmark and the
tables at the end. The libraries would print much more (about 330 lines for a 5-minute smoke
run); what is silenced, and why, is listed here (loggers) and in ``trainables.compress.export.quiet_export``
(the ONNX export's warnings). ``--verbose`` brings all of it back.

``set_verbose`` records the choice in the environment variable ``DISTILL_SPARSIFY_VERBOSE``
before Ray starts: Ray's local workers inherit the driver's environment (a remote cluster gets it
through the job's ``runtime_env``), so ``verbose()`` answers the same in every process of a run.
Importing ``study`` calls ``quiet_loggers()`` once in each process.
"""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "DISTILL_SPARSIFY_VERBOSE"

#: Logger -> (level it is held at unless verbose, what it would print and why that is harmless).
QUIET_LOGGERS: dict[str, tuple[int, str]] = {
    "ray.train._internal.storage": (
        logging.WARNING, "'Checkpoint successfully created at: <path>' after every epoch of every "
        "trial (in the worker); the epoch's progress line already says it finished"),
    "ray.tune.tune": (
        logging.WARNING, "'Wrote the latest version of all result files and experiment state to "
        "<path>' at the end of every Tune experiment; the path is the --output-dir"),
    "deepsparse.benchmark.ort_engine": (
        logging.ERROR, "'Using ORTEngine with providers [AzureExecutionProvider, "
        "CPUExecutionProvider] may not respect num_cores', twice per run: ORTEngine sets "
        "intra_op_num_threads=num_cores, and the Azure provider (remote inference) runs no node of "
        "a local model, so the core count holds"),
    "nncf": (
        logging.WARNING, "'NNCF initialized successfully. Supported frameworks detected: ...' once per PTQ "
        "(NNCF sets its own level when imported, so trainables/compress/ptq.py also filters the logger; its "
        "two rich progress bars still show)"),
}


def verbose() -> bool:
    """True when this run was started with ``--verbose`` (``DISTILL_SPARSIFY_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_loggers() -> None:
    """Hold each logger of ``QUIET_LOGGERS`` at its level, or release it (level NOTSET: the
    library's own setting) when ``verbose()``."""
    for name, (level, _why) in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(logging.NOTSET if verbose() else level)


def set_verbose(on: bool) -> None:
    """Record ``--verbose`` for this process and the Ray workers it starts later, and apply it
    to this process's loggers."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"
    if not on:
        # Ray Tune's new console output (the 2.x default) prints an experiment table, the result
        # folder and a TensorBoard hint into Ray's temp dir even at verbose=0; its legacy output,
        # chosen by this documented variable, prints nothing at verbose=0 (read in the driver).
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        # Tune snapshots its experiment state after every checkpoint when CheckpointConfig
        # (num_to_keep=1) may delete one, and warns (3 lines) when snapshots come less than 5 s
        # apart, as they do with three trials; a snapshot is a few small local JSON files.
        os.environ["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] = "0"
    quiet_loggers()
