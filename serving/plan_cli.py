"""`mosaic-serve plan`: print the capacity plan of a model on GPUs (serving/capacity.py has the formulas).

    mosaic-serve plan --model DIR_OR_CONFIG [--tensor-parallel-size T] [--gpus N] [--gpu-memory-gb G]
                      [--dtype D] [--kv-cache-dtype K] [--quantization Q]
                      [--requests-per-s R --prompt-tokens P --output-tokens O] [--json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from serving.capacity import DTYPE_BYTES, Deployment, Hardware, Load, ModelShape, plan
from serving.config import EngineConfig

_GB = 1e9


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in its help, unless the help text says it in its own words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "(default" in text or action.default is None and action.required else \
            super()._get_help_string(action)


def _engine_help(name: str) -> str:
    """The engine setting's own help text (serving/config.py)."""
    return next(f.metadata["help"] for f in dataclasses.fields(EngineConfig) if f.name == name)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mosaic-serve plan", formatter_class=_DefaultsShown,
                                description="Capacity plan: memory, KV cache, speed bounds (rooflines) and "
                                            "replicas for a target load.")
    p.add_argument("--model", required=True, help="checkpoint folder, its config.json, or tiny-llama-2-chat")
    p.add_argument("--tensor-parallel-size", type=int, default=Deployment.tensor_parallel_size,
                   help=_engine_help("tensor_parallel_size"))
    p.add_argument("--gpus", type=int, default=Hardware.gpus, help="GPUs available in all")
    p.add_argument("--gpu-memory-gb", type=float, default=Hardware.gpu_memory_gb,
                   help="memory per GPU in GB (1e9 bytes), an A100 80GB by default")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_BYTES], help="auto: bfloat16, as on CUDA")
    p.add_argument("--kv-cache-dtype", default=Deployment.kv_cache_dtype, choices=["auto", "int8"],
                   help=_engine_help("kv_cache_dtype"))
    p.add_argument("--quantization", default=Deployment.quantization, choices=["int8"],
                   help=_engine_help("quantization"))
    p.add_argument("--hbm-bandwidth-gbs", type=float, default=Hardware.hbm_bandwidth_gbs,
                   help="memory bandwidth per GPU in GB/s, an A100 80GB SXM's by default")
    p.add_argument("--gpu-tflops", type=float, default=Hardware.tflops,
                   help="dense bf16/fp16 TFLOP/s per GPU, an A100's by default")
    p.add_argument("--block-size", type=int, default=Deployment.block_size,
                   help="tokens per KV-cache block (default: what the engine's auto picks on GPUs with flash-attn "
                        "installed: 256, or 16 in float32 or with an int8 KV cache)")
    p.add_argument("--kv-cache-memory-fraction", type=float, default=Deployment.kv_cache_memory_fraction,
                   help="share of the memory left after the weights that the KV pool may take (the engine's "
                        "default)")
    p.add_argument("--max-num-seqs", type=int, default=Deployment.max_num_seqs, help=_engine_help("max_num_seqs"))
    p.add_argument("--max-model-len", type=int, help=_engine_help("max_model_len"))
    p.add_argument("--requests-per-s", type=float, default=Load.requests_per_s, help="target load")
    p.add_argument("--prompt-tokens", type=int, default=Load.prompt_tokens, help="prompt tokens per request")
    p.add_argument("--output-tokens", type=int, default=Load.output_tokens, help="generated tokens per request")
    p.add_argument("--utilization", type=float, default=Load.utilization,
                   help="share of the roofline the replica count counts on")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def plan_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        shape = ModelShape.load(args.model)
        hw = Hardware(gpus=args.gpus, gpu_memory_gb=args.gpu_memory_gb, hbm_bandwidth_gbs=args.hbm_bandwidth_gbs,
                      tflops=args.gpu_tflops)
        d = Deployment(tensor_parallel_size=args.tensor_parallel_size,
                       dtype="bfloat16" if args.dtype == "auto" else args.dtype, kv_cache_dtype=args.kv_cache_dtype,
                       quantization=args.quantization, block_size=args.block_size,
                       kv_cache_memory_fraction=args.kv_cache_memory_fraction, max_num_seqs=args.max_num_seqs,
                       max_model_len=args.max_model_len)
        load = Load(requests_per_s=args.requests_per_s, prompt_tokens=args.prompt_tokens,
                    output_tokens=args.output_tokens, utilization=args.utilization)
        result = plan(shape, hw, d, load)
    except (ValueError, KeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"model": args.model, "hardware": vars(hw), "deployment": vars(d), "load": vars(load),
                          "plan": result.as_dict()}, indent=2))
        return 0
    r = result
    rows = [
        ("weights per GPU", f"{r.weight_bytes_per_gpu / _GB:.2f} GB"),
        ("KV cache per token (per GPU)", f"{r.kv_bytes_per_token:,} bytes ({d.kv_cache_dtype})"),
        ("memory left per GPU after weights", f"{r.free_bytes_per_gpu / _GB:.2f} GB"),
        (f"KV pool ({d.kv_cache_memory_fraction:.0%} of that)",
         f"{r.kv_blocks:,} blocks of {d.block_size} = {r.kv_tokens:,} tokens"),
        (f"sequences at full context ({r.max_model_len})", f"{r.seqs_at_full_context:,}"),
        ("batch-1 decode, bandwidth bound", f"{r.decode_tok_s_batch1:,.1f} tok/s"),
        ("large-batch decode, compute bound", f"{r.decode_tok_s_compute_bound:,.0f} tok/s"),
        (f"decode at batch {r.batch} (roofline)", f"{r.replica_tok_s:,.0f} tok/s per replica"),
        (f"requests/s per replica (at {load.utilization:.0%})", f"{r.replica_requests_per_s:.2f}"),
        (f"replicas for {load.requests_per_s:g} req/s", f"{r.replicas_needed} (x{d.tensor_parallel_size} GPUs); "
                                                        f"{r.replicas_available} fit on {hw.gpus} GPUs"),
    ]
    print(f"plan: {args.model}, TP={d.tensor_parallel_size}, {d.dtype}, weights "
          f"{d.quantization or d.dtype}, KV {d.kv_cache_dtype}; {hw.gpus} x {hw.gpu_memory_gb:g} GB, "
          f"{hw.hbm_bandwidth_gbs:g} GB/s, {hw.tflops:g} TFLOP/s per GPU; load {load.requests_per_s:g} req/s of "
          f"{load.prompt_tokens}+{load.output_tokens} tokens")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if not r.fits:
        print("  WARNING: a full-context sequence does not fit: more GPUs per replica, int8, or a shorter "
              "--max-model-len")
    if r.replicas_needed > r.replicas_available:
        print(f"  NOTE: the target load needs {r.replicas_needed * d.tensor_parallel_size} GPUs; {hw.gpus} given")
    return 0
