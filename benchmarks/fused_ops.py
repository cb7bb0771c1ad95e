"""The fused elementwise CPU kernels (serving/kernels/fused_ops.c) against the torch ops they replace.

Each layer (residual add + RMSNorm, rotary on the qkv projection, SiLU-and-mul) is timed on llama-prop's
shapes at a decode step (64 rows) and a prefill chunk (512 rows) with its kernel and on its torch path (the
same layer with the kernels switched off), best of --repeats medians; then the engine on llama-prop's offline
workload (benchmarks/throughput.py's, 64 requests), kernels off and on alternately in one process, with the
engine's steps counted, so both sides see the same machine load.

    python benchmarks/fused_ops.py                    # ~1-2 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch

from benchmarks.throughput import MODEL_LLAMA_PROP, WORKLOADS, build_random, run_engine, workload
from serving import LLM
from serving.config import DEFAULT_MODEL
from serving.kernels import fused
from serving.layers.activation import SiluAndMul
from serving.layers.norm import RMSNorm
from serving.layers.rotary import split_rotary
from serving.models.tiny import resolve_model

HIDDEN, INTERMEDIATE = MODEL_LLAMA_PROP["hidden_size"], MODEL_LLAMA_PROP["intermediate_size"]
HEADS, KV_HEADS, HEAD_DIM = (MODEL_LLAMA_PROP[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim"))


@contextlib.contextmanager
def kernels_off() -> Iterator[None]:
    """The layers' torch path, as where no compiler is found."""
    with mock.patch.object(fused, "_kernels", lambda *tensors: None):
        yield


def time_us(fn: Callable[[], object], repeats: int, calls: int = 200) -> float:
    """Best of `repeats` medians of `calls` timed calls, in microseconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        best = min(best, statistics.median(times))
    return best * 1e6


def layer_cases(rows: int) -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(rows)
    x, residual = torch.randn(rows, HIDDEN, generator=gen), torch.randn(rows, HIDDEN, generator=gen)
    norm, act = RMSNorm(HIDDEN, MODEL_LLAMA_PROP["rms_norm_eps"]), SiluAndMul()
    qkv = torch.randn(rows, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=gen)
    cos_sin = (torch.randn(rows, 1, HEAD_DIM, generator=gen), torch.randn(rows, 1, HEAD_DIM, generator=gen))
    gate_up = torch.randn(rows, 2 * INTERMEDIATE, generator=gen)
    return {
        "add + RMSNorm": lambda: norm(x, residual),
        "rotary q, k": lambda: split_rotary(qkv, HEADS, KV_HEADS, HEAD_DIM, cos_sin),
        "SiLU(gate) * up": lambda: act(gate_up),
    }


def bench_layers(repeats: int) -> list[dict]:
    results = []
    with torch.inference_mode():
        for rows in (64, 512):
            for name, fn in layer_cases(rows).items():
                kernel = time_us(fn, repeats)
                with kernels_off():
                    torch_us = time_us(fn, repeats)
                results.append({"op": name, "rows": rows, "kernel_us": kernel, "torch_us": torch_us})
                print(f"{name:16s} {rows:4d} rows: kernel {kernel:7.1f} us, torch {torch_us:7.1f} us "
                      f"({torch_us / kernel:.2f}x)", flush=True)
    return results


def bench_engine(num_requests: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-fused-") as tmp:
        path = build_random(Path(tmp) / "llama-prop", resolve_model(DEFAULT_MODEL), MODEL_LLAMA_PROP)
        vocab = MODEL_LLAMA_PROP["vocab_size"]
        requests = workload(num_requests, 0, vocab, *WORKLOADS["llama-prop"])
        llm = LLM(str(path))
        run_engine(llm, workload(4, 1, vocab, (16, 64), (4, 8)))
        steps = 0
        real_step = llm.engine.step

        def counted_step() -> object:
            nonlocal steps
            steps += 1
            return real_step()

        llm.engine.step = counted_step
        seconds: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(rounds):
            for side in ("off", "on"):
                # A fresh prefix cache each time would need a fresh engine; distinct prompts per round instead.
                reqs = [([1, 3 + len(seconds[side]) * 2 + (side == "on"), *p[1:]], n) for p, n in requests]
                steps = 0
                with kernels_off() if side == "off" else contextlib.nullcontext():
                    seconds[side].append(run_engine(llm, reqs))
        useful = sum(n for _, n in requests)
        best = {side: min(s) for side, s in seconds.items()}
        result = {"num_requests": num_requests, "useful_tokens": useful, "steps": steps, "seconds": seconds,
                  "ms_per_step": {side: 1e3 * s / steps for side, s in best.items()},
                  "speedup": best["off"] / best["on"]}
        print(f"engine, {num_requests} requests, {steps} steps: kernels off {best['off']:.2f} s "
              f"({result['ms_per_step']['off']:.1f} ms/step), on {best['on']:.2f} s "
              f"({result['ms_per_step']['on']:.1f} ms/step): {result['speedup']:.2f}x", flush=True)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="engine runs per side, alternating")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    result = {"threads": torch.get_num_threads(), "layers": bench_layers(args.repeats),
              "engine": bench_engine(args.num_requests, args.rounds)}
    if args.output:
        args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
