"""Regional failover through the MLflow AI Gateway: one of two regions taken off the network under load.

Two serving tiers (regions) run as two Ray Serve applications, each with its own LLM replica and ingress,
each behind its own TCP edge (tests/fixtures/edge.py) on its own port; a real `mlflow gateway start` has
one chat endpoint with `mosaic_api_base: [region A, region B]`. N streaming and M non-streaming clients
run for --duration seconds; region A's edge is stopped at --outage-at (new connections refused, open ones
cut, as in an outage) and started again at --back-at. Reports:
- failed requests: non-streaming (goal 0), streams that ended with an error event (only those already
  past their first chunk on A may) and streams refused with a status;
- latency of the requests in flight at the cut (they were failed over) against the median of the same
  kind before the cut, p50 and p99 (streams: time to first chunk);
- time to route back: from A's return to the first request A serves again (about what is left of
  region_cooldown_s), from the provider's per-region counters.

    python benchmarks/gateway_failover.py [--streams 8] [--plain 4] [--duration 40]

Writes benchmarks/results/gateway_failover.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fixtures.edge import Edge
from tests.fixtures.gateway import free_port, mosaic_endpoint, provider_metrics, start_gateway

MODEL = "tiny-llama-2-chat"
REGION = dict(num_replicas=1, llm_num_cpus=0.5, max_num_seqs=8, max_waiting_requests=16, num_kv_blocks=512,
              embedding_model="none", ingress_num_cpus=0.25)


def run_load(url: str, streams: int, plain: int, duration_s: float, max_tokens: int) -> list[dict]:
    """Each client loops until `duration_s`; one record per request (times are time.monotonic())."""
    records: list[dict] = []
    deadline = time.monotonic() + duration_s
    body = {"messages": [{"role": "user", "content": "Tell me about regions"}], "max_tokens": max_tokens,
            "temperature": 0.0}

    def client(stream: bool) -> None:
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < deadline:
                started = time.monotonic()
                record = {"stream": stream, "start": started}
                if stream:
                    with http.stream("POST", url, json={**body, "stream": True}) as r:
                        record["status"] = r.status_code
                        first = None
                        errored = False
                        for line in r.iter_lines():
                            if line.startswith("data:"):
                                first = first or time.monotonic()
                                errored = errored or '"error"' in line
                        record["first"] = first
                        record["error_event"] = errored
                else:
                    record["status"] = http.post(url, json=body).status_code
                record["end"] = time.monotonic()
                records.append(record)

    threads = [threading.Thread(target=client, args=(True,)) for _ in range(streams)]
    threads += [threading.Thread(target=client, args=(False,)) for _ in range(plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def latency(record: dict) -> float:
    """Seconds to the answer (non-streaming) or to the first chunk (streams)."""
    return (record["first"] if record["stream"] else record["end"]) - record["start"]


def summarize(records: list[dict], cut_at: float) -> dict:
    result: dict = {"requests": len(records)}
    plain = [r for r in records if not r["stream"]]
    streams = [r for r in records if r["stream"]]
    result["plain_failed"] = sum(r["status"] != 200 for r in plain)
    result["streams_refused"] = sum(r["status"] != 200 for r in streams)
    result["streams_error_event"] = sum(r["status"] == 200 and r["error_event"] for r in streams)
    for kind, group in (("plain", plain), ("stream", streams)):
        ok = [r for r in group if r["status"] == 200 and not r.get("error_event") and (r.get("first") or not r["stream"])]
        before = [latency(r) for r in ok if r["end"] < cut_at]
        # In flight at the cut and answered: failed over (a stream only if its first chunk came after it).
        moved = [latency(r) for r in ok if r["start"] < cut_at < (r["first"] if r["stream"] else r["end"])]
        baseline = float(np.median(before)) if before else float("nan")
        result[kind] = {
            "baseline_p50_ms": 1e3 * baseline, "failed_over": len(moved),
            "added_p50_ms": 1e3 * (float(np.median(moved)) - baseline) if moved else None,
            "added_p99_ms": 1e3 * (float(np.percentile(moved, 99)) - baseline) if moved else None,
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=8, help="streaming clients")
    parser.add_argument("--plain", type=int, default=4, help="non-streaming clients")
    parser.add_argument("--duration", type=float, default=40.0)
    parser.add_argument("--outage-at", type=float, default=12.0)
    parser.add_argument("--back-at", type=float, default=24.0)
    parser.add_argument("--cooldown", type=float, default=5.0, help="region_cooldown_s of the endpoint")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    import ray
    from ray import serve

    from serving.api.auth import add_key
    from serving.app_config import AppConfig
    from serving.deployment import build_app

    os.environ.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"})
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as tmp:
        keys = Path(tmp) / "keys.json"
        key = add_key(keys, "bench")
        port = free_port()
        ray.init(include_dashboard=False, num_cpus=4, object_store_memory=150 * 1024 * 1024, _temp_dir=tmp,
                 log_to_driver=False, configure_logging=False)
        edges: list[Edge] = []
        gateway = None
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for name in ("region-a", "region-b"):
                serve.run(build_app(AppConfig(api_keys_file=str(keys), **REGION)), name=name, route_prefix=f"/{name}")
            edges = [Edge(port), Edge(port)]
            for edge in edges:
                edge.start()
            regions = [f"{edges[0].url}/region-a", f"{edges[1].url}/region-b"]
            metrics_port = free_port()
            endpoint = mosaic_endpoint("chat", "llm/v1/chat", MODEL, regions, "$MOSAIC_API_KEY",
                                       region_cooldown_s=args.cooldown, max_retries=0)
            gateway = start_gateway(Path(tmp) / "gateway", [endpoint], {
                "MOSAIC_API_KEY": key, "MOSAIC_GATEWAY_METRICS_PORT": str(metrics_port)})
            url = f"{gateway.url}/gateway/chat/invocations"
            metrics = f"http://127.0.0.1:{metrics_port}/metrics"
            httpx.post(url, json={"messages": [{"role": "user", "content": "warm"}], "max_tokens": 2},
                       timeout=120).raise_for_status()

            events: dict[str, float] = {}

            def outage() -> None:
                time.sleep(args.outage_at)
                events["cut"] = time.monotonic()
                edges[0].stop()
                time.sleep(args.back_at - args.outage_at)
                before = provider_metrics(metrics)[0].get(regions[0], 0.0)
                events["back"] = time.monotonic()
                edges[0].start()
                while time.monotonic() - events["back"] < args.duration - args.back_at:
                    if provider_metrics(metrics)[0].get(regions[0], 0.0) > before:
                        events["routed_back"] = time.monotonic()
                        return
                    time.sleep(0.1)

            chaos = threading.Thread(target=outage)
            chaos.start()
            records = run_load(url, args.streams, args.plain, args.duration, args.max_tokens)
            chaos.join()
            served, failovers = provider_metrics(metrics)
        finally:
            if gateway is not None:
                gateway.stop()
            for edge in edges:
                edge.close()
            serve.shutdown()
            ray.shutdown()

    result = summarize(records, events["cut"])
    result["failovers_counted_by_gateway"] = failovers
    result["served_by_region"] = {("A" if r == regions[0] else "B"): n for r, n in served.items()}
    result["route_back_s"] = events["routed_back"] - events["back"] if "routed_back" in events else None
    result["settings"] = {**vars(args), "model": MODEL, "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    print(f"{args.streams} streaming + {args.plain} non-streaming clients, {len(records)} requests; region A cut at "
          f"{args.outage_at:g}s, back at {args.back_at:g}s, cool-down {args.cooldown:g}s")
    print(f"{'':34}{'failed over':>12}{'baseline p50 ms':>17}{'added p50 ms':>14}{'added p99 ms':>14}")
    for kind, label in (("plain", "non-streaming (answer)"), ("stream", "streaming (first chunk)")):
        r = result[kind]
        fmt = (lambda v: f"{v:14.1f}" if v is not None else f"{'-':>14}")
        print(f"{label:34}{r['failed_over']:>12}{r['baseline_p50_ms']:17.1f}{fmt(r['added_p50_ms'])}"
              f"{fmt(r['added_p99_ms'])}")
    print(f"failed non-streaming: {result['plain_failed']}; streams ended by an error event: "
          f"{result['streams_error_event']}; streams refused: {result['streams_refused']}; "
          f"failovers counted by the gateway: {failovers:g}")
    back = result["route_back_s"]
    print(f"route back after region A returned: {f'{back:.2f} s' if back is not None else 'not within the run'}")
    out = REPO / "benchmarks" / "results" / "gateway_failover.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
