"""int8 KV cache and int8 weights: capacity, speed and quality against the unquantized engine, same run.

Model: the ~100M-parameter Llama of benchmarks/throughput.py (12 layers, 12 heads of 64, fp32 on CPU) with a
peaked LM head (`logit_std=7`: the top token typically has probability > 0.5), because a random model's
near-uniform distributions would hide quantization error. Four configurations: float, int8 KV, int8
weights, both. For each:

- memory: KV bytes per cached token, weight bytes per rank, KV pool capacity in tokens at a fixed budget
  (`--kv-budget-gib`, against an fp32 and a bf16 cache) and the 2k-token sequences that fit there;
- throughput on the mixed workload of throughput.py (prompts 16-256 tokens, outputs 16-128, greedy) with a
  KV budget small enough (`--pool-mib`) that the float run is capacity-bound;
- batch-1 decode ms/token (a long generation minus a one-token one);
- quality against the float run on the same prompts, at batch 1: the quantized engine is teacher-forced on
  the float run's greedy continuations (its logits are recorded, then the float token is made the winner),
  giving top-1 agreement, mean KL(float || quantized) of next-token distributions and the max relative
  logit error (max |l_q - l_f| / max |l_f| per position); and free-running, the share of tokens generated
  before the first token that differs.

Plus the matmul routes for int8 weights, measured first (dense fp32; `_weight_int8pack_mm` with fp32 and
bf16 activations; dequantize-then-matmul), for a decode and a prefill batch.

    python benchmarks/quantization.py            # ~10 min on a shared 2-core machine
    python benchmarks/quantization.py --quick    # fewer requests and shorter generations
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from serving import LLM, SamplingParams
from serving.capacity import Deployment, ModelShape, kv_bytes_per_token
from serving.config import DEFAULT_MODEL
from serving.layers.int8_weights import int8_linear, quantize_per_channel
from serving.models.loader import weight_bytes
from serving.models.tiny import resolve_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import MODEL_100M, build_100m, decode_ms_per_token, run_engine, workload

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CONFIGS = {"float": {}, "int8 KV": {"kv_cache_dtype": "int8"}, "int8 weights": {"quantization": "int8"},
           "both": {"kv_cache_dtype": "int8", "quantization": "int8"}}
LOGIT_STD = 7.0


def _time_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e3


def matmul_routes() -> list[dict]:
    """The 100M model's gate/up projection (768 -> 2 x 2560) at decode and prefill batch sizes."""
    k, n = MODEL_100M["hidden_size"], 2 * MODEL_100M["intermediate_size"]
    weight = torch.randn(n, k) * 0.02
    codes, scale = quantize_per_channel(weight)
    rows = []
    for m in (1, 8, 16, 64, 256):
        x = torch.randn(m, k)
        repeats = 20 if m <= 16 else 5
        routes = {
            "dense fp32": lambda: F.linear(x, weight),
            "int8pack, bf16 activations": lambda: torch.ops.aten._weight_int8pack_mm(
                x.bfloat16(), codes, scale.bfloat16()).float(),
            "dequantize + fp32 matmul": lambda: F.linear(x, codes.float() * scale[:, None]),
            "engine route": lambda: int8_linear(x, codes, scale),
        }
        if m <= 16:   # ~40x dense beyond that: seconds per call
            routes["int8pack, fp32 activations"] = lambda: torch.ops.aten._weight_int8pack_mm(x, codes, scale)
        row = {"rows": m, **{name: _time_ms(fn, repeats) for name, fn in routes.items()}}
        rows.append(row)
        print("matmul", {key: round(v, 3) for key, v in row.items()}, flush=True)
    return rows


class LogitRecorder:
    """Wraps the engine model's compute_logits: records each step's logits (batch 1) and, when given a
    forced continuation, makes its next token the greedy winner (teacher forcing through the decode path)."""

    def __init__(self, llm: LLM):
        self.model = llm.engine.executor.runner.model
        self.original = self.model.compute_logits
        self.model.compute_logits = self
        self.rows: list[torch.Tensor] = []
        self.forced: list[int] | None = None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.original(hidden)
        self.rows.append(logits[-1].clone())
        if self.forced is not None:
            logits = logits.clone()
            logits[-1, self.forced[len(self.rows) - 1]] = float("inf")
        return logits

    def take(self) -> torch.Tensor:
        rows, self.rows = torch.stack(self.rows), []
        return rows


