"""Multi-node Ray: every request fits on one node, impossible requests fail fast, a resumed run
gets this cluster's resources. Proven on two real Ray nodes (``conftest.two_nodes``). The rule
itself is unit-tested on given node lists in test_resources.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from helpers import NODE_CPUS, SMOKE
from study import StudyError

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# A resumed experiment: resources and threads of the cluster it resumes on (one local Ray at a
# time, before the two-node cluster starts).

RESUME_SCRIPT = '''
import os, sys, tempfile, time
import ray
from ray import tune
from study import make_config
from driver.tuning import run_tuner, trial_config, trial_resources

def probe(config):
    """A stand-in trainable: one 'epoch' per second, reporting the threads and CPUs it was given."""
    start = 0
    if tune.get_checkpoint():
        with tune.get_checkpoint().as_directory() as folder:
            start = int(open(os.path.join(folder, "epoch")).read())
    for epoch in range(start + 1, config["max_epochs"] + 1):
        time.sleep(1.0)
        with tempfile.TemporaryDirectory() as folder:
            open(os.path.join(folder, "epoch"), "w").write(str(epoch))
            tune.report({"test_acc": 0.1 * epoch, "threads": config["threads"],
                         "cpu": ray.get_runtime_context().get_assigned_resources().get("CPU")},
                        checkpoint=tune.Checkpoint.from_directory(folder))

ray.init(address="local", num_cpus=int(sys.argv[2]), include_dashboard=False)
config = make_config("smoke", output_dir=sys.argv[1], setups=("ce", "kd"), max_epochs=6)
resources = trial_resources(config, "student")
space = {**trial_config(config, "student", resources), "setup": tune.grid_search(list(config.setups))}
run_tuner(config, "students", probe, space, resources, config.max_epochs)
'''


def test_a_resumed_run_gets_the_resources_of_its_new_cluster(tmp_path):
    """Started on a 4-CPU Ray (2 trials: 2 CPUs and 2 threads each), killed after two epochs,
    resumed on a 2-CPU Ray: the resumed epochs run with 1 CPU and 1 thread, from the checkpoint."""
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    out = tmp_path / "run"
    log = open(tmp_path / "resume.log", "a")
    first = subprocess.Popen([sys.executable, str(script), str(out), "4"], cwd=REPO_ROOT, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while len(list(out.glob("students/*/checkpoint_000001"))) < 2:
        assert first.poll() is None and time.time() < deadline, (tmp_path / "resume.log").read_text()[-3000:]
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and its local Ray
    first.wait()
    second = subprocess.run([sys.executable, str(script), str(out), "2"], cwd=REPO_ROOT, stdout=log,
                            stderr=subprocess.STDOUT, timeout=300)
    assert second.returncode == 0, (tmp_path / "resume.log").read_text()[-3000:]
    results = sorted(out.glob("students/*/result.json"))
    assert len(results) == 2
    for result in results:
        rows = [json.loads(line) for line in result.read_text().splitlines()]
        by_epoch = {row["training_iteration"]: (row["threads"], row["cpu"]) for row in rows}
        assert sorted(by_epoch) == [1, 2, 3, 4, 5, 6]
        assert by_epoch[1] == (2, 2.0) and by_epoch[6] == (1, 1.0)
        assert rows[-1]["config"]["threads"] == 1


# ---------------------------------------------------------------------------------------------
# On two Ray nodes of NODE_CPUS logical CPUs each (conftest.two_nodes).


def orchestrate(cifar_root, out, *args, timeout=1500):
    """``python orchestrate.py --preset smoke`` on the small real CIFAR-10 tree; (process, seconds)."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "orchestrate.py"), *SMOKE, "--data-root", str(cifar_root),
         "--output-dir", str(out), *map(str, args)],
        cwd=REPO_ROOT, env=dict(os.environ, RAY_DEDUP_LOGS="0"), capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - started


@pytest.mark.parametrize("flags, request_, largest", [
    (("--cpus-per-trial", "3"), "--cpus-per-trial 3: a student trial asks for {'CPU': 3.0}",
     "(largest node: {'CPU': 2.0, 'GPU': 0.0}; 2 node(s))"),
    (("--gpus-per-trial", "1"), "--gpus-per-trial 1: a student trial asks for {'GPU': 1.0}",
     "(largest node: {'CPU': 2.0, 'GPU': 0.0}, most GPUs on one node: 0; 2 node(s))"),
])
def test_an_impossible_request_fails_before_any_training(two_nodes, cifar_root, tmp_path, flags, request_, largest):
    out = tmp_path / "run"
    proc, seconds = orchestrate(cifar_root, out, "--address", two_nodes.address, *flags, timeout=300)
    print(f"{' '.join(flags)}: exit {proc.returncode} after {seconds:.1f} s")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]  # after Ray's own log
    assert errors == [f"error: {request_}, more than any node of the Ray cluster has {largest}"]
    assert not out.exists()  # nothing written, no trial started


