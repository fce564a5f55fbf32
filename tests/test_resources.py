"""The resource rule (``study.resources``) on given node lists: every request fits on one node.

No Ray here: nodes are written down as ``ray.nodes()`` would report them, GPUs included (logical
GPUs need no GPU). The two-node runs that prove the rule on a real cluster are in test_cluster.py.
"""

from __future__ import annotations

import pytest

from study import StudyError, make_config
from study.resources import (
    MIN_CPU_SHARE, Node, Request, bench_cores, bench_node, capacity, holds, nodes_from_ray, plan_resources,
    round_down, student_share, whole_node)
from driver.cluster import dashboard_line


def nodes(*sizes) -> list[Node]:
    """One Node per (cpus, gpus) pair, ids n0, n1, ..., the first one the head."""
    return [Node(f"n{i}", cpus, gpus, f"10.0.0.{i}", is_head=i == 0) for i, (cpus, gpus) in enumerate(sizes)]


TWO_CPU_NODES = nodes((2, 0), (2, 0))


def test_nodes_are_read_from_a_ray_nodes_listing():
    listing = [
        {"NodeID": "aa", "Alive": True, "NodeManagerAddress": "10.0.0.1",
         "Resources": {"CPU": 2.0, "memory": 1e9, "node:10.0.0.1": 1.0, "node:__internal_head__": 1.0}},
        {"NodeID": "bb", "Alive": True, "NodeManagerAddress": "10.0.0.2",
         "Resources": {"CPU": 8.0, "GPU": 1.0, "node:10.0.0.2": 1.0}},
        {"NodeID": "cc", "Alive": False, "NodeManagerAddress": "10.0.0.3", "Resources": {"CPU": 64.0}},
        {"NodeID": "dd", "Alive": True, "NodeManagerAddress": "10.0.0.4", "Resources": {}},
    ]
    assert nodes_from_ray(listing) == [Node("aa", 2.0, 0.0, "10.0.0.1", True), Node("bb", 8.0, 1.0, "10.0.0.2"),
                                       Node("dd", 0.0, 0.0, "10.0.0.4")]


def test_the_issue_case_two_2cpu_nodes():
    """Two nodes of 2 CPUs: the teacher asks for 2 CPUs (not the cluster's 4), the three students
    1 CPU each (not 4/3, of which each node holds only one), all three at once."""
    plan = plan_resources(make_config("smoke"), TWO_CPU_NODES, trials=3)
    assert plan.teacher == Request(2.0, 0.0) and plan.teacher.threads == 2
    assert (plan.student, plan.concurrent) == (Request(1.0, 0.0), 3)
    assert capacity(TWO_CPU_NODES, Request(4 / 3)) == 2  # what the old total-based share got
    assert plan.bench_node == TWO_CPU_NODES[0]  # head first among equals


@pytest.mark.parametrize("sizes, trials, expected, concurrent", [
    ([(2, 0)], 3, Request(0.6666), 3),                     # one 2-CPU machine: a third each, rounded down
    ([(4, 0)], 3, Request(1.3333), 3),
    ([(2, 0), (2, 0)], 3, Request(1.0), 3),
    ([(8, 0), (8, 0)], 3, Request(4.0), 3),                # 2 + 1 trials: 4 CPUs each, not 16/3
    ([(8, 0), (2, 0)], 3, Request(2.6666), 3),             # all three on the big node: 8/3 each
    ([(2, 0), (2, 0)], 9, Request(MIN_CPU_SHARE), 8),      # setups x seeds: 8 of 9 at once, one waits
    ([(1, 0)], 3, Request(0.5), 2),
    ([(0, 0), (2, 0), (2, 0)], 3, Request(1.0), 3),        # a head without CPUs holds nothing
])
def test_student_share_fits_all_trials_at_once_when_the_nodes_allow(sizes, trials, expected, concurrent):
    share, fit = student_share(nodes(*sizes), trials)
    assert (share, fit) == (expected, concurrent)
    assert capacity(nodes(*sizes), share) >= fit
    if fit == trials and share.cpu >= MIN_CPU_SHARE:  # no larger share would still fit them all
        assert capacity(nodes(*sizes), Request(share.cpu + 0.01)) < trials


