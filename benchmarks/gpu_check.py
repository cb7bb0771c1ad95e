"""First contact with a GPU: a verdict per line (PASS / FAIL / SKIP) and a JSON file, in a few minutes.

Checks (tiny default model): load in bfloat16 on CUDA with memory before and after; greedy top-1 agreement
with CPU float32 and no NaN log-probabilities, for SDPA and (when it imports) flash-attn at block 256; a
clean error for flash-attn in float32; seeded sampling equal on CPU and CUDA (float32); batch-1 decode
eager vs compiled (the `compile` option); batch-1 decode bandwidth utilization against a device clone.
Not yet here (issue 13): the llama3-RoPE model, transformers parity, host syncs, CUDA-graph replay and a
full max_num_seqs decode with one long context.

    bash benchmarks/gpu_check.sh [--output PATH]
Without a CUDA device it prints "no CUDA device" and exits 0 with nothing checked.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch

from serving import LLM, SamplingParams
from serving.capacity import ModelShape
from serving.config import DEFAULT_MODEL
from serving.models.tiny import resolve_model
from serving.roofline import decode_bytes_per_token, utilization

PROMPTS = ["The quick brown fox", "Once upon a time", "In a hole in the ground there lived", "1 2 3 4 5"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=1)


class Report:
    def __init__(self) -> None:
        self.checks: list[dict] = []

    def verdict(self, name: str, ok: bool | None, **details) -> None:
        label = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        self.checks.append({"check": name, "verdict": label, **details})
        print(f"{label} {name} {json.dumps(details, default=str)}", flush=True)


def greedy(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def has_nan(llm: LLM) -> bool:
    return any(math.isnan(v) for o in llm.generate(PROMPTS, GREEDY) for entry in o.outputs[0].logprobs
               for v in entry.values())


def decode_ms(llm: LLM, tokens: int = 64) -> float:
    def once(n: int) -> float:
        start = time.perf_counter()
        llm.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        torch.cuda.synchronize()
        return time.perf_counter() - start

    once(1)
    return (once(tokens + 1) - once(1)) / tokens * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "gpu_check.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing checked")
        return 0
    report, model = Report(), str(resolve_model(DEFAULT_MODEL))
    reference = greedy(LLM(model, device="cpu", dtype="float32"))
    before = torch.cuda.mem_get_info()[0]
    backends = ["sdpa"] + (["flash_attn"] if importlib.util.find_spec("flash_attn") else [])
    for backend in backends:
        try:
            llm = LLM(model, device="cuda", dtype="bfloat16", attention_backend=backend,
                      block_size=256 if backend == "flash_attn" else 16)
        except Exception as exc:  # a verdict, not a crash: the next checks still run
            report.verdict(f"load bf16 {backend}", False, error=repr(exc))
            continue
        report.verdict(f"load bf16 {backend}", True, free_bytes_before=before,
                       free_bytes_after=torch.cuda.mem_get_info()[0])
        got = greedy(llm)
        first = sum(a[0] == b[0] for a, b in zip(got, reference)) / len(PROMPTS)
        same = sum(x == y for a, b in zip(got, reference) for x, y in zip(a, b)) / sum(map(len, reference))
        report.verdict(f"top-1 vs CPU fp32 {backend}", first == 1.0, first_token=first, all_tokens=same)
        report.verdict(f"no NaN {backend}", not has_nan(llm))
        del llm
    if "flash_attn" in backends:
        try:
            LLM(model, device="cuda", dtype="float32", attention_backend="flash_attn", block_size=256)
            report.verdict("flash-attn fp32 refused", False, error="loaded")
        except ValueError as exc:
            report.verdict("flash-attn fp32 refused", True, error=str(exc))
    else:
        report.verdict("flash-attn fp32 refused", None, reason="flash_attn does not import")
    seeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=1234)
    cpu = [o.outputs[0].token_ids for o in LLM(model, device="cpu").generate(PROMPTS, seeded)]
    on_cuda = LLM(model, device="cuda", dtype="float32")
    cuda = [o.outputs[0].token_ids for o in on_cuda.generate(PROMPTS, seeded)]
    report.verdict("seeded sampling CPU == CUDA (fp32)", cpu == cuda)
    eager = decode_ms(LLM(model, device="cuda", dtype="bfloat16"))
    compiled = decode_ms(LLM(model, device="cuda", dtype="bfloat16", compile=True))
    report.verdict("batch-1 decode eager vs compiled", None, eager_ms=eager, compiled_ms=compiled)
    big = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    big.clone()
    torch.cuda.synchronize()
    start = time.perf_counter()
    big.clone()
    torch.cuda.synchronize()
    bandwidth = 2 * big.numel() / (time.perf_counter() - start)
    per_token = decode_bytes_per_token(ModelShape.load(model), len(PROMPTS[0]) + 32, dtype="bfloat16")
    report.verdict("batch-1 decode MBU", None, clone_bytes_per_s=bandwidth,
                   mbu=utilization(per_token / (eager / 1e3), bandwidth))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                       "checks": report.checks}, indent=2))
    print(f"wrote {args.output}")
    return 1 if any(c["verdict"] == "FAIL" for c in report.checks) else 0


if __name__ == "__main__":
    sys.exit(main())
