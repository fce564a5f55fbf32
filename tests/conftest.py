"""Shared pytest fixtures: the real CIFAR-10 images and the suite's whole-pipeline runs.

The pipeline's own tests launch ``orchestrate.py`` to train four times: the smoke run below (killed
once during its students stage, then run to its end: two launches), the seeds run below, and the
two-node run of ``test_cluster.py`` (students stage only). Every other test that needs a trained
state works on a copy of the smoke run (``helpers.copy_run``); the rerun tests
(``test_fingerprints.py``: the recipe only) and one ``--sweep`` run (``test_sweep.py``) train
a little more."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import study  # noqa: F401  (sets NM_DISABLE_ANALYTICS for the tests and their subprocesses)
from helpers import blocked_env, extract_image_subset, kill_orchestrate_when, run_orchestrate

REPO_ROOT = Path(__file__).resolve().parent.parent
CIFAR_TARBALL = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
CIFAR_SMALL_PER_CLASS = {"train": 30, "test": 20}


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """A small real CIFAR-10 image-folder tree: the first 30 train and 20 test JPEGs per class
    (in archive order) of ``<repo>/../shared/data/cifar10-jpg.tar.gz``, laid out as
    ``root/{train,test}/<class>/NNNN.jpg``; 300 train + 200 test images. Skips if the tarball
    is absent. Streams the archive once and writes only the chosen members (about 2 s)."""
    if not CIFAR_TARBALL.is_file():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR_TARBALL}: the tests that read real "
                    f"images need the shared cifar10-jpg.tar.gz next to the repository")
    return extract_image_subset(CIFAR_TARBALL, tmp_path_factory.mktemp("cifar10-small"),
                                CIFAR_SMALL_PER_CLASS)


@pytest.fixture(scope="session")
def smoke_run(cifar_root, tmp_path_factory) -> Path:
    """``python orchestrate.py --preset smoke`` on the small real CIFAR-10 tree (300 train / 200
    test images), once per session: SIGKILLed (driver and its local Ray) once a student trial has
    checkpointed its 2nd epoch (output in ``interrupted.log``), then the same command run to its end
    (``orchestrate.log``). Returns its output directory. Fails (does not skip) when the run exits
    non-zero, with the tail of its output. ``SMOKE_RUN_DIR=<dir>``: use that finished run of this
    fixture instead (to iterate on the tests that read it)."""
    if os.environ.get("SMOKE_RUN_DIR"):
        return Path(os.environ["SMOKE_RUN_DIR"])
    out = tmp_path_factory.mktemp("smoke-run")
    kill_orchestrate_when(out, cifar_root, lambda: any(out.glob("students/*/checkpoint_000001")))
    return run_orchestrate(out, cifar_root)


@pytest.fixture(scope="session")
def smoke_seeds_run(cifar_root, tmp_path_factory) -> Path:
    """``python orchestrate.py --preset smoke --seeds 2 --val-size 100 --tolerance 0.5 --stop-after
    students`` on the small real CIFAR-10 tree, once per session (six student trials, 200 training /
    100 validation / 200 test images; at this tolerance the stop rule fires at the earliest epoch it
    can, 3, below the bound 4, whatever the accuracies), with every import of SparseML, DeepSparse, SparseZoo, ONNX and
    onnxruntime failing in the driver and in Ray's workers (``helpers.blocked_env``): the training
    stages need none of them. Returns its output directory. Fails when the run exits non-zero."""
    out = tmp_path_factory.mktemp("smoke-seeds-run")
    return run_orchestrate(out, cifar_root, "--seeds", "2", "--val-size", "100", "--tolerance", "0.5",
                           "--stop-after", "students",
                           env=blocked_env(tmp_path_factory.mktemp("blocker")), timeout=1800)
