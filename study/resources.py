"""How much of a Ray cluster each request of the study asks for, decided node by node. Pure.

Ray places a task, an actor or a Tune trial (one placement-group bundle) on a single node, so a
request is sized from the nodes (``Node``: one alive Ray node's logical CPUs and GPUs, as
``ray.nodes()`` reports them; ``driver.cluster.cluster_nodes`` reads them), never from the
cluster's totals: on two 2-CPU nodes a 4-CPU request waits forever. The rule (docs/clusters.md):

* teacher trial and sparsify task (``whole_node``): all CPUs of one node, plus one GPU when that
  node has one; the node is the GPU node with the most CPUs when any node has a GPU, else the node
  with the most CPUs. With ``--cpus-per-trial`` at most that share times the student trials.
* student trials (``student_share``): the largest share with which all ``trials`` run at once on
  the nodes (bin-packed node by node, so spread across nodes), a GPU fraction each when any node
  has a GPU; CPU shares no smaller than ``MIN_CPU_SHARE``. When the nodes cannot hold all trials
  at that, as many as fit run at once and the rest wait their turn.
* benchmark actor (``bench_node``, ``bench_cores``): a fixed core count on one node, the node with
  the most CPUs; by default its physical cores, at most its Ray CPUs.

A request that no node can hold raises ``StudyError``, one line naming the request and the largest
node. Shares are rounded down to Ray's resource unit (1e-4) so that ``k`` of them add up to no more
than the node holds (Ray stores quantities as integer multiples of 1e-4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

from study.config import StudyConfig, StudyError

#: Ray's resource quantum: quantities are stored as integer multiples of it.
RESOURCE_UNIT = 1e-4
#: Smallest default CPU share of a student trial (two trials per logical CPU): below it, trials only
#: time-slice the same cores while each holds a model and the data in memory.
MIN_CPU_SHARE = 0.5


def _units(quantity: float) -> int:
    """``quantity`` in Ray's integer resource units (1e-4), rounded to the nearest unit."""
    return int(round(quantity / RESOURCE_UNIT))


def round_down(quantity: float) -> float:
    """``quantity`` rounded down to Ray's resource unit (e.g. 2/3 -> 0.6666)."""
    return round(math.floor(round(quantity / RESOURCE_UNIT, 6)) * RESOURCE_UNIT, 4)


@dataclass(frozen=True)
class Node:
    """One alive Ray node: logical ``cpus`` and ``gpus`` (Ray resource units), its id and IP."""

    node_id: str
    cpus: float
    gpus: float = 0.0
    address: str = ""
    is_head: bool = False

    @property
    def resources(self) -> str:
        """``{'CPU': 2.0, 'GPU': 0.0}``, as Ray writes resource dicts."""
        return str({"CPU": float(self.cpus), "GPU": float(self.gpus)})

    @property
    def name(self) -> str:
        """``127.0.0.1 (node 1a2b3c4d)``: for messages."""
        return f"{self.address or '?'} (node {self.node_id[:8]})"


@dataclass(frozen=True)
class Request:
    """What one trial, task or actor asks Ray for: ``cpu`` and ``gpu`` (fractions allowed)."""

    cpu: float
    gpu: float = 0.0

    @property
    def threads(self) -> int:
        """torch intra-op threads for this share: its whole CPUs, at least 1 (Ray's
        OMP_NUM_THREADS rule)."""
        return max(1, math.floor(self.cpu + 1e-9))

    def tune(self) -> dict:
        """As ``tune.with_resources`` takes it: ``{"cpu": ..., "gpu": ...}``."""
        return {"cpu": self.cpu, "gpu": self.gpu}

    def __str__(self) -> str:
        return str({"CPU": float(self.cpu), "GPU": float(self.gpu)})


def nodes_from_ray(entries: Iterable[dict]) -> list[Node]:
    """The alive nodes of a ``ray.nodes()`` listing (dicts with ``Alive``, ``NodeID``,
    ``NodeManagerAddress`` and ``Resources``: ``CPU``, ``GPU``, ``node:__internal_head__``)."""
    return [Node(node_id=e["NodeID"], cpus=float(e.get("Resources", {}).get("CPU", 0.0)),
                 gpus=float(e.get("Resources", {}).get("GPU", 0.0)),
                 address=e.get("NodeManagerAddress", ""),
                 is_head="node:__internal_head__" in e.get("Resources", {}))
            for e in entries if e.get("Alive")]


def largest_node(nodes: list[Node]) -> Node:
    """The node with the most CPUs (then GPUs; the head first on a tie). StudyError if none."""
    if not nodes:
        raise StudyError("the Ray cluster has no alive node")
    return max(nodes, key=lambda n: (n.cpus, n.gpus, n.is_head))


def holds(node: Node, request: Request) -> int:
    """How many copies of ``request`` fit on ``node`` at once (integer resource units, as Ray
    counts them); 0 for a request of nothing."""
    counts = [_units(have) // _units(want)
              for have, want in ((node.cpus, request.cpu), (node.gpus, request.gpu)) if _units(want) > 0]
    return min(counts) if counts else 0


def capacity(nodes: list[Node], request: Request) -> int:
    """How many copies of ``request`` the nodes hold at once, each on one node."""
    return sum(holds(node, request) for node in nodes)


def _too_big(what: str, request: str, nodes: list[Node], gpu: bool) -> StudyError:
    largest = largest_node(nodes)
    note = f", most GPUs on one node: {max(n.gpus for n in nodes):g}" if gpu else ""
    return StudyError(f"{what} asks for {request}, more than any node of the Ray cluster has "
                      f"(largest node: {largest.resources}{note}; {len(nodes)} node(s))")


