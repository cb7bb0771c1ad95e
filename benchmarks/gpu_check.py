"""First contact with a GPU: a verdict per line and a JSON file, in a few minutes.

PASS / FAIL are checks; INFO lines are measurements without a threshold; SKIP says why a check could not run.
Checks, on the embedded tiny model and on a small random Llama with llama3 RoPE scaling (peaked logits, so
top-1 agreement tests arithmetic and not near-ties):
- load in bfloat16 on CUDA, free memory before and after; top-1 vs CPU float32 and no NaN (tiny model);
- parity on mixed steps (a prompt chunked past max_num_batched_tokens, a prefix-cache hit, decodes running
  beside prefill chunks) for SDPA and, when it imports, flash-attn at block 256: teacher-forced top-1
  agreement of the engine's greedy tokens with transformers on the same device and with transformers in CPU
  float32, no NaN log-probability;
- a clean error for flash-attn in float32; seeded sampling equal on CPU and CUDA (float32);
- memory: a full max_num_seqs decode with one long context under the KV budget's bound (weights + pool + the
  profiled worst-case step, serving/engine/kv_profile.py), no OOM;
- the host syncs of one decode step (`torch.cuda.set_sync_debug_mode("warn")`), counted, with their lines;
- decode speed eager vs compiled, and vs CUDA graphs when EngineConfig has a graph option; throughput vs
  transformers' static-batch generate; batch-1 decode bandwidth utilization (MBU) of a ~0.8B model against a
  measured device clone.

    bash benchmarks/gpu_check.sh [--output PATH]
Without a CUDA device it prints "no CUDA device" and exits 0 with nothing checked. The check functions take
a device, so tests/engine/test_gpu_check.py runs them on CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.throughput import run_engine, run_transformers, workload
from serving import LLM, SamplingParams
from serving.capacity import ModelShape
from serving.config import DEFAULT_MODEL, EngineConfig
from serving.engine.sequence import Request
from serving.layers.flash_backend import load_flash_attn
from serving.models.tiny import resolve_model
from serving.roofline import decode_bytes_per_token, utilization
from tests.fixtures.checkpoints import LLAMA3_ROPE_SCALING, PEAKED_LOGIT_STD, write_llama_checkpoint

PROMPTS = ["The quick brown fox", "Once upon a time", "In a hole in the ground there lived", "1 2 3 4 5"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=1)
# The llama3-RoPE model: GQA (6 heads over 2), untied, long enough positions for a long-context decode.
LLAMA3 = {"hidden_size": 192, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 32,
          "intermediate_size": 512, "num_hidden_layers": 3, "tie_word_embeddings": False, "rope_theta": 500000.0,
          "max_position_embeddings": 8192, "rope_scaling": LLAMA3_ROPE_SCALING}
# The MBU model (~0.8B parameters, 1.6 GB in bf16): big enough that a decode step is mostly weight reads.
MBU_MODEL = {"hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
             "intermediate_size": 5632, "num_hidden_layers": 12, "tie_word_embeddings": False, "vocab_size": 32000,
             "max_position_embeddings": 2048}
# Teacher-forced top-1 agreement a parity check needs: exact in float32; bf16 flips rare near-ties.
MIN_AGREEMENT = {torch.float32: 1.0, torch.bfloat16: 0.97, torch.float16: 0.97}


class Report:
    def __init__(self, output: Path | None = None, **header) -> None:
        """With `output`: the JSON file, rewritten at every verdict (a run cut short keeps what it found)."""
        self.checks: list[dict] = []
        self.output, self.header = output, header

    def verdict(self, name: str, ok: bool | None, **details) -> None:
        """ok: PASS / FAIL; None: INFO (a measurement), or SKIP when details give a `reason`."""
        label = ("SKIP" if "reason" in details else "INFO") if ok is None else "PASS" if ok else "FAIL"
        self.checks.append({"check": name, "verdict": label, **details})
        print(f"{label} {name} {json.dumps(details, default=str)}", flush=True)
        if self.output is not None:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self.output.write_text(json.dumps({**self.header, "checks": self.checks}, indent=2, default=str))

    @contextlib.contextmanager
    def guard(self, name: str) -> Iterator[None]:
        """A check that raises is a FAIL line, and the next checks still run."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 (any failure is this check's verdict)
            self.verdict(name, False, error=repr(exc)[:500])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_models(folder: Path, tiny_dir: Path, mbu: bool = True) -> dict[str, Path]:
    """The llama3-RoPE parity model (and the MBU model) with the tiny model's tokenizer."""
    models = {"llama3": write_llama_checkpoint(folder / "llama3", tiny_dir, seed=3, logit_std=PEAKED_LOGIT_STD,
                                               **LLAMA3)}
    if mbu:
        models["mbu"] = write_llama_checkpoint(folder / "mbu", tiny_dir, seed=5, **MBU_MODEL)
    return models


