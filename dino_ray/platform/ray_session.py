"""Ray for every command, one way: join or start a session, and map a function over Ray tasks with a bar.

Platform layer: the core and the evaluations never import this module. ``ray.init()`` itself joins
the cluster that ``RAY_ADDRESS`` names (``ray job submit`` sets it for the job's driver) or starts a
local instance; every command goes through ``ray_session`` so that the rules (the dashboard on, the
log line, the token-auth hint, shutting down only what it started) are the same everywhere.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Iterator, Sequence

from tqdm.auto import tqdm

log = logging.getLogger(__name__)
# A local instance: its workers at the plain loop's priority (Ray's default niceness is 15), no workers started ahead
# of demand, no watcher of node preemption (one machine is not preempted). Each Ray worker process wakes about 100
# times a second even when idle (about 1 % of a core): on a laptop every process fewer is training time.
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0, "enable_worker_prestart": False, "prestart_worker_first_driver": False}
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}  # read by Ray Train's controller, inherited from here
AUTH_HINT = ("the Ray cluster asks for its authentication token (Ray's default token auth): export "
             "RAY_AUTH_MODE=token on this machine, with the cluster's token in ~/.ray/auth_token, or start the "
             "cluster with RAY_AUTH_MODE=disabled")


@contextlib.contextmanager
def ray_session(**init_kwargs: Any) -> Iterator[None]:
    """The Ray session of one command: the one this process already holds (left as it is), else
    ``RAY_ADDRESS``'s cluster, else a new local instance, shut down at the end. ``init_kwargs`` go to
    ``ray.init`` (the dashboard stays on: Train V2 floods the log without it).

    Ray starts its worker processes niced (15), below its own daemons: on a cluster that keeps the daemons
    responsive, but on a laptop the training is what the machine is for. A local instance started here runs its
    workers at the normal priority (the k-NN monitor lowers its own, ``dino_ray.platform.monitor``) and without
    the processes a laptop has no use for (``LOCAL_SYSTEM_CONFIG``, ``LOCAL_ENV``; a variable the user set keeps
    its value). What Ray's processes cost the training is measured in ``benchmarks/ray_tax.py``."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = os.environ.get("RAY_ADDRESS")
    if not address:  # a new instance on this machine
        init_kwargs = {"address": "local", "_system_config": LOCAL_SYSTEM_CONFIG, **init_kwargs}
        for name, value in LOCAL_ENV.items():
            os.environ.setdefault(name, value)
    try:
        context = ray.init(**init_kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised, with what to do when it is the token
        if "authentication" in str(exc).lower() or "auth_token" in str(exc).lower():
            raise RuntimeError(f"{AUTH_HINT} ({exc})") from exc
        raise
    where = f"joined the cluster at {address}" if address else "started a local instance"
    log.info("Ray: %s (%g CPUs, %g GPUs; dashboard %s)", where, ray.cluster_resources().get("CPU", 0),
             ray.cluster_resources().get("GPU", 0), context.dashboard_url or "off")
    try:
        yield
    finally:
        ray.shutdown()


def map_tasks(fn: Callable[..., Any], calls: Sequence[tuple], description: str, unit: str = "task",
              num_cpus: float = 1, num_gpus: float = 0) -> list[Any]:
    """``[fn(*args) for args in calls]``, each call a Ray task, in the calls' order; a bar counts the finished
    ones (in whatever order they finish). Needs a Ray session (``ray_session``)."""
    import ray

    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(fn)
    pending = {remote.remote(*args): i for i, args in enumerate(calls)}
    results: list[Any] = [None] * len(calls)
    with tqdm(total=len(calls), desc=description, unit=unit) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(done[0])] = ray.get(done[0])
            bar.update(1)
    return results


def missing_on_nodes(paths: Sequence[str]) -> dict[str, list[str]]:
    """For each local path, the cluster's nodes (``address (node id)``) that cannot see it: files only some
    machines have. One zero-CPU task per alive node that can run work (CPUs or GPUs), pinned to it; a
    one-machine cluster is not asked."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"] and (n["Resources"].get("CPU", 0) or n["Resources"].get("GPU", 0))]
    if len({n["NodeID"] for n in nodes} | {ray.get_runtime_context().get_node_id()}) <= 1:
        return {}
    check = ray.remote(num_cpus=0)(_absent)
    answers = ray.get([check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                       .remote(list(paths)) for n in nodes])
    missing: dict[str, list[str]] = {}
    for node, absent in zip(nodes, answers):
        for path in absent:
            missing.setdefault(path, []).append(f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})")
    return missing


def _absent(paths: list[str]) -> list[str]:
    from pathlib import Path

    return [path for path in paths if not Path(path).exists()]
