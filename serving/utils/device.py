"""The device a configured name means (shared by the runner and the tensor-parallel workers)."""
from __future__ import annotations

import os

import torch

# Ray shows each GPU actor only its own GPU (it sets CUDA_VISIBLE_DEVICES per actor). The ranks of one
# tensor-parallel group then cannot address each other's devices, and NCCL loses its peer-to-peer and NVLink
# paths (on NVSwitch machines such as H100/H200 it can fail at start-up). Set on the group's actors, this
# leaves every rank the node's GPUs; each picks its own by Ray's assignment (ray_cuda_index), as vLLM does.
ALL_GPUS_VISIBLE_ENV = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def local_cuda_index(assigned_gpu_id: str | int, visible_devices: str | None) -> int:
    """The torch index of the GPU Ray assigned (`assigned_gpu_id`), in a process whose CUDA_VISIBLE_DEVICES
    is `visible_devices` (None or empty: every GPU of the node, in order)."""
    if not visible_devices or not visible_devices.strip():
        return int(assigned_gpu_id)
    visible = [v.strip() for v in visible_devices.split(",")]
    if str(assigned_gpu_id) not in visible:
        raise RuntimeError(f"GPU {assigned_gpu_id} assigned by Ray is not among CUDA_VISIBLE_DEVICES="
                           f"{visible_devices}")
    return visible.index(str(assigned_gpu_id))


def ray_cuda_index() -> int | None:
    """This Ray actor's GPU as a torch index (see ALL_GPUS_VISIBLE_ENV); None outside Ray or with no GPU."""
    import ray

    if not ray.is_initialized():
        return None
    assigned = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    return local_cuda_index(assigned[0], os.environ.get("CUDA_VISIBLE_DEVICES")) if assigned else None
