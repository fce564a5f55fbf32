"""Shared pytest fixtures: the real CIFAR-10 images, the suite's whole-pipeline runs and a two-node
Ray cluster.

The pipeline's own tests launch ``orchestrate.py`` to train three times: the smoke run and the
seeds-and-sweep run below (killed once during its students stage, then run to its end), and the
two-node run of ``test_cluster.py`` (students stage only, one epoch each). Every other test that
needs a trained state works on a copy of the smoke run (``helpers.copy_run``); the rerun tests
(``test_fingerprints.py``, ``test_sparsities.py``: the recipe and thinning only) train a little
more."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

import study  # noqa: F401  (sets NM_DISABLE_ANALYTICS for the tests and their subprocesses)
from helpers import NODE_CPUS, blocked_env, extract_image_subset, kill_orchestrate_when, run_orchestrate

REPO_ROOT = Path(__file__).resolve().parent.parent
CIFAR_TARBALL = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
CIFAR_SMALL_PER_CLASS = {"train": 15, "test": 10}


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """A small real CIFAR-10 image-folder tree: the first 15 train and 10 test JPEGs per class
    (in archive order) of ``<repo>/../shared/data/cifar10-jpg.tar.gz``, laid out as
    ``root/{train,test}/<class>/NNNN.jpg``; 150 train + 100 test images (``helpers.SMOKE``). Skips if the tarball
    is absent. Streams the archive once and writes only the chosen members (about 2 s)."""
    if not CIFAR_TARBALL.is_file():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR_TARBALL}: the tests that read real "
                    f"images need the shared cifar10-jpg.tar.gz next to the repository")
    return extract_image_subset(CIFAR_TARBALL, tmp_path_factory.mktemp("cifar10-small"),
                                CIFAR_SMALL_PER_CLASS)


@pytest.fixture(scope="session")
def smoke_run(cifar_root, tmp_path_factory) -> Path:
    """``python orchestrate.py --preset smoke`` on the small real CIFAR-10 tree (``helpers.SMOKE``:
    150 train / 100 test images), once per session, output in ``orchestrate.log``. Returns its
    output directory. Fails (does not skip) when the run exits non-zero, with the tail of its output.
    ``SMOKE_RUN_DIR=<dir>``: use that finished run of this fixture instead (to iterate on the tests
    that read it). (A run killed during its students stage and resumed: ``sweep_seeds_run``.)"""
    if os.environ.get("SMOKE_RUN_DIR"):
        return Path(os.environ["SMOKE_RUN_DIR"])
    return run_orchestrate(tmp_path_factory.mktemp("smoke-run"), cifar_root)


#: The seeds-and-sweep run (``sweep_seeds_run``): four kd_feat trials (two temperatures x two
#: seeds), 100 training / 50 validation / 50 test images (validation accuracy decides here); at
#: tolerance 0.5 the stop rule fires at the earliest epoch it can, 3, below the smoke bound 4,
#: whatever the accuracies.
SWEEP_SEEDS = ("--setups", "kd_feat", "--sweep", "temperature=2,8", "--seeds", "2", "--val-size", "50",
               "--tolerance", "0.5", "--teacher-max-epochs", "1", "--test-subset", "50", "--stop-after", "students")


@pytest.fixture(scope="session")
def sweep_seeds_run(cifar_root, tmp_path_factory) -> Path:
    """``python orchestrate.py SMOKE... SWEEP_SEEDS...`` on the small real CIFAR-10 tree, once per
    session, with every import of SparseML, DeepSparse, SparseZoo, ONNX and onnxruntime failing in
    the driver and in Ray's workers (``helpers.blocked_env``: the training stages need none of
    them): SIGKILLed once the students' experiment state records a trial's 1st-epoch checkpoint
    (``interrupted.log``), then the same command run to its end (``orchestrate.log``). Returns its
    output directory; fails when the run exits non-zero. ``SEEDS_RUN_DIR=<dir>``: use that finished
    run of this fixture instead."""
    if os.environ.get("SEEDS_RUN_DIR"):
        return Path(os.environ["SEEDS_RUN_DIR"])
    out = tmp_path_factory.mktemp("sweep-seeds-run")
    env = blocked_env(tmp_path_factory.mktemp("blocker"))

    def checkpointed():  # Tune restores from a checkpoint once its experiment state records it
        return any("checkpoint_000000" in path.read_text(errors="ignore")
                   for path in out.glob("students/experiment_state-*.json"))

    kill_orchestrate_when(out, cifar_root, checkpointed, *SWEEP_SEEDS, env=env)
    return run_orchestrate(out, cifar_root, *SWEEP_SEEDS, env=env, timeout=1800)


@pytest.fixture(scope="module")
def two_nodes():
    """A running two-node Ray cluster (``ray.cluster_utils.Cluster``: a head and one more node,
    ``NODE_CPUS`` logical CPUs each, no dashboard), one per test module that asks for it. Its session
    files and address file (``ray_current_cluster``) go to a fresh ``RAY_TMPDIR``, so no other
    driver on the machine finds it through ``ray.init()`` or ``address="auto"``; it is shut down (its
    own processes, never ``ray stop``) after the module."""
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_TMPDIR", tmp)
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": NODE_CPUS, "include_dashboard": False, "object_store_memory": 300 * 2**20})
        cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=300 * 2**20)
        cluster.wait_for_nodes()
        assert not Path("/tmp/ray/ray_current_cluster").is_file() or \
            Path("/tmp/ray/ray_current_cluster").read_text() != cluster.address
        yield cluster
    finally:
        if cluster is not None:
            cluster.shutdown()
        patch.undo()
        shutil.rmtree(tmp, ignore_errors=True)
