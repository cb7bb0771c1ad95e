"""Tensor parallelism: per-rank parameter memory and offline tokens/s at TP=1 and TP=2, same run.

On CPU the ranks are gloo processes sharing the machine's cores, so TP=2 is expected to be slower than TP=1
(each rank does half the matmul work but the all-reduces are host round trips); the point on CPU is that the
shards are half the size and the tokens are the same. On GPUs run the same command with --device cuda:

    python benchmarks/tensor_parallel.py                       # CPU, the embedded default model
    python benchmarks/tensor_parallel.py --model /models/Llama-2-13b-chat-hf --device cuda --tp 1 2 4

Prints a table and writes JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

from serving import LLM, SamplingParams

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def rank0_param_bytes(llm: LLM) -> int:
    model = llm.engine.executor.runner.model
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama-2-chat")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "tensor_parallel.json")
    args = parser.parse_args()

    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 900) for _ in range(rng.randint(16, 256))] for _ in range(args.num_requests)]
    params = SamplingParams(temperature=0, max_tokens=args.output_tokens, ignore_eos=True)
    rows, reference = [], None
    for tp in args.tp:
        llm = LLM(model=args.model, tensor_parallel_size=tp, device=args.device)
        try:
            llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4))  # warm-up
            start = time.perf_counter()
            outs = llm.generate(prompts, params)
            seconds = time.perf_counter() - start
            tokens = [o.outputs[0].token_ids for o in outs]
            reference = reference or tokens
            rows.append({"tp": tp, "rank0_param_mib": rank0_param_bytes(llm) / 2**20,
                         "tokens_per_s": sum(map(len, tokens)) / seconds,
                         "same_tokens_as_first": tokens == reference})
        finally:
            llm.shutdown()
    base = rows[0]
    print(f"{'TP':>3} {'rank-0 params MiB':>18} {'x TP=' + str(base['tp']):>8} {'tokens/s':>10} {'ratio':>6} same")
    for r in rows:
        print(f"{r['tp']:>3} {r['rank0_param_mib']:>18.1f} {r['rank0_param_mib'] / base['rank0_param_mib']:>8.2f}"
              f" {r['tokens_per_s']:>10.1f} {r['tokens_per_s'] / base['tokens_per_s']:>6.2f} {r['same_tokens_as_first']}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"model": args.model, "device": args.device, "machine": platform.machine(),
                                       "torch_threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
