"""Setting up a Serve replica's process: torch threads, logging into Serve's log files, where it runs."""
from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve.exceptions import RayServeException

# Replica code on the replica's own event loop: Ray Serve's default puts it on a thread of its own, which
# costs a cross-thread hand-off per request and per streamed item. (Routers stay on their own loop: on the
# caller's loop a burst slips past max_queued_requests.) Set per actor, so it holds on any cluster.
_REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def enter_replica(num_cpus: float) -> str:
    """Set up this Serve replica's process and return its actor name (the `replica` label everywhere).

    Torch gets as many threads as the replica's CPU share (Ray sets OMP_NUM_THREADS=1 for fractional
    shares), and our module loggers (`serving.*`) write at INFO into the replica's Serve log file through
    Serve's own handlers, which stamp each record with the replica and request ids. A server class built
    directly, outside Serve (tests), leaves the process alone and is called "local".
    """
    try:
        context = serve.get_replica_context()
    except RayServeException:
        return "local"
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))
    ours = logging.getLogger("serving")
    ours.handlers = list(logging.getLogger("ray.serve").handlers)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    return context.replica_id.to_full_id_str()


def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray), so /health shows where replicas are."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def actor_options(num_cpus: float, resources: dict[str, float] | None = None, env: dict[str, str] | None = None,
                  **options: float) -> dict[str, Any]:
    """Ray actor options of a replica: its CPU share, custom resources, and the replica environment (plus
    `env`)."""
    custom = {"resources": dict(resources)} if resources else {}
    return {"num_cpus": num_cpus, **options, **custom, "runtime_env": {"env_vars": {**_REPLICA_ENV, **(env or {})}}}
