"""Load a Hugging Face Llama checkpoint folder (config.json + one or sharded *.safetensors, or PyTorch *.bin
files) onto one tensor-parallel rank: each parameter's weight_loader reads only that rank's slice from disk
(from a memory-mapped .bin file, only the pages of that slice)."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm
from transformers import AutoConfig, LlamaConfig

from serving.layers.embed_head import ParallelLMHead
from serving.layers.linear import LinearBase
from serving.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ACTIVATIONS = ("silu", "swish")   # the same function under two names
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PROGRESS_BAR_MIN_BYTES = 1 << 30


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA, fp32 on CPU (CPU half-precision matmuls are slow and less exact)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"invalid dtype={name!r}: expected auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def load_config(path: Path) -> LlamaConfig:
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {config.model_type!r} in {path}: supported {SUPPORTED_MODEL_TYPES}")
    # The MLP is SiLU-gated whatever the config says: another activation would load, run and be wrong.
    if config.hidden_act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {config.hidden_act!r} in {path}/config.json: the Llama layers "
                         f"here compute {' / '.join(SUPPORTED_ACTIVATIONS)}")
    return config


QUANTIZATIONS = (None, "int8")


def load_model(path: Path, dtype: torch.dtype, device: torch.device,
               quantization: str | None = None, packed_weights: bool = False) -> LlamaForCausalLM:
    """This rank's shard of the model; quantization="int8" quantizes every linear layer's shard once it is
    loaded (weight-only; embeddings, LM head and norms stay in `dtype`); packed_weights also holds the float32
    CPU matmul weights (linear layers and LM head) packed for oneDNN (serving/layers/packed_weights.py)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"invalid quantization={quantization!r}: expected None or int8")
    config = load_config(path)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    load_weights(model, path)
    if quantization == "int8":
        for module in model.modules():
            if isinstance(module, LinearBase):
                module.quantize_int8()
    if packed_weights:
        for module in model.modules():
            if isinstance(module, (LinearBase, ParallelLMHead)):
                module.pack_weight()
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of this rank's weights (a tied embedding and LM head counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def checkpoint_files(path: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors where the folder has them, else PyTorch .bin files (older
    checkpoints), each either listed by an index (sharded) or found by their suffix."""
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = path / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [path / name for name in names]
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise ValueError(f"no weights in {path}: expected *.safetensors or PyTorch pytorch_model*.bin files")


def _checkpoint_tensors(file: Path) -> Iterator[tuple[str, Any]]:
    """(name, tensor or lazy safetensors slice) of every tensor in one weight file. A .bin file is opened
    memory-mapped and with weights_only (plain tensors, no arbitrary pickled code)."""
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_slice(name)
        return
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:
        # torch's pre-1.6 (non-zip) format cannot be memory-mapped: read whole.
        state = torch.load(file, map_location="cpu", weights_only=True)
    yield from state.items()


def load_weights(model: LlamaForCausalLM, path: Path) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    files = checkpoint_files(path)
    total_bytes = sum(f.stat().st_size for f in files)
    loaded: set[str] = set()
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="loading weights",
              disable=total_bytes < _PROGRESS_BAR_MIN_BYTES) as progress:
        for file in files:
            for name, lazy in _checkpoint_tensors(file):
                if "rotary_emb.inv_freq" in name:
                    continue
                loaded.add(_load_one(params, name, lazy))
            progress.update(file.stat().st_size)
    if model.config.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _load_one(params: dict[str, torch.nn.Parameter], name: str, lazy) -> str:
    for ckpt_name, (fused_name, shard_id) in LlamaForCausalLM.packed_modules_mapping.items():
        if f".{ckpt_name}." in name:
            target = name.replace(f".{ckpt_name}.", f".{fused_name}.")
            param = _param(params, target, name)
            param.weight_loader(param, lazy, shard_id)
            return target
    param = _param(params, name, name)
    getattr(param, "weight_loader", _copy_whole)(param, lazy)
    return name


def _copy_whole(param: torch.nn.Parameter, lazy) -> None:
    param.data.copy_(lazy[:])


def _param(params: dict[str, torch.nn.Parameter], target: str, source: str) -> torch.nn.Parameter:
    if target not in params:
        raise ValueError(f"checkpoint tensor {source!r} has no place in the Llama model")
    return params[target]