@pytest.mark.parametrize("sizes, trials, expected", [
    ([(8, 1)], 3, Request(2.6666, 0.3333)),                 # one GPU: a third each
    ([(8, 1), (8, 1)], 3, Request(4.0, 0.5)),               # two GPUs: halves (2 + 1), never 2/3
    ([(4, 1), (64, 0)], 3, Request(1.3333, 0.3333)),        # students go where the GPU is
    ([(16, 2)], 3, Request(5.3333, 0.6666)),
    ([(16, 4)], 3, Request(5.3333, 1.0)),                   # at most one GPU per trial
    ([(2, 1), (2, 1)], 6, Request(0.6666, 0.3333)),
])
def test_student_gpu_fraction_fits_on_a_gpu_node(sizes, trials, expected):
    cluster = nodes(*sizes)
    share, fit = student_share(cluster, trials)
    assert (share, fit) == (expected, trials)
    # every trial's GPU fraction and CPUs sit on one GPU node, all trials at once
    assert sum(holds(n, share) for n in cluster if n.gpus > 0) >= trials
    assert all(holds(n, share) == 0 for n in cluster if n.gpus == 0)


def test_a_fraction_that_no_node_holds_is_never_chosen():
    """Two 1-GPU nodes and 3 trials: 2/3 of a GPU each (the cluster's 2 GPUs / 3) fits one trial
    per node, so only two would run; the rule picks 1/2."""
    cluster = nodes((8, 1), (8, 1))
    assert capacity(cluster, Request(1.0, round_down(2 / 3))) == 2
    assert student_share(cluster, 3)[0].gpu == 0.5


def test_fixed_shares_run_as_many_trials_as_fit():
    assert student_share(TWO_CPU_NODES, 3, cpus=1.5) == (Request(1.5, 0.0), 2)
    assert student_share(nodes((8, 1), (8, 1)), 3, gpus=0.75) == (Request(8.0, 0.75), 2)  # one per GPU
    assert student_share(nodes((8, 1)), 3, gpus=0.0) == (Request(2.6666, 0.0), 3)  # students on CPUs


@pytest.mark.parametrize("sizes, cpus, gpus, message", [
    ([(2, 0), (2, 0)], 3.0, None, "--cpus-per-trial 3: a student trial asks for {'CPU': 3.0}, more than any node "
     "of the Ray cluster has (largest node: {'CPU': 2.0, 'GPU': 0.0}; 2 node(s))"),
    ([(2, 0), (2, 0)], None, 1.0, "--gpus-per-trial 1: a student trial asks for {'GPU': 1.0}, more than any node "
     "of the Ray cluster has (largest node: {'CPU': 2.0, 'GPU': 0.0}, most GPUs on one node: 0; 2 node(s))"),
    ([(64, 0), (4, 1)], 8.0, 0.5, "--cpus-per-trial 8 --gpus-per-trial 0.5: a student trial asks for "
     "{'CPU': 8.0, 'GPU': 0.5}, more than any node of the Ray cluster has (largest node: "
     "{'CPU': 64.0, 'GPU': 0.0}, most GPUs on one node: 1; 2 node(s))"),
])
def test_an_impossible_student_request_is_one_line(sizes, cpus, gpus, message):
    with pytest.raises(StudyError) as info:
        student_share(nodes(*sizes), 3, cpus=cpus, gpus=gpus)
    assert str(info.value) == message