def whole_node(nodes: list[Node], cap: Optional[float] = None) -> tuple[Node, Request]:
    """The teacher trial's and the sparsify task's request: all CPUs of one node (at most ``cap``)
    and one GPU when it has one; the GPU node with the most CPUs when any node has a GPU, else the
    node with the most CPUs. Returns ``(node, request)``; StudyError when no node has a CPU."""
    with_cpus = [n for n in nodes if _units(n.cpus) > 0]
    if not with_cpus:
        raise StudyError(f"no node of the Ray cluster has a CPU ({len(nodes)} node(s))")
    node = largest_node([n for n in with_cpus if n.gpus > 0] or with_cpus)
    cpus = node.cpus if cap is None else min(cap, node.cpus)
    return node, Request(round_down(cpus), float(min(1.0, node.gpus)))


def student_share(nodes: list[Node], trials: int, cpus: Optional[float] = None,
                  gpus: Optional[float] = None) -> tuple[Request, int]:
    """Each student trial's request and how many of the ``trials`` run at once.

    ``cpus``/``gpus`` (``--cpus-per-trial``/``--gpus-per-trial``) fix that part of the request;
    what is left ``None`` is chosen: the largest GPU fraction (at most 1) and then the largest CPU
    share (at least ``MIN_CPU_SHARE``, or the largest node's CPUs if smaller) with which all
    ``trials`` fit on the nodes at once; when no choice fits them all, the one that fits the most.
    A GPU fraction is chosen only when some node has a GPU; a trial with one runs on a GPU node.

    Raises:
        ValueError: ``trials`` < 1.
        StudyError: a fixed ``cpus``/``gpus`` that no node can hold (one line naming the request
            and the largest node).
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if gpus is not None:
        gpu_options = [gpus]
    elif any(_units(n.gpus) > 0 for n in nodes):
        gpu_options = sorted({min(1.0, round_down(n.gpus / k)) for n in nodes if _units(n.gpus) > 0
                              for k in range(1, trials + 1)} - {0.0}, reverse=True)
    else:
        gpu_options = [0.0]
    if cpus is not None:
        cpu_options = [cpus]
    else:
        floor = round_down(min(MIN_CPU_SHARE, max((n.cpus for n in nodes), default=0.0)))
        shares = {round_down(n.cpus / k) for n in nodes for k in range(1, trials + 1)}
        cpu_options = sorted(({c for c in shares if c >= floor} | {floor}) - {0.0}, reverse=True)
    best: tuple = (0, 0.0, 0.0)
    for gpu in gpu_options:
        for cpu in cpu_options:
            fit = min(trials, capacity(nodes, Request(cpu, gpu)))
            best = max(best, (fit, gpu, cpu))
            if fit == trials:  # cpu_options descend: this is the largest share that fits all
                break
    fit, gpu, cpu = best
    if fit == 0:
        asked = {key: float(value) for key, value in (("CPU", cpus), ("GPU", gpus)) if value is not None}
        flags = " ".join(f"--{key.lower()}s-per-trial {value:g}" for key, value in asked.items())
        raise _too_big(f"{flags or 'the default share'}: a student trial", str(asked), nodes, gpu=bool(gpus))
    return Request(cpu, gpu), fit


def bench_node(nodes: list[Node], cores: Optional[int] = None) -> Node:
    """The node of the benchmark actor: the one with the most CPUs (``cores`` of them at least,
    when ``--bench-cores`` fixes them). StudyError when no node has that many (or one) CPUs."""
    fitting = [n for n in nodes if _units(n.cpus) >= _units(cores or 1)]
    if not fitting:
        raise _too_big(f"--bench-cores {cores}: the benchmark actor" if cores else "the benchmark actor",
                       str({"CPU": float(cores or 1)}), nodes, gpu=False)
    return largest_node(fitting)


def bench_cores(node: Node, physical_cores: int) -> int:
    """The benchmark's default core count on ``node``: its physical cores (as DeepSparse counts
    them there), at most its Ray CPUs, at least 1."""
    return max(1, min(int(physical_cores), math.floor(node.cpus + 1e-9)))


@dataclass(frozen=True)
class ResourcePlan:
    """Every request of one run, sized for ``nodes`` (see the module docstring)."""

    nodes: tuple[Node, ...]
    teacher_node: Node
    teacher: Request          # also the sparsify task's request
    student: Request
    trials: int               # student trials in the grid
    concurrent: int           # of which run at once
    bench_node: Optional[Node]  # None when the bench stage does not run

    def describe(self) -> str:
        """One line for the log: nodes, and what each stage asks for."""
        line = (f"[resources] {len(self.nodes)} node(s), largest {largest_node(list(self.nodes)).resources}; "
                f"teacher and sparsify {self.teacher} on {self.teacher_node.name}; each of {self.trials} "
                f"student trials {self.student} ({self.concurrent} at once)")
        return line + (f"; benchmark on {self.bench_node.name}" if self.bench_node else "")


def plan_resources(config: StudyConfig, nodes: list[Node], trials: int) -> ResourcePlan:
    """The run's requests on ``nodes`` for ``trials`` student trials (``config``:
    ``cpus_per_trial``, ``gpus_per_trial``, ``bench_cores``, ``stop_after``).

    Raises:
        StudyError: the cluster has no node with a CPU, or a request fixed on the command line
            fits on no node (one line naming the request and the largest node).
    """
    cap = config.cpus_per_trial * trials if config.cpus_per_trial else None
    teacher_node, teacher = whole_node(nodes, cap)
    student, concurrent = student_share(nodes, trials, config.cpus_per_trial, config.gpus_per_trial)
    bench = bench_node(nodes, config.bench_cores) if config.stop_after == "bench" else None
    return ResourcePlan(tuple(nodes), teacher_node, teacher, student, trials, concurrent, bench)
