"""What the LLM replicas take from the cluster: GPUs per rank, the tensor-parallel placement group, and the
machine sizing `mosaic-serve` uses for a local Ray instance."""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.app_config import AppConfig

logger = logging.getLogger(__name__)


def check_placement(config: AppConfig) -> None:
    """Refuse placements Ray would accept but never schedule (start-up would hang), naming the fields."""
    gpus, tp = config.llm_num_gpus, config.tensor_parallel_size
    if gpus == "auto":
        return
    if not 0 <= gpus <= 1:
        raise ValueError(f"llm_num_gpus={gpus!r}: expected auto or a number in [0, 1] (GPUs per tensor-parallel "
                         "rank; a rank uses one GPU, raise tensor_parallel_size for more)")
    if tp > 1 and 0 < gpus < 1:
        raise ValueError(f"llm_num_gpus={gpus!r} with tensor_parallel_size={tp}: each tensor-parallel rank needs a "
                         "whole GPU (its follower processes ask for one); use llm_num_gpus 1 (or 0 for CPU)")
    if gpus > 0 and config.device == "cpu":
        raise ValueError(f"llm_num_gpus={gpus!r} with device='cpu': the replica would hold a GPU it never uses")


def cluster_gpus() -> float:
    """GPUs of the Ray cluster this process is connected to (of this machine when it is not connected)."""
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0.0))
    import torch

    return float(torch.cuda.device_count())


def llm_gpus_per_rank(config: AppConfig) -> float:
    """`llm_num_gpus` resolved: auto is 1 GPU per rank when the cluster has GPUs, 0 (CPU) otherwise."""
    if config.llm_num_gpus != "auto":
        gpus = float(config.llm_num_gpus)
        if gpus > 0 and cluster_gpus() == 0:
            logger.warning("LLM replicas ask for %g GPU per rank but the cluster has none now: they start only "
                           "once a node with GPUs joins", gpus)
        return gpus
    if config.device == "cpu":
        return 0.0
    gpus = 1.0 if cluster_gpus() > 0 else 0.0
    logger.info("llm_num_gpus=auto: %s", "1 GPU per tensor-parallel rank" if gpus else
                "the cluster has no GPU, the LLM replicas run on CPU (float32)")
    return gpus


def tensor_parallel_placement(config: AppConfig, gpus_per_rank: float) -> dict[str, Any]:
    """One placement-group bundle per tensor-parallel rank, packed on one node (ranks talk NCCL/gloo).

    The replica actor (rank 0) takes bundle 0 with its actor options; the follower actors it starts take
    the other bundles, so `llm_num_cpus` / `llm_num_gpus` are per rank.
    """
    if config.tensor_parallel_size == 1:
        return {}
    bundle: dict[str, float] = {"CPU": config.llm_num_cpus, **config.llm_resources}
    if gpus_per_rank:
        bundle["GPU"] = gpus_per_rank
    return {"placement_group_bundles": [bundle] * config.tensor_parallel_size,
            "placement_group_strategy": "STRICT_PACK"}


def default_llm_cpus(num_replicas: int) -> float:
    """CPUs (and torch threads) per LLM replica on one machine: the cores shared out, less one for the HTTP
    path (proxy, ingress, embeddings), which would otherwise steal time from the engine's threads."""
    return float(max(1, ((os.cpu_count() or 2) - 1) // max(1, num_replicas)))


def resources_needed(config: AppConfig) -> float:
    """CPUs (Ray logical resources) the application asks for at its initial size."""
    replicas = config.autoscaling.min_replicas if config.autoscaling else config.num_replicas
    cpus = (replicas * config.llm_num_cpus * config.tensor_parallel_size
            + config.ingress_num_cpus * config.ingress_num_replicas)
    if config.has_embeddings:
        cpus += config.embedding_num_cpus * config.embedding_num_replicas
    return cpus