def hf_model(path: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    attention = "eager" if device.type == "cpu" else "sdpa"
    return LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention).to(device).eval()


def random_prompt(length: int, seed: int, vocab: int = 1000) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, vocab, (length - 1,), generator=generator).tolist()


def mixed_waves(max_num_batched_tokens: int, block_size: int) -> list[list[tuple[list[int], int]]]:
    """Two waves of (prompt, new tokens): a prompt longer than the step budget beside short prompts that
    decode while it is chunked; then a prompt sharing its first whole blocks (a prefix-cache hit), again with
    short ones beside it."""
    long = random_prompt(2 * max_num_batched_tokens + 37, seed=1)
    shared = (2 * max_num_batched_tokens) // block_size * block_size
    first = [(long, 8)] + [(random_prompt(n, seed=10 + n), 12) for n in (5, 17, 40)]
    second = [(long[:shared] + random_prompt(29, seed=2)[1:], 8)] + [(random_prompt(n, seed=20 + n), 12)
                                                                     for n in (9, 23)]
    return [first, second]


@dataclass
class MixedRun:
    prompts: list[list[int]]
    tokens: list[list[int]]         # greedy tokens of each request
    nan: bool                       # a NaN log-probability among them
    mixed_steps: int                # steps that ran a prefill chunk and a decode together
    chunked: bool                   # a prompt took more than one step
    prefix_hits: int                # tokens served from the prefix cache


def run_mixed(llm: LLM, waves: list[list[tuple[list[int], int]]]) -> MixedRun:
    """Each wave's requests added at once and stepped to the end, watching what every step advanced."""
    engine = llm.engine
    hits_before = engine.stats().prefix_cache_hits
    prompts, tokens, nan, mixed, chunked = [], [], False, 0, False
    for w, wave in enumerate(waves):
        requests: list[Request] = []
        for i, (prompt, n) in enumerate(wave):
            request = engine.make_request(f"mixed-{w}-{i}", prompt,
                                          SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=1))
            engine.add(request)
            requests.append(request)
        seqs = [r.seqs[0] for r in requests]
        steps_in_prefill = [0] * len(seqs)
        outputs = {}
        while engine.has_unfinished_requests():
            before = [(s.num_computed_tokens, s.num_prompt_tokens, s.finished) for s in seqs]
            for output in engine.step():
                outputs[output.request_id] = output
            grew = [(s.num_computed_tokens - c, c < p) for s, (c, p, done) in zip(seqs, before) if not done]
            prefilling = [prefill for delta, prefill in grew if delta > 0]
            mixed += any(prefilling) and not all(prefilling)
            for j, (s, (c, p, _)) in enumerate(zip(seqs, before)):
                steps_in_prefill[j] += s.num_computed_tokens > c and c < p
        chunked |= max(steps_in_prefill) > 1
        for request in requests:
            out = outputs[request.request_id].outputs[0]
            prompts.append(request.prompt_token_ids)
            tokens.append(out.token_ids)
            nan |= any(math.isnan(v) for entry in out.logprobs for v in entry.values())
    return MixedRun(prompts, tokens, nan, mixed, chunked, engine.stats().prefix_cache_hits - hits_before)


@torch.inference_mode()
def top1_agreement(hf: torch.nn.Module, prompts: list[list[int]], tokens: list[list[int]]) -> float:
    """Share of generated tokens that are transformers' argmax given the same preceding tokens (teacher
    forcing: one early flip does not count every later token as a miss)."""
    device = next(hf.parameters()).device
    same = total = 0
    for prompt, out in zip(prompts, tokens):
        ids = torch.tensor([prompt + out[:-1]], device=device)
        predicted = hf(ids).logits[0, len(prompt) - 1:].argmax(-1).tolist()
        same += sum(a == b for a, b in zip(predicted, out))
        total += len(out)
    return same / total


