"""The Ray cluster a run uses: joining or starting it, reading its nodes, probing every node.

How much each request asks for is decided in ``study.resources`` (pure functions over ``Node``
lists); this module is the thin layer that talks to Ray: ``connect`` (``ray.init``),
``cluster_nodes`` (``ray.nodes()``), ``on_node`` (``NodeAffinitySchedulingStrategy``),
``run_on_node`` (a tiny task on one node) and ``check_shared_storage`` (a probe file per node).
"""

from __future__ import annotations

import logging
import socket
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from study import StudyError
from study.errors import error_line
from study.resources import Node, nodes_from_ray

#: Seconds a probe task may take on one node (a fresh worker starts, maybe a runtime_env unpacks).
PROBE_TIMEOUT_S = 180.0


def check_address(address: Optional[str], timeout: float = 5.0) -> None:
    """StudyError unless a TCP connection to ``--address`` (``host:port``, optionally ``ray://``)
    opens within ``timeout`` seconds; ``ray.init`` itself retries an unreachable head for minutes.
    ``None`` (start a local Ray) and ``auto`` (find a running local one) are left to Ray."""
    if address in (None, "auto", "local"):
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        raise StudyError(f"--address {address!r} is not host:port (e.g. 10.0.0.1:6379), 'auto' or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise StudyError(f"cannot reach Ray cluster at --address {address!r}: {err.strerror or err}") from None


def dashboard_line(address: Optional[str], dashboard: bool, url: Optional[str]) -> str:
    """The line saying where the Ray dashboard is: its URL (``host:port`` as ``ray.init``
    returns it), or why there is none: an existing cluster (``address``) that runs none, a local
    run with ``--no-dashboard``, or a local dashboard that did not start."""
    if url:
        return f"Ray dashboard: {url if '://' in url else 'http://' + url}"
    if address:
        return f"Ray dashboard: none (the Ray cluster at --address {address} runs no dashboard)"
    if not dashboard:
        return "Ray dashboard: off (--no-dashboard)"
    return "Ray dashboard: none (it did not start; the Ray logs of this session say why)"


def connect(address: Optional[str], dashboard: bool, runtime_env: Optional[dict] = None,
            logging_level: int = logging.INFO) -> str:
    """``ray.init``: with ``address`` join that cluster (``auto``: the one ``ray start`` runs on
    this machine, or ``$RAY_ADDRESS``) with ``runtime_env``; without, start a new local Ray
    (``address="local"``: never a cluster already running here, whatever ``$RAY_ADDRESS`` says),
    with its dashboard when ``dashboard``. ``logging_level``: of the driver's ``ray`` logger
    (``logging.WARNING`` hides "Started a local Ray instance"). Returns ``dashboard_line``'s line.

    Raises StudyError (one line) when the cluster cannot be reached.
    """
    import ray

    check_address(address)
    if address:
        options = {"address": address, "runtime_env": runtime_env}
    else:
        options = {"address": "local", "include_dashboard": dashboard, "dashboard_host": "127.0.0.1"}
    try:
        context = ray.init(**options, logging_level=logging_level)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise StudyError(f"cannot reach Ray cluster at --address {address!r}: "
                         f"{error_line(err)}") from None
    return dashboard_line(address, dashboard, getattr(context, "dashboard_url", None))


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected cluster, from ``ray.nodes()``."""
    import ray

    return nodes_from_ray(ray.nodes())


def on_node(node: Node):
    """Ray scheduling strategy that runs a task or actor on ``node`` and nowhere else (it fails
    instead of waiting when the node is gone)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node.node_id, soft=False)


def run_on_node(node: Node, fn: Callable, *args, timeout: float = PROBE_TIMEOUT_S) -> Any:
    """``fn(*args)`` as a Ray task on ``node`` that reserves no CPU; its return value. A task
    error is raised as ``ray.exceptions.RayTaskError``; StudyError after ``timeout`` seconds."""
    import ray

    task = ray.remote(num_cpus=0, max_retries=0)(fn).options(scheduling_strategy=on_node(node))
    try:
        return ray.get(task.remote(*args), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise StudyError(f"node {node.name} did not run a probe task within {timeout:g} s") from None


def _write_probe(path: str, text: str) -> None:
    Path(path).write_text(text)


def _remove_probe(path: str) -> None:
    Path(path).unlink(missing_ok=True)


def check_shared_storage(directory: Path, nodes: list[Node], timeout: float = PROBE_TIMEOUT_S) -> None:
    """Check that ``directory`` (the ``--output-dir``, Tune's ``storage_path``) is one folder
    that every node can write and the driver can read: a task pinned to each node writes a probe
    file there, the driver reads each back, then the files are removed.

    Raises StudyError (one line naming the folder and the node) when a node cannot write there
    or the driver does not see what a node wrote (the folder is local to each machine).
    """
    import ray

    directory = Path(directory).resolve()
    token = uuid.uuid4().hex[:12]
    probes = {node: directory / f".storage-probe-{token}-{node.node_id[:12]}" for node in nodes}
    shared = "with --address it must be a folder on storage that every node mounts at the same path"
    try:
        for node, path in probes.items():
            try:
                run_on_node(node, _write_probe, str(path), f"{token} {node.node_id}", timeout=timeout)
            except ray.exceptions.RayTaskError as err:
                cause = err.cause if isinstance(err.cause, OSError) else err
                reason = getattr(cause, "strerror", None) or error_line(cause)
                raise StudyError(f"--output-dir {directory} is not writable on node {node.name} "
                                 f"({reason}); {shared}") from None
            if not path.is_file() or path.read_text() != f"{token} {node.node_id}":
                raise StudyError(f"--output-dir {directory}: a file written there on node {node.name} "
                                 f"is not visible to the driver; {shared}")
    finally:
        removals = [ray.remote(num_cpus=0, max_retries=0)(_remove_probe).options(
            scheduling_strategy=on_node(node)).remote(str(path)) for node, path in probes.items()]
        ray.wait(removals, num_returns=len(removals), timeout=timeout)
        for path in probes.values():
            path.unlink(missing_ok=True)
