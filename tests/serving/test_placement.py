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
