"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

import study  # noqa: F401  (sets NM_DISABLE_ANALYTICS for the tests and their subprocesses)
from helpers import extract_image_subset, run_orchestrate

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
    """Run ``python orchestrate.py --preset smoke`` end to end on the small real CIFAR-10 tree
    (300 train / 200 test images) once per session; returns its output directory.

    Fails (does not skip) when the run exits non-zero, with the tail of its output."""
    return run_orchestrate(tmp_path_factory.mktemp("smoke-run"), cifar_root)


@pytest.fixture(scope="session")
def smoke_seeds_run(cifar_root, tmp_path_factory) -> Path:
    """``python orchestrate.py --preset smoke --seeds 2 --val-size 100 --stop-after students`` on
    the small real CIFAR-10 tree, once per session (six student trials, 200 training / 100
    validation / 200 test images); returns its output directory. Fails when the run exits non-zero."""
    return run_orchestrate(tmp_path_factory.mktemp("smoke-seeds-run"), cifar_root, "--seeds", "2",
                           "--val-size", "100", "--stop-after", "students", timeout=1800)
