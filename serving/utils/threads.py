"""How the engine's OpenMP threads wait for work, set in the environment of the processes that run it.

torch's CPU ops and our native kernels share one libgomp thread pool, entered dozens of times per engine
step. Between parallel regions libgomp's threads spin (300,000 polls by default) before they sleep. A
spinning thread is always runnable, so when anything else on the node takes a core (the HTTP path, Ray's
own processes, another replica, a tokenizer), the scheduler shares that core between the two by time
slices, and every parallel region waits at its barrier for the slice of the thread that lost its core.
Measured on the 2-core machine with one niced busy-loop process beside a 2-thread engine
(`benchmarks/cpu_contention.py`): batch-1 decode and a batch workload both ran 20-25x slower. A sleeping
thread instead is woken when a region starts, ahead of a busier process: with PASSIVE the same engine ran
as fast as on one thread. libgomp reads these variables once, when it loads (with torch), so they belong in
the environment a process starts with: the Serve replicas' and the tensor-parallel followers'.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

# What the engine's processes get unless the launching environment says how OpenMP threads wait.
OMP_WAIT_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
# Either variable in the launching environment means its owner chose: none of ours is added.
_USER_WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def engine_thread_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Environment variables for a process that will run the engine: OMP_WAIT_ENV, or where `environ` (the
    launcher's) already says how OpenMP threads wait, those settings, so an operator's choice reaches
    replicas on every node (Ray starts them from each node's raylet, not from the launcher's shell)."""
    if any(name in environ for name in _USER_WAIT_SETTINGS):
        return {name: environ[name] for name in _USER_WAIT_SETTINGS if name in environ}
    return dict(OMP_WAIT_ENV)