def test_a_local_run_starts_its_own_ray_and_auto_joins(two_nodes, monkeypatch):
    import ray

    from driver.cluster import cluster_nodes, connect

    monkeypatch.setenv("RAY_ADDRESS", two_nodes.address)  # even where the environment names a cluster
    try:
        assert connect(None, dashboard=False) == "Ray dashboard: off (--no-dashboard)"
        assert len(cluster_nodes()) == 1
        assert ray.get_runtime_context().gcs_address != two_nodes.address
    finally:
        ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS")
    try:  # 'auto': the cluster whose address file is in this RAY_TMPDIR
        assert connect("auto", dashboard=True) == \
            "Ray dashboard: none (the Ray cluster at --address auto runs no dashboard)"
        assert len(cluster_nodes()) == 2 and ray.get_runtime_context().gcs_address == two_nodes.address
    finally:
        ray.shutdown()


def test_the_output_dir_is_probed_on_every_node(two_nodes, tmp_path):
    import ray

    from driver.cluster import check_shared_storage, cluster_nodes

    ray.init(address=two_nodes.address)
    try:
        nodes = cluster_nodes()
        assert [n.cpus for n in nodes] == [NODE_CPUS, NODE_CPUS]
        check_shared_storage(tmp_path, nodes)  # both nodes see this machine's filesystem
        assert list(tmp_path.iterdir()) == []  # the probe files are gone
        with pytest.raises(StudyError) as info:
            check_shared_storage(tmp_path / "missing", nodes)
        assert str(info.value).startswith(f"--output-dir {tmp_path / 'missing'} is not writable on node ")
        assert "(No such file or directory); with --address it must be a folder on storage that every node " \
               "mounts at the same path" in str(info.value)
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------------------------
# The smoke preset's training stages on two nodes, one epoch each, through --address, no resource
# flags. (The sparsify and bench stages on two nodes: the story of test_fingerprints.py.)

TRAINED = ("teacher", "ce", "kd", "kd_feat")


@pytest.fixture(scope="module")
def two_node_run(two_nodes, cifar_root, tmp_path_factory) -> Path:
    """``--preset smoke --address CLUSTER --teacher-max-epochs 1 --max-epochs 1 --stop-after
    students``: the teacher and the three students trained on the two nodes, one epoch each (what is
    checked is where and with what they ran; that a resumed trial ends as one never killed is
    ``test_faults.test_a_killed_trial_finishes_from_its_checkpoint_with_the_results_of_a_trial_never_killed``)."""
    out = tmp_path_factory.mktemp("two-node-run")
    proc, seconds = orchestrate(cifar_root, out, "--address", two_nodes.address, "--teacher-max-epochs", "1",
                                "--max-epochs", "1", "--stop-after", "students")
    (out / "orchestrate.log").write_text(proc.stdout + proc.stderr + f"\nwall time: {seconds:.0f} s\n")
    print(f"two-node students run: {seconds:.0f} s")
    assert proc.returncode == 0, f"two-node run failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}"
    return out


def test_two_node_smoke_run_trains_every_model_at_once(two_node_run):
    table = pd.read_csv(two_node_run / "results.csv")
    assert list(table["model"]) == list(TRAINED)
    students = table.set_index("model").loc[["ce", "kd", "kd_feat"]]
    assert students["started_at"].max() < students["finished_at"].min()  # all three at once
    log = (two_node_run / "orchestrate.log").read_text()
    assert "Ray dashboard: none (the Ray cluster at --address " in log
    assert "[resources] 2 node(s), largest {'CPU': 2.0, 'GPU': 0.0}; teacher and sparsify {'CPU': 2.0, " \
           "'GPU': 0.0}" in log and "each of 3 student trials {'CPU': 1.0, 'GPU': 0.0} (3 at once)" in log
    assert not (two_node_run / "onnx").exists()


def test_two_node_requests_were_sized_by_node(two_node_run):
    """The teacher asked for one node's 2 CPUs (not the cluster's 4), each student for 1 CPU (so
    the three ran at once, spread over both nodes); threads follow. (The benchmark's one node:
    the story of ``test_fingerprints.py``, whose rerun goes through such a cluster.)"""
    from ray import tune

    teacher = tune.ExperimentAnalysis(str(two_node_run / "teacher"))
    students = tune.ExperimentAnalysis(str(two_node_run / "students"))
    assert [t.placement_group_factory.required_resources for t in teacher.trials] == [{"CPU": 2.0}]
    assert [t.placement_group_factory.required_resources for t in students.trials] == [{"CPU": 1.0}] * 3
    assert [c["threads"] for c in teacher.get_all_configs().values()] == [2]
    assert [c["threads"] for c in students.get_all_configs().values()] == [1, 1, 1]
