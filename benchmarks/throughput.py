"""Offline throughput: our engine versus transformers' `generate` on the same model, in the same run.

Workload: `--num-requests` random-token prompts (lengths uniform in [16, 512]) each asking for a number of
new tokens uniform in [16, 256], greedy, EOS ignored, fixed seed. Only the tokens each request asked for
count as useful. transformers runs static left-padded batches (each batch runs until its longest request
is done) at several batch sizes; our engine runs everything at once at its defaults, again capped at
transformers' best batch size, and in two ablations: torch SDPA for decode attention instead of the native
CPU kernel, and the matmuls without the oneDNN-packed copy of the weights. Batch-1 decode speed is the
per-token time of a long generation minus a one-token one (so the prefill cancels out).

Models: the embedded default (`tiny-llama-2-chat`), a ~100M-parameter Llama and a small model with Llama's
proportions (`llama-prop`: GQA, head_dim 64, LM head ~12% of the weights), the last two written with random
weights to a temporary folder. `llama-prop` runs a shorter-context workload (prompts 16-256, outputs 16-128).

Distance to the limit, per run: MFU (useful FLOPs, serving/roofline.py, / elapsed / the rate of a large
square matmul measured in the same run at the benchmark's dtype and thread count: the faster of `torch.mm`
and oneDNN on a packed weight) and, for batch-1 decode, MBU (bytes of weights and KV read per token / time
per token / the bandwidth of a large tensor copy into a buffer already written, measured in the same run,
read + write bytes). Prints a table and writes JSON under benchmarks/results/.

    python benchmarks/throughput.py              # full run
    python benchmarks/throughput.py --quick      # a few minutes: fewer requests, fewer batch sizes
    python benchmarks/throughput.py --quick --models llama-prop   # one model
    python benchmarks/throughput.py --threads 1  # both sides single-threaded: stable on a shared machine
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from serving import LLM, SamplingParams
from serving.capacity import ModelShape
from serving.config import DEFAULT_MODEL
from serving.engine.compiled import CompiledDecode
from serving.layers.packed_weights import can_pack, pack, packed_linear
from serving.models.tiny import resolve_model, write_random_weights
from serving.roofline import decode_bytes_per_token, utilization, workload_flops

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# Llama-2 proportions (MHA, SwiGLU at ~3.3x) scaled to ~100M parameters; the tiny tokenizer's vocabulary.
MODEL_100M = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 768, "intermediate_size": 2560,
    "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 12,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}
# Llama's proportions at small scale: GQA (6 query heads, 2 KV heads of 64), SwiGLU at 8/3, 6 layers, and a
# vocabulary (4096, past the tokenizer's: the extra rows decode to "") that makes the LM head 12.5% of the
# weights, so decode costs are spread over layers, attention and head as in a real model.
MODEL_LLAMA_PROP = dict(MODEL_100M, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=64, vocab_size=4096)
# Each benchmarked model: (prompt length range, output length range; None: 16 to --max-output).
WORKLOADS = {"default": ((16, 512), None), "100m": ((16, 512), None), "llama-prop": ((16, 256), (16, 128))}


def build_random(folder: Path, tokenizer_dir: Path, config: dict, logit_std: float | None = None) -> Path:
    """A checkpoint folder with `config`, the tokenizer's files and seeded random weights."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            (folder / name).write_bytes((tokenizer_dir / name).read_bytes())
    write_random_weights(folder, config, seed=0, logit_std=logit_std)
    return folder


def build_100m(folder: Path, tokenizer_dir: Path, logit_std: float | None = None,
               vocab_size: int | None = None) -> Path:
    """The ~100M model; `vocab_size` (default: the tokenizer's) can be larger: the extra rows decode to ""."""
    vocab = vocab_size or json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    return build_random(folder, tokenizer_dir, dict(MODEL_100M, vocab_size=vocab), logit_std)


