"""Where LLM replicas go: GPUs per rank (auto follows the cluster), and placements refused at build time
that Ray would accept but never schedule."""
from __future__ import annotations

import pytest

from serving.app_config import AppConfig
from serving.replicas import placement


def test_placements_that_would_hang_are_refused_by_name():
    with pytest.raises(ValueError, match="llm_num_gpus=0.5 with tensor_parallel_size=2"):
        AppConfig(llm_num_gpus=0.5, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="llm_num_gpus=2"):
        AppConfig(llm_num_gpus=2)
    with pytest.raises(ValueError, match="device='cpu'"):
        AppConfig(llm_num_gpus=1, device="cpu")
    with pytest.raises(ValueError, match="llm_num_gpus"):
        AppConfig(llm_num_gpus="some")
    assert AppConfig(llm_num_gpus=0.5).llm_num_gpus == 0.5  # a shared GPU, one rank
    assert AppConfig(llm_num_gpus=1, tensor_parallel_size=2).llm_num_gpus == 1


@pytest.mark.parametrize(("cluster_gpus", "device", "expected"), [(8.0, "auto", 1.0), (0.0, "auto", 0.0),
                                                                  (8.0, "cpu", 0.0)])
def test_auto_gpus_follow_the_cluster(monkeypatch, cluster_gpus, device, expected):
    monkeypatch.setattr(placement, "cluster_gpus", lambda: cluster_gpus)
    config = AppConfig(tensor_parallel_size=2, device=device)
    gpus = placement.llm_gpus_per_rank(config)
    assert gpus == expected
    bundles = placement.tensor_parallel_placement(config, gpus)["placement_group_bundles"]
    assert len(bundles) == 2 and all(b.get("GPU", 0.0) == expected for b in bundles)


def test_explicit_gpus_are_kept(monkeypatch):
    monkeypatch.setattr(placement, "cluster_gpus", lambda: 0.0)
    assert placement.llm_gpus_per_rank(AppConfig(llm_num_gpus=0)) == 0.0
    assert placement.llm_gpus_per_rank(AppConfig(llm_num_gpus=0.25)) == 0.25  # waits for a GPU node
    assert placement.tensor_parallel_placement(AppConfig(), 1.0) == {}  # one rank: the actor options hold it


def _llm_actor_env(config: AppConfig) -> dict[str, str]:
    from serving.deployment import build_app

    llm = build_app(config)._bound_deployment.init_args[1]._bound_deployment
    return llm.ray_actor_options["runtime_env"]["env_vars"]


def test_tensor_parallel_ranks_on_gpus_see_the_nodes_gpus(monkeypatch):
    monkeypatch.setattr(placement, "cluster_gpus", lambda: 8.0)
    base = {"insecure_no_auth": True, "embedding_model": "none"}
    nccl_layout = _llm_actor_env(AppConfig(tensor_parallel_size=2, **base))
    assert nccl_layout["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] == "1"
    # One GPU per replica, or CPU ranks: Ray's usual one-device view is kept.
    assert "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES" not in _llm_actor_env(AppConfig(**base))
    assert "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES" not in _llm_actor_env(
        AppConfig(tensor_parallel_size=2, device="cpu", **base))


@pytest.mark.parametrize(("assigned", "visible", "index"), [
    ("3", None, 3), (5, "", 5), ("6", "4,5,6,7", 2), ("GPU-aa", "GPU-ff, GPU-aa", 1)])
def test_each_rank_picks_the_gpu_ray_assigned(assigned, visible, index):
    from serving.utils.device import local_cuda_index

    assert local_cuda_index(assigned, visible) == index


def test_a_gpu_outside_the_visible_ones_is_a_clear_error():
    from serving.utils.device import local_cuda_index

    with pytest.raises(RuntimeError, match="GPU 3 assigned by Ray is not among CUDA_VISIBLE_DEVICES=0,1"):
        local_cuda_index("3", "0,1")