def mixed_parity(report: Report, name: str, llm: LLM, references: dict[str, torch.nn.Module]) -> MixedRun:
    """The verdict on one engine's mixed steps against each reference model."""
    config = llm.engine.config
    run = run_mixed(llm, mixed_waves(config.max_num_batched_tokens, config.block_size))
    agreement = {ref: top1_agreement(hf, run.prompts, run.tokens) for ref, hf in references.items()}
    need = MIN_AGREEMENT[llm.engine.executor.runner.dtype]
    ok = (not run.nan and run.chunked and run.prefix_hits > 0 and run.mixed_steps > 0
          and all(a >= need for a in agreement.values()))
    stats = llm.engine.stats()
    report.verdict(f"mixed-step parity {name}", ok, top1=agreement, min_top1=need, nan=run.nan,
                   mixed_steps=run.mixed_steps, chunked_prefill=run.chunked, prefix_hit_tokens=run.prefix_hits,
                   decode_path=stats.decode_path, bucketed_decode_steps=stats.bucketed_decode_steps)
    return run


def full_decode(llm: LLM, long_prompt_len: int, new_tokens: int) -> list[list[int]]:
    """max_num_seqs sequences decoding together, one of them with a long context."""
    rows = llm.engine.config.max_num_seqs
    prompts = [random_prompt(long_prompt_len, seed=3)] + [random_prompt(8 + i % 32, seed=100 + i)
                                                          for i in range(rows - 1)]
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@contextlib.contextmanager
def host_sync_sites(device: torch.device) -> Iterator[list[str]]:
    """The synchronizing CUDA calls made inside the block, each as the innermost line of serving/ code that
    made it (torch's sync debug mode warns at each one)."""
    sites: list[str] = []
    serving = ROOT / "serving"

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        ours = [f for f in traceback.extract_stack() if Path(f.filename).is_relative_to(serving)]
        where = f"{Path(ours[-1].filename).relative_to(ROOT)}:{ours[-1].lineno} {ours[-1].line}" if ours \
            else f"{filename}:{lineno}"
        sites.append(f"{where} ({str(message).splitlines()[0][:80]})")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")