def measure_peaks(dtype: torch.dtype, size: int = 2048, copy_mib: int = 256, repeats: int = 5) -> dict:
    """The machine's limits as this process sees them now: best of a few timings of a large square matmul
    (FLOP/s), by torch.mm and, where torch has oneDNN and the dtype is float32, by oneDNN on a packed weight
    (the engine's CPU route, faster than torch.mm here: the peak is the faster of the two), and of a large
    tensor copy (bytes read + written per second)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    routes = {"torch_mm": lambda: torch.mm(a, b)}
    if can_pack(b):
        packed = pack(b)
        routes["onednn_packed"] = lambda: packed_linear(a, packed, None)
    rates = {}
    for name, product in routes.items():
        product()
        rates[name] = 2 * size**3 / min(_timed(product) for _ in range(repeats))
    # Into a buffer written once before: a clone's fresh allocation takes a page fault per 4 KiB page on the
    # CPU, which measured ~7 GB/s here against ~33 GB/s for the copy itself.
    big = torch.randn(copy_mib * 2**20 // dtype.itemsize, dtype=dtype)
    target = torch.zeros_like(big)
    best_copy = min(_timed(lambda: target.copy_(big)) for _ in range(repeats))
    return {"matmul_flops_per_s": max(rates.values()), "matmul_route_flops_per_s": rates,
            "copy_bytes_per_s": 2 * big.numel() * dtype.itemsize / best_copy,
            "matmul_size": size, "copy_mib": copy_mib}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def workload(num_requests: int, seed: int, vocab: int, prompt_range: tuple[int, int],
             output_range: tuple[int, int]) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        length = rng.randint(*prompt_range)
        prompt = [1] + [rng.randrange(3, vocab) for _ in range(length - 1)]
        requests.append((prompt, rng.randint(*output_range)))
    return requests


def run_engine(llm: LLM, requests: list[tuple[list[int], int]]) -> float:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in requests]
    start = time.perf_counter()
    outputs = llm.generate([p for p, _ in requests], params)
    elapsed = time.perf_counter() - start
    assert [len(o.outputs[0].token_ids) for o in outputs] == [n for _, n in requests]
    return elapsed


def run_transformers(model, requests: list[tuple[list[int], int]], batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (prompt, _) in enumerate(batch):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        with torch.inference_mode():
            model.generate(ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=max(n for _, n in batch), do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    return time.perf_counter() - start


def decode_ms_per_token(generate_one, prompt: list[int], new_tokens: int) -> float:
    generate_one(prompt, 1)                                   # warm-up
    start = time.perf_counter()
    generate_one(prompt, 1)
    one = time.perf_counter() - start
    start = time.perf_counter()
    generate_one(prompt, new_tokens + 1)
    many = time.perf_counter() - start
    return (many - one) / new_tokens * 1e3


def bench_transformers(path: Path, requests: list[tuple[list[int], int]], useful: int,
                       args: argparse.Namespace) -> dict:
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    result: dict = {"batches": {}}
    for batch_size in args.batch_sizes:
        seconds = run_transformers(hf, requests, batch_size)
        result["batches"][batch_size] = {"seconds": seconds, "tokens_per_s": useful / seconds}
        print(f"transformers batch {batch_size}: {useful / seconds:8.1f} tok/s ({seconds:.1f}s)", flush=True)

    def one(prompt: list[int], n: int) -> None:
        with torch.inference_mode():
            hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                        max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)

    result["decode_ms"] = decode_ms_per_token(one, requests[0][0][:128], args.decode_tokens)
    return result


def bench_engine(path: Path, requests: list[tuple[list[int], int]], useful: int, args: argparse.Namespace,
                 decode: bool, **engine_args) -> dict:
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    # Warm-up prompts differ from the measured ones, so the prefix cache gives the measured run nothing.
    warmup = workload(4, args.seed + 1, vocab, (16, 64), (4, 8))
    llm = LLM(str(path), **engine_args)
    run_engine(llm, warmup)
    seconds = run_engine(llm, requests)
    result = {"seconds": seconds, "tokens_per_s": useful / seconds,
              "num_preemptions": llm.engine.stats().num_preemptions,
              "attention_backend": llm.engine.executor.runner.attention_backend, **engine_args}
    compiled = llm.engine.executor.runner.decode
    if isinstance(compiled, CompiledDecode):
        result.update(compile_seconds=compiled.compile_seconds, compiled_steps=compiled.steps,
                      recompiles_after_warmup=compiled.recompiles_since_warmup)
    label = ", ".join(f"{k}={v}" for k, v in engine_args.items()) or "defaults"
    print(f"engine ({label}): {useful / seconds:8.1f} tok/s ({seconds:.1f}s)", flush=True)
    if decode:
        def one(prompt: list[int], n: int) -> None:
            llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))

        result["decode_ms"] = decode_ms_per_token(one, requests[0][0][:128], args.decode_tokens)
    return result


def bench_model(name: str, path: Path, args: argparse.Namespace, num_requests: int,
                prompt_range: tuple[int, int], output_range: tuple[int, int]) -> dict:
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    requests = workload(num_requests, args.seed, vocab, prompt_range, output_range)
    useful = sum(n for _, n in requests)
    print(f"\n== {name}: {num_requests} requests, {sum(len(p) for p, _ in requests)} prompt tokens, "
          f"{useful} useful output tokens", flush=True)
    hf = bench_transformers(path, requests, useful, args)
    gc.collect()
    best_bs = max(hf["batches"], key=lambda b: hf["batches"][b]["tokens_per_s"])
    engine = bench_engine(path, requests, useful, args, decode=True)
    gc.collect()
    same_batch = bench_engine(path, requests, useful, args, decode=False, max_num_seqs=best_bs)
    gc.collect()
    # Ablation: the engine with torch SDPA for decodes too, instead of the native CPU kernel.
    sdpa = bench_engine(path, requests, useful, args, decode=False, attention_backend="sdpa")
    gc.collect()
    # Ablation: the matmuls on the plain weights only (torch's GEMM above the small-batch kernel's rows).
    unpacked = bench_engine(path, requests, useful, args, decode=False, packed_weights=False)
    gc.collect()
    # The compile option side by side with the eager defaults (its buckets compile at start, not timed here).
    compiled = bench_engine(path, requests, useful, args, decode=True, compile=True)
    gc.collect()
    result = {"model": name, "num_requests": num_requests, "useful_tokens": useful,
              "prompt_range": prompt_range, "output_range": output_range,
              "transformers": hf["batches"], "transformers_best_batch": best_bs,
              "transformers_decode_ms": hf["decode_ms"], "engine_decode_ms": engine.pop("decode_ms"),
              "engine": engine,
              "engine_same_batch": same_batch, "engine_sdpa": sdpa, "engine_unpacked": unpacked,
              "engine_compiled_decode_ms": compiled.pop("decode_ms"), "engine_compiled": compiled}
    add_utilization(result, ModelShape.load(path), requests, args)
    return result


def add_utilization(result: dict, shape: ModelShape, requests: list[tuple[list[int], int]],
                    args: argparse.Namespace) -> None:
    """MFU of every run and batch-1 decode MBU of both sides, against the peaks measured in this run."""
    peaks = measure_peaks(torch.float32)
    routes = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in peaks["matmul_route_flops_per_s"].items())
    print(f"peaks now: matmul {peaks['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s ({routes}), "
          f"copy {peaks['copy_bytes_per_s'] / 1e9:.1f} GB/s", flush=True)
    flops = workload_flops(shape, [(len(p), n) for p, n in requests])
    result.update(peaks, useful_flops=flops)
    for run in [*result["transformers"].values(), *(result[k] for k in result if k.startswith("engine_")
                                                    and isinstance(result[k], dict)), result["engine"]]:
        run["mfu"] = utilization(flops / run["seconds"], peaks["matmul_flops_per_s"])
    # The batch-1 timing decodes args.decode_tokens after the first request's first 128 prompt tokens.
    context = min(128, len(requests[0][0])) + args.decode_tokens / 2
    per_token = decode_bytes_per_token(shape, context)
    result["decode_bytes_per_token"] = per_token
    for side in ("engine", "transformers"):
        bandwidth = per_token / (result[f"{side}_decode_ms"] / 1e3)
        result[f"{side}_decode_mbu"] = utilization(bandwidth, peaks["copy_bytes_per_s"])


def print_table(results: list[dict]) -> None:
    print("\n| model | run | tokens/s | vs transformers best | MFU |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in results:
        best = r["transformers"][r["transformers_best_batch"]]["tokens_per_s"]
        rows = [(f"transformers static batch {bs}", t) for bs, t in r["transformers"].items()]
        rows += [("engine (defaults)", r["engine"]),
                 (f"engine (max_num_seqs={r['engine_same_batch']['max_num_seqs']})", r["engine_same_batch"]),
                 ("engine (attention_backend=sdpa)", r["engine_sdpa"]),
                 ("engine (packed_weights=False)", r["engine_unpacked"]),
                 ("engine (compile=True)", r["engine_compiled"])]
        for label, t in rows:
            print(f"| {r['model']} | {label} | {t['tokens_per_s']:.1f} | {t['tokens_per_s'] / best:.2f}x | "
                  f"{t['mfu']:.1%} |")
    print("\n| model | batch-1 decode ms/token: engine | transformers | speed-up | MBU: engine | "
          "transformers |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['model']} | {r['engine_decode_ms']:.2f} | {r['transformers_decode_ms']:.2f} | "
              f"{r['transformers_decode_ms'] / r['engine_decode_ms']:.2f}x | {r['engine_decode_mbu']:.1%} | "
              f"{r['transformers_decode_mbu']:.1%} |")
    print("\n| model | batch-1 decode ms/token: eager | compiled | compile s per bucket | "
          "recompiles after warm-up |")
    print("| --- | ---: | ---: | --- | ---: |")
    for r in results:
        c = r["engine_compiled"]
        per_bucket = ", ".join(f"{b}: {t:.1f}" for b, t in c["compile_seconds"].items())
        print(f"| {r['model']} | {r['engine_decode_ms']:.2f} | {r['engine_compiled_decode_ms']:.2f} | "
              f"{per_bucket} | {c['recompiles_after_warmup']} |")
    print("\n| model | peak matmul GFLOP/s (the faster of) | torch.mm | oneDNN packed | copy GB/s | "
          "decode bytes/token |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        routes = {k: f"{v / 1e9:.1f}" for k, v in r["matmul_route_flops_per_s"].items()}
        print(f"| {r['model']} | {r['matmul_flops_per_s'] / 1e9:.1f} | {routes.get('torch_mm', '-')} | "
              f"{routes.get('onednn_packed', '-')} | {r['copy_bytes_per_s'] / 1e9:.1f} | "
              f"{r['decode_bytes_per_token'] / 1e6:.1f} MB |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="32 requests (8 on the 100M model), batch 16 and 32")
    parser.add_argument("--models", nargs="+", choices=tuple(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--num-requests", type=int, help="requests on the default model (default 128)")
    parser.add_argument("--num-requests-100m", type=int,
                        help="requests on the 100M model (default 32: it is ~50x the compute per token)")
    parser.add_argument("--num-requests-llama-prop", type=int,
                        help="requests on the Llama-proportioned model (default 64)")
    parser.add_argument("--batch-sizes", type=int, nargs="+",
                        help="transformers batch sizes (default 16 32 64)")
    parser.add_argument("--max-output", type=int, default=256,
                        help="output lengths are uniform in [16, this]")
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens for the batch-1 decode timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads for both sides (default: torch's)")
    parser.add_argument("--output", type=Path,
                        help="JSON path (default benchmarks/results/throughput-<time>.json)")
    args = parser.parse_args(argv)
    args.num_requests = args.num_requests or (32 if args.quick else 128)
    args.num_requests_100m = args.num_requests_100m or (8 if args.quick else 32)
    args.num_requests_llama_prop = args.num_requests_llama_prop or (16 if args.quick else 64)
    args.batch_sizes = args.batch_sizes or ([16, 32] if args.quick else [16, 32, 64])
    # Both sides run in this process: flush denormals for both (the engine would set it for itself).
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)

    tiny = resolve_model(DEFAULT_MODEL)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        for model in args.models:
            prompts, outputs = WORKLOADS[model]
            ranges = (prompts, outputs or (16, args.max_output))
            if model == "default":
                results.append(bench_model(DEFAULT_MODEL, tiny, args, args.num_requests, *ranges))
            elif model == "100m":
                path = build_100m(Path(tmp) / "llama-100m", tiny)
                results.append(bench_model("llama-100m", path, args, args.num_requests_100m, *ranges))
            else:
                path = build_random(Path(tmp) / model, tiny, MODEL_LLAMA_PROP)
                results.append(bench_model(model, path, args, args.num_requests_llama_prop, *ranges))
    print_table(results)
    output = args.output or RESULTS_DIR / f"throughput-{time.strftime('%Y%m%d-%H%M%S')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({
        "torch": torch.__version__, "python": sys.version.split()[0], "machine": platform.machine(),
        "threads": torch.get_num_threads(), "quick": args.quick, "results": results,
    }, indent=2))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
