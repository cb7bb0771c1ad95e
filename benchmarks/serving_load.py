"""Serving overhead under load: N concurrent streaming HTTP clients against the Ray Serve stack, versus the same
workload on the in-process AsyncLLMEngine, in the same run and with the same engine settings.

Each level runs on the in-process engine and right after on the server, so both see the same background
load. Workload per concurrency level N: `max(N * rounds, min_requests)` requests, each a random-token prompt
(length uniform in [32, 256]) asking for a number of new tokens uniform in [32, 128], greedy, EOS ignored,
fixed seed, at most N in flight. The server is one LLM replica with mosaic-serve's default CPU share (the
cores less one, which the proxy, the ingress and the clients need) behind the ingress, at its default settings (a busy replica sends a stream's tokens in small groups, see
`stream_items_per_s`), reached over loopback HTTP on the port the ingress replica serves itself, as `mosaic-serve`
runs it (`--via-proxy`: through Ray Serve's proxy, as on a cluster), with SSE on `/v1/completions` with token-id prompts (so
neither side tokenizes). Per-token latencies on the server side come from the chunks' running usage
(`continuous_usage_stats`). Reported per level: generated tokens/s of each and their ratio (goal >= 0.9),
time to first token and inter-token latency p50/p99 of each. The in-process engine runs the same engine
settings, torch threads included (`--engine-threads` to change that).

    python benchmarks/serving_load.py                       # concurrency 1 4 16 32
    python benchmarks/serving_load.py --concurrency 1 4 16 --rounds 2 --min-requests 8   # small and quick
    python benchmarks/serving_load.py --hops    # also on the LLM replica's handle: the cost of each hop
    python benchmarks/serving_load.py --pin     # the engine on core 0, everything else on core 1
    python benchmarks/serving_load.py --via-proxy   # clients -> Ray Serve's proxy -> ingress (the cluster path)

`--pin` gives the engine a core of its own, as on a GPU node where the HTTP path does not compete with it,
with the same thread layout on both sides: the engine's step thread and the event loop that feeds it share
core 0. For the server that is the LLM replica's process (its loop also serves the transport), while every
other process of this Ray session (proxy, ingress, controller, raylet, GCS) and the clients in this process
run on core 1; in process, this whole process (engine, its loop and the clients, whose per-token work is
small) moves to core 0 while the in-process level runs and back to core 1 for the server's. (With the step
thread alone on core 0 and its loop on core 1, the in-process engine ran slower than unpinned: every step
hands the GIL across cores.)

Writes benchmarks/results/serving_load.json and serving_load.png (throughput and latency charts).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from serving.config import EngineConfig

RESULTS_DIR = Path(__file__).resolve().parent / "results"
APP = "bench"


@dataclass
class Sample:
    ttft: float
    gaps: list[float] = field(default_factory=list)   # one per generated token after the first
    tokens: int = 0


@dataclass
class Level:
    concurrency: int
    wall_s: float
    samples: list[Sample]

    @property
    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall_s

    def summary(self) -> dict:
        ttft = sorted(s.ttft for s in self.samples)
        gaps = sorted(g for s in self.samples for g in s.gaps)
        return {"concurrency": self.concurrency, "requests": len(self.samples), "wall_s": round(self.wall_s, 3),
                "tokens": sum(s.tokens for s in self.samples), "tokens_per_s": round(self.tokens_per_s, 1),
                "ttft_p50_ms": _ms(_pct(ttft, 50)), "ttft_p99_ms": _ms(_pct(ttft, 99)),
                "itl_p50_ms": _ms(_pct(gaps, 50)), "itl_p99_ms": _ms(_pct(gaps, 99))}


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


def workload(n: int, seed: int, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    # Token ids from the vocabulary's body (past the special and byte tokens), BOS first.
    return [([1] + [rng.randrange(300, vocab) for _ in range(rng.randint(32, 256) - 1)], rng.randint(32, 128))
            for _ in range(n)]


async def _run_level(concurrency: int, requests: list[tuple[list[int], int]],
                     one: Callable[[list[int], int], Awaitable[Sample]]) -> Level:
    semaphore = asyncio.Semaphore(concurrency)

    async def limited(prompt: list[int], max_tokens: int) -> Sample:
        async with semaphore:
            return await one(prompt, max_tokens)

    start = time.perf_counter()
    samples = await asyncio.gather(*(limited(p, m) for p, m in requests))
    return Level(concurrency, time.perf_counter() - start, list(samples))


class Recorder:
    """Times one request's tokens as their running count grows: k tokens arriving `gap` after the previous
    ones count as k inter-token gaps of gap/k (a group is as fast, per token, as its arrival rate)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.sample: Sample | None = None

    def tokens(self, total: int) -> None:
        now = time.perf_counter()
        new = total - (self.sample.tokens if self.sample else 0)
        if new <= 0:
            return
        if self.sample is None:
            self.sample = Sample(ttft=now - self.start)
            new -= 1
        self.sample.gaps.extend([(now - self.last) / max(1, new)] * new)
        self.sample.tokens = total
        self.last = now