def test_teacher_and_sparsify_take_one_whole_node():
    assert whole_node(TWO_CPU_NODES) == (TWO_CPU_NODES[0], Request(2.0, 0.0))
    cluster = nodes((64, 0), (8, 2), (4, 1))
    assert whole_node(cluster) == (cluster[1], Request(8.0, 1.0))  # the GPU node, one GPU
    assert whole_node(TWO_CPU_NODES, cap=1.5)[1] == Request(1.5, 0.0)
    with pytest.raises(StudyError, match=r"^no node of the Ray cluster has a CPU \(1 node\(s\)\)$"):
        whole_node(nodes((0, 0)))
    # --cpus-per-trial caps the teacher at that share times the student trials
    plan = plan_resources(make_config("smoke", cpus_per_trial=0.5), TWO_CPU_NODES, trials=3)
    assert plan.teacher == Request(1.5, 0.0) and plan.teacher.threads == 1


def test_benchmark_runs_on_one_node_with_its_physical_cores():
    cluster = nodes((2, 0), (8, 0))
    assert bench_node(cluster) == cluster[1]
    assert bench_cores(cluster[1], physical_cores=4) == 4   # physical cores when Ray has as many CPUs
    assert bench_cores(cluster[0], physical_cores=16) == 2  # at most the node's Ray CPUs
    assert bench_node(cluster, cores=8) == cluster[1]
    with pytest.raises(StudyError) as info:
        plan_resources(make_config("smoke", bench_cores=3), TWO_CPU_NODES, trials=3)
    assert str(info.value) == ("--bench-cores 3: the benchmark actor asks for {'CPU': 3.0}, more than any node "
                               "of the Ray cluster has (largest node: {'CPU': 2.0, 'GPU': 0.0}; 2 node(s))")
    # no bench stage, no bench check
    assert plan_resources(make_config("smoke", bench_cores=3, stop_after="students"), TWO_CPU_NODES,
                          trials=3).bench_node is None


def test_shares_are_whole_ray_units():
    """Ray counts in units of 1e-4: 3 x 0.6667 = 2.0001 CPUs would not fit on 2; 0.6666 does."""
    assert round_down(2 / 3) == 0.6666 and round_down(1.0) == 1.0 and round_down(3 * (2 / 3) - 1e-12) == 2.0
    assert holds(Node("a", 2.0), Request(0.6667)) == 2 and holds(Node("a", 2.0), Request(0.6666)) == 3


@pytest.mark.parametrize("overrides, message", [
    ({"cpus_per_trial": 0.0}, "--cpus-per-trial 0.0 must be > 0 (or 'none')"),
    ({"gpus_per_trial": 1.5}, "--gpus-per-trial 1.5 must be a fraction 0..1 or a whole number (Ray's rule)"),
    ({"bench_cores": 0}, "--bench-cores 0 must be >= 1 (or 'none')"),
    ({"output_dir": "s3://bucket/run"}, "--output-dir s3://bucket/run: URIs are not supported (the sparsify "
     "and bench stages write plain files); use a folder on a filesystem every node mounts"),
])
def test_resource_flags_are_checked_up_front(overrides, message):
    with pytest.raises(StudyError) as info:
        make_config("smoke", **overrides)
    assert str(info.value) == message


def test_the_dashboard_line_states_the_truth():
    assert dashboard_line(None, True, "127.0.0.1:8265") == "Ray dashboard: http://127.0.0.1:8265"
    assert dashboard_line("10.0.0.1:6379", True, "10.0.0.1:8265") == "Ray dashboard: http://10.0.0.1:8265"
    assert dashboard_line("10.0.0.1:6379", True, "") == \
        "Ray dashboard: none (the Ray cluster at --address 10.0.0.1:6379 runs no dashboard)"
    assert dashboard_line("10.0.0.1:6379", False, None).startswith("Ray dashboard: none (the Ray cluster")
    assert dashboard_line(None, False, None) == "Ray dashboard: off (--no-dashboard)"
    assert dashboard_line(None, True, None).startswith("Ray dashboard: none (it did not start")
