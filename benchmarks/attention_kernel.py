"""The native paged decode-attention kernel (serving/kernels/paged_attention.c) against the machine's memory
bandwidth and against torch's path (gather the blocks, then SDPA), float32 and int8 caches, same run.

A decode step reads every cached key and value of its sequences once per layer, so the kernel's limit is the
memory bandwidth: MBU = cache bytes read / time / the read bandwidth of a large tensor (a sum over 256 MiB,
the best of its measurements before and between the rounds), for cold calls only. "Cold" runs read 128 MiB
of other memory between calls (more than the last-level cache), as a step does between one layer's attention
and the same layer's next; "warm" runs repeat the call.
Configurations alternate round by round so all see the same machine load; each cell is the median over rounds
of the median call time, with the range of the round medians.

`--compare-source FILE` adds another version of the kernel's source (for example an older commit's:
`git show REV:serving/kernels/paged_attention.c > old.c`), built with the same flags, to every round: an A/B
under the same load.

Shapes: llama-prop's heads (6 query heads, 2 KV heads of 64; benchmarks/throughput.py) for 64 sequences of
100-384 tokens, and Llama-2-70B's heads per rank at tensor parallelism 8 (8 query heads, 1 KV head of 128)
for 16 sequences of 1024-2048 tokens.

    python benchmarks/attention_kernel.py                          # under a minute on 2 cores
    python benchmarks/attention_kernel.py --compare-source old.c   # the current kernel against old.c
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from serving.kernels import PagedDecodeAttention, attention_entry, build_variant, paged_decode_attention
from serving.layers.kv_quant import quantize

BLOCK_SIZE = 16
SHAPES = {  # name: (query heads, KV heads, head_dim, sequences, context range)
    "llama-prop, 64 seqs of 100-384": (6, 2, 64, 64, (100, 384)),
    "70B per rank (TP=8), 16 seqs of 1024-2048": (8, 1, 128, 16, (1024, 2048)),
}


def read_bandwidth(mib: int = 256, repeats: int = 10) -> float:
    """Bytes per second of a sum over a large float32 tensor: what a pass that only reads can reach."""
    big = torch.ones(mib * 2**20 // 4)
    big.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - start)
    return big.numel() * 4 / best


class TorchAttention:
    """Torch's route, as the engine's SDPA backend takes it: each sequence's blocks gathered into a padded
    batch in buffers allocated once (a fresh allocation per call would add page faults), then SDPA with a
    length mask."""

    def __init__(self, k_cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor):
        n, blocks = tables.shape
        self.flat = tables.reshape(-1).long()
        self.k = torch.empty(n * blocks, *k_cache.shape[1:])
        self.v = torch.empty_like(self.k)
        self.padded = (n, blocks * BLOCK_SIZE, *k_cache.shape[2:])
        self.mask = (torch.arange(blocks * BLOCK_SIZE) < lens[:, None].long())[:, None, None, :]

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        k = torch.index_select(k_cache, 0, self.flat, out=self.k).view(self.padded).transpose(1, 2)
        v = torch.index_select(v_cache, 0, self.flat, out=self.v).view(self.padded).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=self.mask, scale=scale,
                                             enable_gqa=True)
        return out.squeeze(2)


def cases(shape: tuple, seed: int, kernels: dict[str, PagedDecodeAttention],
          ) -> tuple[dict[str, Callable[[], object]], dict[str, int], dict]:
    heads, kv_heads, head_dim, num_seqs, (lo, hi) = shape
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lens = [rng.randint(lo, hi) for _ in range(num_seqs)]
    max_blocks = -(-max(lens) // BLOCK_SIZE)
    # A pool 4x what the sequences use, their blocks scattered through it, as the block manager leaves them.
    pool = 4 * num_seqs * max_blocks
    k_cache = torch.randn(pool, BLOCK_SIZE, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(pool, BLOCK_SIZE, kv_heads, head_dim, generator=gen)
    k_codes, k_params = quantize(k_cache)
    v_codes, v_params = quantize(v_cache)
    tables = torch.randperm(pool, generator=gen)[: num_seqs * max_blocks].view(num_seqs, max_blocks).to(torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(num_seqs, heads, head_dim, generator=gen)
    scale = head_dim**-0.5
    tokens = sum(lens)
    torch_attention = TorchAttention(k_cache, tables, seq_lens)
    runs = {"torch gather + SDPA, float32": lambda: torch_attention(q, k_cache, v_cache, scale)}
    # Keys and values of every visible token (int8: the codes and 2 float16 per head and token).
    float_bytes, int8_bytes = 2 * tokens * kv_heads * head_dim * 4, 2 * tokens * kv_heads * (head_dim + 4)
    bytes_read = {"torch gather + SDPA, float32": float_bytes}
    outputs = {}
    for label, kernel in kernels.items():
        out_f32, out_i8 = torch.empty_like(q), torch.empty_like(q)
        outputs[f"{label}, float32"], outputs[f"{label}, int8"] = out_f32, out_i8
        runs[f"{label}, float32"] = functools.partial(kernel, out_f32, q, k_cache, v_cache, tables, seq_lens,
                                                      scale)
        runs[f"{label}, int8"] = functools.partial(kernel, out_i8, q, k_codes, v_codes, tables, seq_lens, scale,
                                                   k_params, v_params)
        bytes_read[f"{label}, float32"], bytes_read[f"{label}, int8"] = float_bytes, int8_bytes
    for run in runs.values():
        run()
    reference = torch_attention(q, k_cache, v_cache, scale)
    check = {f"max_abs_diff {route}": (out - reference).abs().max().item() for route, out in outputs.items()}
    return runs, bytes_read, check


def median_call(fn: Callable[[], object], calls: int, flush: torch.Tensor | None) -> float:
    times = []
    for _ in range(calls):
        if flush is not None:
            flush.sum()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20, help="timed calls per configuration and round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-source", type=Path,
                        help="another version of serving/kernels/paged_attention.c to time beside the current one")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "attention_kernel.json")
    args = parser.parse_args()
    current = paged_decode_attention()
    if current is None:
        raise SystemExit("the CPU attention kernel could not be built here (no C compiler or OpenMP)")
    kernels = {"kernel": current}
    if args.compare_source:
        # The loaded library stays mapped after its file is removed with the folder.
        with tempfile.TemporaryDirectory(prefix="attention-kernel-") as build_dir:
            other = build_variant("paged_attention.c", args.compare_source, Path(build_dir) / "other.so")
        kernels[f"kernel ({args.compare_source.name})"] = attention_entry(other)
    flush = torch.ones(128 * 2**20 // 4)
    # Measured between the rounds too: on a shared machine the rate moves, and MBU takes the best seen.
    bandwidths = [read_bandwidth()]
    raw = {}
    for name, shape in SHAPES.items():
        runs, bytes_read, check = cases(shape, args.seed, kernels)
        rounds: dict[tuple[str, str], list[float]] = {(run, cache): [] for run in runs for cache in ("warm", "cold")}
        for _ in range(args.rounds):
            for (run, cache), seconds in rounds.items():
                seconds.append(median_call(runs[run], args.calls, flush if cache == "cold" else None))
            bandwidths.append(read_bandwidth(repeats=3))
        raw[name] = (rounds, bytes_read, check)
    bandwidth = max(bandwidths)
    print(f"read bandwidth: {min(bandwidths) / 1e9:.1f}-{bandwidth / 1e9:.1f} GB/s over the run, "
          f"torch threads: {torch.get_num_threads()}", flush=True)
    results = []
    for name, (rounds, bytes_read, check) in raw.items():
        for (run, cache), seconds in rounds.items():
            mid = statistics.median(seconds)
            results.append({"shape": name, "route": run, "cache": cache, "ms": mid * 1e3,
                            "ms_range": [min(seconds) * 1e3, max(seconds) * 1e3], "bytes": bytes_read[run],
                            "gb_per_s": bytes_read[run] / mid / 1e9,
                            # Warm calls read the last-level cache, so only cold ones measure against DRAM.
                            "mbu": bytes_read[run] / mid / bandwidth if cache == "cold" else None,
                            **check})
    print("\n| shape | route | cache | ms (range over rounds) | GB/s | MBU | vs torch, same cache |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in results:
        base = next(b["ms"] for b in results if b["shape"] == r["shape"] and b["cache"] == r["cache"]
                    and b["route"].startswith("torch"))
        mbu = "-" if r["mbu"] is None else f"{r['mbu']:.0%}"
        print(f"| {r['shape']} | {r['route']} | {r['cache']} | {r['ms']:.3f} ({r['ms_range'][0]:.3f}-"
              f"{r['ms_range'][1]:.3f}) | {r['gb_per_s']:.1f} | {mbu} | {base / r['ms']:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                    "torch_threads": torch.get_num_threads(), "read_bytes_per_s": bandwidth,
                                    "read_bytes_per_s_range": [min(bandwidths), bandwidth],
                                    "rounds": args.rounds, "calls": args.calls,
                                    "compare_source": str(args.compare_source) if args.compare_source else None,
                                    "results": results}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