def _descendants(pid: int) -> list[int]:
    """`pid`'s child processes, their children, and so on (Ray's raylet, GCS and workers under the driver)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _pin_process(pid: int, cores: set[int]) -> None:
    """Every thread of `pid` on `cores` (sched_setaffinity on a pid moves only its main thread); threads
    started later inherit it from their creator."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):
            pass  # a thread that just ended


def pin_server(app_name: str) -> int:
    """The server side of `--pin`: the LLM replica's process on core 0, the rest of this Ray session and this
    process on core 1. Returns the replica's pid."""
    replica = None
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        is_replica = cmdline.startswith(f"ray::ServeReplica:{app_name}:LLMServer".encode())
        replica = pid if is_replica else replica
        _pin_process(pid, {0} if is_replica else {1})
    if replica is None:
        raise RuntimeError("--pin: no LLM replica process found among this Ray session's processes")
    _pin_process(os.getpid(), {1})
    return replica


async def measure(engine_config: EngineConfig, base_url: str, model: str, levels: list[tuple[int, list]],
                  hops: bool, pin: bool = False) -> dict[str, list[Level]]:
    """Each level on the in-process engine, then at once on the server (and with `hops`, in between, on the
    LLM replica's handle: Ray's transport without the proxy, the ingress and SSE): every path of a level
    runs under the same background load."""
    import aiohttp

    from serving.engine.async_engine import AsyncLLMEngine
    from serving.sampling_params import SamplingParams

    engine = AsyncLLMEngine(engine_config)
    request_ids = iter(range(10**9))

    async def in_process(prompt: list[int], max_tokens: int) -> Sample:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        recorder = Recorder()
        async for out in engine.generate(prompt, params, f"r{next(request_ids)}"):
            recorder.tokens(len(out.outputs[0].token_ids))
        return recorder.sample

    session = aiohttp.ClientSession(base_url, connector=aiohttp.TCPConnector(limit=0),
                                    timeout=aiohttp.ClientTimeout(total=600))

    async def server(prompt: list[int], max_tokens: int) -> Sample:
        # continuous_usage_stats: every chunk carries the running token count.
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        recorder = Recorder()
        async with session.post("/v1/completions", json=body) as r:
            r.raise_for_status()
            async for raw in r.content:
                if raw.startswith(b"data: {"):
                    recorder.tokens(json.loads(raw[6:])["usage"]["completion_tokens"])
        return recorder.sample

    async def replica(prompt: list[int], max_tokens: int) -> Sample:
        params = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        recorder = Recorder()
        async for deltas in llm_handle.generate.remote(f"h{next(request_ids)}", prompt, params):
            recorder.tokens(deltas[-1].num_tokens)
        return recorder.sample

    paths = {"in_process": in_process, **({"replica": replica} if hops else {}), "server": server}
    if hops:
        from ray import serve

        from serving.api.backends import streaming

        # The same transport as the ingress's.
        llm_handle = streaming(serve.get_deployment_handle("LLMServer", app_name=APP))
    try:
        warm_up = levels[0][1][:2]
        for one in paths.values():
            await _run_level(1, warm_up, one)
        results: dict[str, list[Level]] = {name: [] for name in paths}
        for concurrency, requests in levels:
            for name, one in paths.items():
                if pin:
                    _pin_process(os.getpid(), {0} if name == "in_process" else {1})
                results[name].append(await _run_level(concurrency, requests, one))
        return results
    finally:
        await session.close()
        await engine.shutdown()


