"""Serving on a multi-node Ray cluster on this machine (deploy/local_cluster.py): two LLM replicas on one node
against the same two replicas spread over two nodes (same CPUs in all), then a node killed under load.

Each layout is a fresh cluster (head: the ingress and the proxy; workers: the LLM replicas, one CPU each),
deployed with `mosaic-serve --address`. N streaming clients send completions (random-word prompts, greedy,
EOS ignored, --max-tokens new tokens) for --duration seconds. Reported per layout: generated tokens/s (from
each stream's final usage chunk), requests completed, TTFT p50. In the spread layout a third phase kills one
worker node (its raylet and workers) --kill-at seconds in and reports what the clients saw: streams cut
with an error event, requests refused with a status, the longest time with no stream completing after the
kill (the interruption), and tokens/s after it on the surviving replica.

On one 2-core machine the "nodes" share the same cores, so the spread layout measures what the extra hops
and raylets cost, not what a second machine adds; say so when quoting it.

    python benchmarks/cluster.py [--streams 4] [--duration 30] [--kill-at 10]

Writes benchmarks/results/cluster.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serving.api.auth import add_key
from tests.fixtures.cluster import LocalCluster, stop_group
from tests.fixtures.gateway import free_port

MODEL = "tiny-llama-2-chat"
WORDS = ["the", "cluster", "serves", "every", "token", "from", "a", "replica", "on", "some", "node"]


def run_load(base: str, key: str, streams: int, duration_s: float, max_tokens: int, seed: int,
             on_tick: tuple[float, object] | None = None) -> list[dict]:
    """Each client loops until `duration_s`; one record per request (times relative to the start)."""
    records: list[dict] = []
    start = time.monotonic()
    deadline = start + duration_s

    def client(index: int) -> None:
        rng = random.Random(seed + index)
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < deadline:
                body = {"model": MODEL, "prompt": " ".join(rng.choices(WORDS, k=rng.randint(8, 48))),
                        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}}
                record = {"start": time.monotonic() - start, "tokens": 0, "error_event": False, "first": None}
                try:
                    with http.stream("POST", f"{base}/v1/completions", headers=headers, json=body) as r:
                        record["status"] = r.status_code
                        for line in r.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            record["first"] = record["first"] or time.monotonic() - start
                            event = json.loads(line[len("data: "):])
                            if "error" in event:
                                record["error_event"] = True
                            elif event.get("usage"):
                                record["tokens"] = event["usage"]["completion_tokens"]
                except httpx.HTTPError as exc:
                    record["status"] = type(exc).__name__
                record["end"] = time.monotonic() - start
                records.append(record)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    if on_tick is not None:
        at, action = on_tick
        time.sleep(max(0.0, at - (time.monotonic() - start)))
        action()
    for t in threads:
        t.join()
    return records


def summarize(records: list[dict], duration_s: float, since: float = 0.0) -> dict:
    ok = [r for r in records if r["status"] == 200 and not r["error_event"] and r["tokens"]]
    window = [r for r in ok if r["end"] >= since]
    ttft = [r["first"] - r["start"] for r in window]
    tokens = sum(r["tokens"] for r in window)
    return {"completed": len(window), "tokens_per_s": round(tokens / (duration_s - since), 1),
            "ttft_p50_ms": round(1e3 * float(np.median(ttft)), 1) if ttft else None}


def deploy(cluster: LocalCluster, keys: Path, port: int, log: Path) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "--address", cluster.address, "--host", "127.0.0.1",
         "--port", str(port), "--proxy-location", "HeadOnly", "--api-keys-file", str(keys), "--embedding-model", "none",
         "--num-replicas", "2", "--num-cpus-per-replica", "1", "--llm-resources", json.dumps({"llm_node": 1}),
         "--ingress-resources", json.dumps({"head": 0.1}), "--max-num-seqs", "8", "--num-kv-blocks", "512",
         "--graceful-shutdown-timeout", "2"],
        env=cluster.env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            replicas = httpx.get(f"{base}/health", timeout=10).json().get("replicas", [])
            if sum(r.get("healthy", False) for r in replicas) == 2:
                return server
        except (httpx.HTTPError, ValueError):
            pass
        if server.poll() is not None:
            break
        time.sleep(1)
    raise RuntimeError(f"the app did not come up (log: {log})")


def run_layout(name: str, worker_nodes: int, args: argparse.Namespace, keys: Path, key: str, work: Path) -> dict:
    cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp")), env={"PYTHONPATH": str(REPO)})
    cluster.start_head(num_cpus=1, resources={"head": 1})
    server = None
    try:
        cluster.wait_for_head()
        for _ in range(worker_nodes):  # the same two CPUs and two replica slots in both layouts
            cluster.add_worker(num_cpus=2 // worker_nodes, resources={"llm_node": 2 // worker_nodes})
        port = free_port()
        server = deploy(cluster, keys, port, work / f"{name}.log")
        base = f"http://127.0.0.1:{port}"
        run_load(base, key, args.streams, 5, args.max_tokens, seed=99)  # warm-up
        result = {"layout": name, "worker_nodes": worker_nodes,
                  **summarize(run_load(base, key, args.streams, args.duration, args.max_tokens, seed=0),
                              args.duration)}
        if worker_nodes > 1:
            records = run_load(base, key, args.streams, args.duration, args.max_tokens, seed=1,
                               on_tick=(args.kill_at, lambda: cluster.kill_worker(0)))
            ends = sorted(r["end"] for r in records if r["status"] == 200 and not r["error_event"]
                          and r["end"] > args.kill_at)
            gaps = np.diff([args.kill_at, *ends]) if ends else [args.duration - args.kill_at]
            result["node_kill"] = {
                "kill_at_s": args.kill_at, "requests": len(records),
                "streams_error_event": sum(r["error_event"] for r in records),
                "refused": sum(r["status"] != 200 for r in records),
                "interruption_s": round(float(max(gaps)), 2),
                "after_kill": summarize(records, args.duration, since=args.kill_at + float(max(gaps))),
            }
        return result
    finally:
        if server is not None:
            stop_group(server)
        cluster.down()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=4, help="streaming clients")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per phase")
    parser.add_argument("--kill-at", type=float, default=10.0, help="seconds into the last phase")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    from serving.models.tiny import resolve_model

    resolve_model(MODEL)
    work = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    keys = work / "keys.json"
    key = add_key(keys, "bench")
    layouts = [run_layout(name, nodes, args, keys, key, work) for name, nodes in (("one node", 1), ("two nodes", 2))]
    print(f"\n{'layout':<10} {'tok/s':>8} {'done':>6} {'TTFT p50 ms':>12}")
    for r in layouts:
        print(f"{r['layout']:<10} {r['tokens_per_s']:>8} {r['completed']:>6} {r['ttft_p50_ms']!s:>12}")
    kill = layouts[1]["node_kill"]
    print(f"\nnode killed at {kill['kill_at_s']} s: {kill['requests']} requests, "
          f"{kill['streams_error_event']} streams cut with an error event, {kill['refused']} refused; "
          f"interruption {kill['interruption_s']} s; "
          f"after it {kill['after_kill']['tokens_per_s']} tok/s on the surviving replica")
    ratio = layouts[1]["tokens_per_s"] / layouts[0]["tokens_per_s"]
    print(f"two nodes / one node throughput: {ratio:.2f}x")
    out = {"layouts": layouts, "two_over_one": round(ratio, 3), "args": vars(args),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg": os.getloadavg()}}
    results = REPO / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / "cluster.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