def quality_runs(llm: LLM, prompts: list[list[int]], new_tokens: int,
                 reference: dict | None) -> dict:
    """Greedy generations at batch 1 with their logits; teacher-forced on `reference` when given."""
    recorder = LogitRecorder(llm)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    free, logits = [], []
    for p in prompts:
        free.append(llm.generate([p], params)[0].outputs[0].token_ids)
        logits.append(recorder.take())
    if reference is None:
        return {"tokens": free, "logits": logits}
    agree, kls, rel_errors, first_diff = [], [], [], []
    for p, ref_tokens, ref_logits, own in zip(prompts, reference["tokens"], reference["logits"], free):
        recorder.forced = ref_tokens
        llm.generate([p], params)
        recorder.forced = None
        logits = recorder.take()
        agree.append((logits.argmax(-1) == torch.tensor(ref_tokens)).float())
        kls.append(F.kl_div(logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True,
                            reduction="none").sum(-1))
        rel_errors.append((logits - ref_logits).abs().amax(-1) / ref_logits.abs().amax(-1))
        first_diff.append(next((i for i, (a, b) in enumerate(zip(own, ref_tokens)) if a != b), len(own)))
    return {
        "teacher_forced_top1_agreement": torch.cat(agree).mean().item(),
        "mean_kl": torch.cat(kls).mean().item(),
        "max_relative_logit_error": torch.cat(rel_errors).max().item(),
        "mean_relative_logit_error": torch.cat(rel_errors).mean().item(),
        "free_running_tokens_before_first_difference": sum(first_diff) / (len(prompts) * new_tokens),
    }


def bench_config(name: str, path: Path, engine_args: dict, args: argparse.Namespace, requests: list,
                 quality_prompts: list[list[int]], reference: dict | None) -> tuple[dict, dict | None]:
    config = json.loads((path / "config.json").read_text())
    kv_dtype = engine_args.get("kv_cache_dtype", "auto")
    bytes_per_token = kv_bytes_per_token(ModelShape.from_config(config), Deployment(dtype="float32", kv_cache_dtype=kv_dtype))
    budget = int(args.kv_budget_gib * 2**30)
    capacity = budget // (16 * bytes_per_token) * 16
    pool_blocks = int(args.pool_mib * 2**20) // (16 * bytes_per_token)

    llm = LLM(str(path), num_kv_blocks=pool_blocks, **engine_args)
    stats = llm.engine.stats()
    assert stats.kv_bytes_per_token == bytes_per_token
    result = {
        "config": name, **engine_args,
        "kv_bytes_per_token": bytes_per_token,
        "weight_bytes_per_rank": weight_bytes(llm.engine.executor.runner.model),
        "capacity_tokens_at_budget": capacity,
        "max_2k_sequences_at_budget": capacity // 2048,
        "pool_tokens_in_throughput_run": stats.kv_capacity_tokens,
        "attention_backend": llm.engine.executor.runner.attention_backend,
    }
    warmup = workload(4, args.seed + 1, config["vocab_size"], (16, 64), (4, 8))
    run_engine(llm, warmup)
    preemptions = llm.engine.stats().num_preemptions
    seconds = run_engine(llm, requests)
    useful = sum(n for _, n in requests)
    result.update(throughput_seconds=seconds, tokens_per_s=useful / seconds,
                  preemptions=llm.engine.stats().num_preemptions - preemptions)
    print(f"{name}: {useful / seconds:.1f} tok/s over {seconds:.1f}s", flush=True)

    def one(prompt: list[int], n: int) -> None:
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))

    result["decode_ms_per_token"] = decode_ms_per_token(one, requests[0][0][:128], args.decode_tokens)
    runs = quality_runs(llm, quality_prompts, args.quality_tokens, reference)
    if reference is not None:
        result.update(runs)
    print(json.dumps(result), flush=True)
    llm.shutdown()
    del llm
    gc.collect()
    return result, runs if reference is None else None