def hop_costs(in_process: list[dict], replica: list[dict], server: list[dict]) -> list[dict]:
    """Per level, the p50 TTFT and inter-token latency each hop adds: Ray's transport from the LLM replica
    (replica handle - in process), then the HTTP path ([proxy,] ingress, SSE: server - replica handle)."""
    return [{"concurrency": a["concurrency"],
             **{f"{m}_transport_ms": round(b[f"{m}_p50_ms"] - a[f"{m}_p50_ms"], 2) for m in ("ttft", "itl")},
             **{f"{m}_http_ms": round(c[f"{m}_p50_ms"] - b[f"{m}_p50_ms"], 2) for m in ("ttft", "itl")}}
            for a, b, c in zip(in_process, replica, server)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for key, color, marker in (("in_process", "C0", "o"), ("server", "C1", "s")):
        rows = results[key]
        x = [r["concurrency"] for r in rows]
        label = key.replace("_", "-")
        axes[0].plot(x, [r["tokens_per_s"] for r in rows], marker=marker, color=color, label=label)
        for ax, metric in ((axes[1], "ttft"), (axes[2], "itl")):
            ax.plot(x, [r[f"{metric}_p50_ms"] for r in rows], marker=marker, color=color, label=f"{label} p50")
            ax.plot(x, [r[f"{metric}_p99_ms"] for r in rows], marker=marker, color=color, linestyle=":",
                    label=f"{label} p99")
    for ax, title, unit in ((axes[0], "generated tokens/s", "tokens/s"), (axes[1], "time to first token", "ms"),
                            (axes[2], "inter-token latency", "ms")):
        ax.set_title(title)
        ax.set_xlabel("concurrent streaming clients")
        ax.set_ylabel(unit)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ratios = ", ".join(f"N={r['concurrency']}: {r['throughput_ratio']:.2f}" for r in results["comparison"])
    fig.suptitle(f"mosaic-serve over HTTP vs in-process engine ({results['model']}); throughput ratio {ratios}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama-2-chat")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--rounds", type=int, default=3, help="requests per client at each level")
    parser.add_argument("--min-requests", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine-threads", type=int,
                        help="torch threads of the in-process engine (default: the server replica's CPU share, "
                             "so both run the same engine settings)")
    parser.add_argument("--hops", action="store_true",
                        help="also time the LLM replica's handle directly, to split the serving path's cost into "
                             "Ray's transport and the HTTP path (proxy, ingress, SSE)")
    parser.add_argument("--pin", action="store_true",
                        help="the engine on core 0 and everything else on core 1, in both runs (see above)")
    parser.add_argument("--via-proxy", action="store_true",
                        help="clients reach the ingress through Ray Serve's proxy (as on a cluster, `mosaic-serve "
                             "--address`), not on the port the ingress serves itself (as `mosaic-serve` alone)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "serving_load.json")
    args = parser.parse_args()
    if args.pin and not {0, 1} <= os.sched_getaffinity(0):
        parser.error("--pin needs cores 0 (the engine) and 1 (the rest)")

    from serving.app_config import AppConfig
    from serving.deployment import build_app
    from serving.models.loader import load_config
    from serving.models.tiny import resolve_model
    from serving.replicas.placement import default_llm_cpus

    vocab = load_config(resolve_model(args.model)).vocab_size
    levels = [(c, workload(max(c * args.rounds, args.min_requests), args.seed + c, vocab)) for c in args.concurrency]
    max_seqs = max(args.concurrency)
    # Room for every sequence at its longest (256 + 128 tokens), so neither side preempts.
    num_kv_blocks = max_seqs * (384 // 16 + 1)
    # The replica gets mosaic-serve's default share: the cores less one for the HTTP path.
    app = AppConfig(model=args.model, num_replicas=1, llm_num_cpus=default_llm_cpus(1), max_num_seqs=max_seqs,
                    max_waiting_requests=max(64, max_seqs), num_kv_blocks=num_kv_blocks, embedding_model="none",
                    ingress_num_cpus=0.5, insecure_no_auth=True)  # loopback only, no keys to measure
    threads = args.engine_threads or int(app.llm_num_cpus)
    torch.set_num_threads(threads)

    import ray
    from ray import serve

    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp"))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(include_dashboard=False, num_cpus=int(app.llm_num_cpus) + 2, object_store_memory=200 * 1024 * 1024,
                 _temp_dir=str(ray_tmp), log_to_driver=False)
        port = _free_port()
        print("starting the server ...", flush=True)
        if args.via_proxy:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(app), name=APP, route_prefix="/")
        else:
            serve.start(proxy_location="Disabled")
            serve.run(build_app(app, listen=("127.0.0.1", port)), name=APP, route_prefix="/")
        if args.pin:
            print(f"pinned: LLM replica (pid {pin_server(APP)}) on core 0, the rest on core 1", flush=True)
        print(f"measuring: in-process engine ({threads} torch threads) then server (replica with "
              f"{app.llm_num_cpus:g} CPUs), level by level ...", flush=True)
        paths = asyncio.run(measure(app.engine_config(), f"http://127.0.0.1:{port}",
                                    app.engine_config().served_model_name, levels, args.hops, args.pin))
        in_process, server = paths["in_process"], paths["server"]
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)

    results = {
        "benchmark": "serving_load", "model": args.model, "in_process_torch_threads": threads,
        "server_replica_cpus": app.llm_num_cpus, "cpus": os.cpu_count(), "pinned": args.pin, "via_proxy": args.via_proxy,
        "load_average": os.getloadavg(),
        "platform": platform.platform(), "python": sys.version.split()[0],
        "workload": {"prompt_tokens": [32, 256], "max_tokens": [32, 128], "greedy": True, "ignore_eos": True,
                     "rounds": args.rounds, "min_requests": args.min_requests, "seed": args.seed},
        "in_process": [lv.summary() for lv in in_process], "server": [lv.summary() for lv in server],
    }
    results["comparison"] = [
        {"concurrency": a.concurrency, "throughput_ratio": round(b.tokens_per_s / a.tokens_per_s, 3)}
        for a, b in zip(in_process, server)
    ]
    if args.hops:
        results["replica"] = [lv.summary() for lv in paths["replica"]]
        results["hops"] = hop_costs(results["in_process"], results["replica"], results["server"])
    header = (f"{'N':>4} {'engine tok/s':>12} {'server tok/s':>12} {'ratio':>6} | {'TTFT p50/p99 ms (engine)':>25} "
              f"{'(server)':>17} | {'ITL p50/p99 ms (engine)':>24} {'(server)':>15}")
    print(header)
    for a, b, c in zip(results["in_process"], results["server"], results["comparison"]):
        print(f"{a['concurrency']:>4} {a['tokens_per_s']:>12.1f} {b['tokens_per_s']:>12.1f} {c['throughput_ratio']:>6.2f} | "
              f"{a['ttft_p50_ms']:>12.1f}/{a['ttft_p99_ms']:<12.1f} {b['ttft_p50_ms']:>8.1f}/{b['ttft_p99_ms']:<8.1f} | "
              f"{a['itl_p50_ms']:>11.2f}/{a['itl_p99_ms']:<12.2f} {b['itl_p50_ms']:>7.2f}/{b['itl_p99_ms']:<7.2f}")
    if args.hops:
        print("\nWhere the time goes (p50, ms added by each hop over the one before it):")
        http = "proxy+ingress+SSE" if args.via_proxy else "ingress+SSE"
        print(f"{'N':>4} {'TTFT: replica handle':>21} {http:>18} | {'ITL: replica handle':>20} {http:>18}")
        for h in results["hops"]:
            print(f"{h['concurrency']:>4} {h['ttft_transport_ms']:>21.2f} {h['ttft_http_ms']:>18.2f} | "
                  f"{h['itl_transport_ms']:>20.2f} {h['itl_http_ms']:>18.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    png = args.out.with_suffix(".png")
    chart(results, png)
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