def decode_step_syncs(llm: LLM, device: torch.device, rows: int = 4) -> list[str]:
    """The host syncs of one pure decode step of `rows` sequences."""
    engine = llm.engine
    requests = [engine.make_request(f"sync-{i}", random_prompt(20 + i, seed=200 + i),
                                    SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
                for i in range(rows)]
    for request in requests:
        engine.add(request)
    while any(r.seqs[0].num_output_tokens < 2 for r in requests):
        engine.step()
    sync(device)
    with host_sync_sites(device) as sites:
        engine.step()
    for request in requests:
        engine.abort_request(request.request_id)
    return sites


def graph_option() -> tuple[dict, dict] | None:
    """(eager, graph) EngineConfig settings, when EngineConfig has the CUDA-graph option."""
    if "cuda_graphs" in {f.name for f in dataclasses.fields(EngineConfig)}:
        return {"cuda_graphs": False}, {"cuda_graphs": True}
    return None


def decode_ms(llm: LLM, device: torch.device, tokens: int = 64, prompt: list[int] | str = PROMPTS[0]) -> float:
    """Per-token batch-1 decode time: a long generation minus a one-token one (the prefill cancels)."""
    def once(n: int) -> float:
        start = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        sync(device)
        return time.perf_counter() - start

    once(tokens + 1)
    return (once(tokens + 1) - once(1)) / tokens * 1e3


def throughput_vs_transformers(path: Path, device: torch.device, dtype: torch.dtype, num_requests: int,
                               prompt_range: tuple[int, int], output_range: tuple[int, int]) -> dict:
    """Tokens/s of our engine and of transformers' generate over one static batch of the same requests."""
    requests = workload(num_requests, 0, 1000, prompt_range, output_range)
    useful = sum(n for _, n in requests)
    llm = LLM(str(path), device=str(device), dtype=str(dtype).removeprefix("torch."))
    run_engine(llm, requests[:2])
    engine_s = run_engine(llm, requests)
    del llm
    hf = hf_model(path, device, dtype)
    run_transformers(hf, requests[:2], 2)
    hf_s = run_transformers(hf, requests, len(requests))
    return {"engine_tok_s": useful / engine_s, "transformers_tok_s": useful / hf_s, "ratio": hf_s / engine_s}


def copy_bandwidth(device: torch.device, nbytes: int = 2**30) -> float:
    """Bytes read + written per second by a large clone, best of three."""
    big = torch.empty(nbytes, dtype=torch.uint8, device=device)
    big.clone()
    best = math.inf
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        big.clone()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def memory_checks(report: Report, path: Path, device: torch.device) -> None:
    """A full max_num_seqs decode with one long context against the profiled KV budget."""
    mib = 2**20
    free_before = torch.cuda.mem_get_info(device)[0]
    llm = LLM(str(path), device=str(device), dtype="bfloat16", attention_backend="sdpa", max_num_seqs=256)
    runner = llm.engine.executor.runner
    profile = runner.step_profile
    report.verdict("KV budget from a profiled worst-case step", profile is not None and runner.num_kv_blocks > 1,
                   free_mib_before_load=free_before / mib, profile={k: v / mib for k, v in
                                                                   dataclasses.asdict(profile).items()},
                   kv_pool_mib=runner.kv_pool.nbytes / mib, kv_blocks=runner.num_kv_blocks,
                   workspace_mib=runner.backend.workspace_bytes / mib)
    torch.cuda.reset_peak_memory_stats(device)
    with report.guard("full max_num_seqs decode, one long context"):
        out = full_decode(llm, long_prompt_len=7000, new_tokens=16)
        peak, bound = torch.cuda.max_memory_allocated(device), profile.bound(runner.kv_pool.nbytes)
        report.verdict("full max_num_seqs decode, one long context", len(out) == 256 and peak <= bound,
                       peak_allocated_mib=peak / mib, bound_mib=bound / mib,
                       free_mib_after=torch.cuda.mem_get_info(device)[0] / mib)


def decode_speed_checks(report: Report, mbu_model: Path, tiny: Path, flash: bool, device: torch.device) -> None:
    """Batch-1 decode: eager vs compiled (tiny model), eager vs CUDA graphs (the MBU model on flash-attn at
    block 256: graphs need a graph-safe backend, which SDPA is not), and bandwidth utilization of each."""
    cuda_bf16 = {"device": str(device), "dtype": "bfloat16"}
    option = graph_option()
    eager = option[0] if option else {}
    # One batch bucket (max_num_seqs=1): compile=True compiles every bucket at start.
    speeds = {"tiny_eager_ms": decode_ms(LLM(str(tiny), **cuda_bf16), device),
              "tiny_compiled_ms": decode_ms(LLM(str(tiny), **cuda_bf16, compile=True, max_num_seqs=1), device),
              "mbu_sdpa_eager_ms": decode_ms(LLM(str(mbu_model), **cuda_bf16, attention_backend="sdpa"), device)}
    flash_bf16 = dict(cuda_bf16, attention_backend="flash_attn", block_size=256)
    if flash:
        speeds["mbu_flash_eager_ms"] = decode_ms(LLM(str(mbu_model), **flash_bf16, **eager), device)
    if option is None:
        report.verdict("decode eager vs CUDA graphs", None, reason="skipped: no graph option")
    elif not flash:
        report.verdict("decode eager vs CUDA graphs", None, reason="graphs need flash_attn (graph-safe), which "
                       "does not import")
    else:
        graphed = LLM(str(mbu_model), **flash_bf16, **option[1])
        speeds["mbu_flash_graphs_ms"] = decode_ms(graphed, device)
        stats = graphed.engine.stats()
        report.verdict("decode eager vs CUDA graphs", stats.decode_path == "cuda_graphs"
                       and stats.bucketed_decode_steps > 0, decode_path=stats.decode_path,
                       graph_steps=stats.bucketed_decode_steps, eager_tok_s=1e3 / speeds["mbu_flash_eager_ms"],
                       graph_tok_s=1e3 / speeds["mbu_flash_graphs_ms"])
        del graphed
    report.verdict("batch-1 decode ms per token", None, **speeds)
    bandwidth = copy_bandwidth(device)
    per_token = decode_bytes_per_token(ModelShape.load(mbu_model), 40, dtype="bfloat16")
    report.verdict("batch-1 decode MBU (mbu model)", None, clone_bytes_per_s=bandwidth, bytes_per_token=per_token,
                   goal=0.65, **{name.removesuffix("_ms"): utilization(per_token / (ms / 1e3), bandwidth)
                                 for name, ms in speeds.items() if name.startswith("mbu_")})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing checked")
        return 0
    started = time.perf_counter()
    report = Report(args.output, device=torch.cuda.get_device_name(), torch=torch.__version__)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        run_checks(report, Path(folder))
    report.verdict("whole check under 5 minutes", time.perf_counter() - started < 300,
                   seconds=time.perf_counter() - started)
    print(f"wrote {args.output}")
    return 1 if any(c["verdict"] == "FAIL" for c in report.checks) else 0


def run_checks(report: Report, folder: Path) -> None:
    """Every check on the CUDA device, the models written under `folder`."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    tiny = resolve_model(DEFAULT_MODEL)
    models = write_models(folder, tiny)
    reference = [o.outputs[0].token_ids for o in LLM(str(tiny), device="cpu", dtype="float32").generate(
        PROMPTS, GREEDY)]
    references = {"transformers cpu fp32": hf_model(models["llama3"], cpu, torch.float32),
                  "transformers cuda bf16": hf_model(models["llama3"], cuda, torch.bfloat16)}
    flash, why_not_flash = load_flash_attn()
    backends = ["sdpa"] + (["flash_attn"] if flash is not None else [])
    for backend in backends:
        block_size = 256 if backend == "flash_attn" else 16
        before = torch.cuda.mem_get_info()[0]
        with report.guard(f"load bf16 {backend}"):
            llm = LLM(str(tiny), device="cuda", dtype="bfloat16", attention_backend=backend, block_size=block_size)
            report.verdict(f"load bf16 {backend}", True, free_bytes_before=before,
                           free_bytes_after=torch.cuda.mem_get_info()[0])
            got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
            first = sum(a[0] == b[0] for a, b in zip(got, reference)) / len(PROMPTS)
            same = sum(x == y for a, b in zip(got, reference) for x, y in zip(a, b)) / sum(map(len, reference))
            report.verdict(f"top-1 vs CPU fp32 {backend}", first == 1.0, first_token=first, all_tokens=same)
            del llm
        with report.guard(f"llama3 RoPE load bf16 {backend}"):
            before = torch.cuda.mem_get_info()[0]
            llm = LLM(str(models["llama3"]), device="cuda", dtype="bfloat16", attention_backend=backend,
                      block_size=block_size, max_num_batched_tokens=256, max_num_seqs=8)
            report.verdict(f"llama3 RoPE load bf16 {backend}", True, free_bytes_before=before,
                           free_bytes_after=torch.cuda.mem_get_info()[0])
            mixed_parity(report, f"llama3 bf16 {backend} block {block_size}", llm, references)
            del llm
    if "flash_attn" in backends:
        try:
            LLM(str(tiny), device="cuda", dtype="float32", attention_backend="flash_attn", block_size=256)
            report.verdict("flash-attn fp32 refused", False, error="loaded")
        except ValueError as exc:
            report.verdict("flash-attn fp32 refused", True, error=str(exc))
    else:
        report.verdict("flash-attn fp32 refused", None, reason=why_not_flash)
    with report.guard("seeded sampling CPU == CUDA (fp32)"):
        seeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=1234)
        on_cpu = [o.outputs[0].token_ids for o in LLM(str(tiny), device="cpu").generate(PROMPTS, seeded)]
        on_cuda = [o.outputs[0].token_ids for o in LLM(str(tiny), device="cuda", dtype="float32").generate(
            PROMPTS, seeded)]
        report.verdict("seeded sampling CPU == CUDA (fp32)", on_cpu == on_cuda)
    gc.collect()   # the engines above, before the memory checks read free memory
    torch.cuda.empty_cache()
    with report.guard("memory"):
        memory_checks(report, models["llama3"], cuda)
    with report.guard("host syncs of one decode step"):
        sites = decode_step_syncs(LLM(str(models["llama3"]), device="cuda", dtype="bfloat16"), cuda)
        report.verdict("host syncs of one decode step", None, count=len(sites), sites=sites)
    with report.guard("throughput vs transformers"):
        report.verdict("throughput vs transformers (static batch)", None, **throughput_vs_transformers(
            models["llama3"], cuda, torch.bfloat16, 32, (16, 256), (16, 128)))
    with report.guard("batch-1 decode speed"):
        decode_speed_checks(report, models["mbu"], tiny, flash is not None, cuda)


if __name__ == "__main__":
    sys.exit(main())