def print_table(results: list[dict], fp32_tokens: int, bf16_tokens: int, budget_gib: float) -> None:
    base = results[0]
    print(f"\n| config | KV bytes/token | weights MiB/rank | tokens in {budget_gib:g} GiB (vs fp32, vs bf16) | "
          "2k seqs | tok/s capacity-bound (vs float) | decode ms/token | top-1 agree | mean KL | "
          "max rel. logit err | free-running agree |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        quality = ("-", "-", "-", "-") if "mean_kl" not in r else (
            f"{r['teacher_forced_top1_agreement']:.4f}", f"{r['mean_kl']:.5f}",
            f"{r['max_relative_logit_error']:.4f}", f"{r['free_running_tokens_before_first_difference']:.3f}")
        print(f"| {r['config']} | {r['kv_bytes_per_token']} | {r['weight_bytes_per_rank'] / 2**20:.1f} | "
              f"{r['capacity_tokens_at_budget']} ({r['capacity_tokens_at_budget'] / fp32_tokens:.2f}x, "
              f"{r['capacity_tokens_at_budget'] / bf16_tokens:.2f}x) | {r['max_2k_sequences_at_budget']} | "
              f"{r['tokens_per_s']:.1f} ({r['tokens_per_s'] / base['tokens_per_s']:.2f}x) | "
              f"{r['decode_ms_per_token']:.1f} | " + " | ".join(quality) + " |")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["config"] for r in results]
    panels = [("KV pool tokens at the budget (x float)", [r["capacity_tokens_at_budget"] for r in results]),
              ("capacity-bound throughput (x float)", [r["tokens_per_s"] for r in results]),
              ("weight bytes per rank (x float)", [r["weight_bytes_per_rank"] for r in results]),
              ("batch-1 decode ms/token (x float)", [r["decode_ms_per_token"] for r in results])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (title, values) in zip(axes, panels):
        ratios = [v / values[0] for v in values]
        ax.bar(names, ratios, color=["#888888", "#1f77b4", "#ff7f0e", "#2ca02c"][:len(names)])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        for i, ratio in enumerate(ratios):
            ax.text(i, ratio, f"{ratio:.2f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle("int8 KV cache and int8 weights, ~100M Llama on CPU (shared machine)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 requests, 32-token quality runs")
    parser.add_argument("--num-requests", type=int, help="throughput requests (default 16)")
    parser.add_argument("--pool-mib", type=float, default=64.0,
                        help="KV memory of the throughput runs (64 MiB: ~900 fp32 tokens on this model)")
    parser.add_argument("--kv-budget-gib", type=float, default=1.0, help="budget for the capacity figures")
    parser.add_argument("--quality-tokens", type=int, help="tokens per quality generation (default 96)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens for the batch-1 decode timing")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: stable on a shared machine; the ratios are what count)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "quantization.json")
    args = parser.parse_args(argv)
    args.num_requests = args.num_requests or (8 if args.quick else 16)
    args.quality_tokens = args.quality_tokens or (32 if args.quick else 96)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    routes = matmul_routes()
    tiny = resolve_model(DEFAULT_MODEL)
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        path = build_100m(Path(tmp) / "llama-100m-peaked", tiny, logit_std=LOGIT_STD)
        config = json.loads((path / "config.json").read_text())
        requests = workload(args.num_requests, args.seed, config["vocab_size"], (16, 256), (16, 128))
        quality_prompts = [p for p, _ in workload(3, args.seed + 2, config["vocab_size"], (32, 256), (1, 1))]
        results, reference = [], None
        for name, engine_args in CONFIGS.items():
            result, runs = bench_config(name, path, engine_args, args, requests, quality_prompts, reference)
            reference = reference or runs
            results.append(result)
    budget = int(args.kv_budget_gib * 2**30)
    shape = ModelShape.from_config(config)
    fp32_tokens = budget // (16 * kv_bytes_per_token(shape, Deployment(dtype="float32"))) * 16
    bf16_tokens = budget // (16 * kv_bytes_per_token(shape, Deployment(dtype="bfloat16"))) * 16
    print_table(results, fp32_tokens, bf16_tokens, args.kv_budget_gib)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "torch": torch.__version__, "python": sys.version.split()[0], "machine": platform.machine(),
        "threads": torch.get_num_threads(), "quick": args.quick, "model": "llama-100m, logit_std 7",
        "kv_budget_gib": args.kv_budget_gib, "fp32_cache_tokens_at_budget": fp32_tokens,
        "bf16_cache_tokens_at_budget": bf16_tokens, "pool_mib": args.pool_mib,
        "num_requests": args.num_requests, "quality_tokens": args.quality_tokens,
        "matmul_routes_ms": routes, "results": results,
    }, indent=2))
    plot(results, args.output.with_suffix(".png"))
    print(f"\nwrote {args.output} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
