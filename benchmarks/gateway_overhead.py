"""Latency the MLflow AI Gateway (mosaic provider) adds in front of the serving API.

Sends the same short greedy completion straight to the serving API and through a gateway, alternating
the two paths request by request so drift on the machine hits both alike, one request at a time over
keep-alive connections. Reports median and p99 latency of plain requests and the delay to the first
streamed chunk, both ways, and what the gateway adds. Goal: at most 1.5 ms added at the median.

    python benchmarks/gateway_overhead.py                       # starts a local stack and gateway
    python benchmarks/gateway_overhead.py --serving-url http://127.0.0.1:8000 --api-key $MOSAIC_API_KEY
    python benchmarks/gateway_overhead.py --fake-upstream     # the gateway alone, against an instant fake API

Writes benchmarks/results/gateway_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fixtures.gateway import free_port, start_gateway

GOAL_MS = 1.5
ENDPOINT = "llama2-completions"


@contextmanager
def local_stack(model: str) -> Iterator[tuple[str, str]]:
    """A one-replica serving app on Ray Serve (no embedding model): yields (base URL, API key)."""
    import ray
    from ray import serve

    from serving.api.auth import add_key
    from serving.app_config import AppConfig
    from serving.deployment import build_app

    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as ray_tmp:
        keys_file = Path(ray_tmp) / "keys.json"
        api_key = add_key(keys_file, "bench")
        port = free_port()
        os.environ.update(
            {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
        )
        ray.init(include_dashboard=False, _temp_dir=ray_tmp, log_to_driver=False, configure_logging=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            config = AppConfig(model=model, api_keys_file=str(keys_file), embedding_model="none")
            serve.run(build_app(config), name="bench", route_prefix="/")
            yield f"http://127.0.0.1:{port}", api_key
        finally:
            serve.shutdown()
            ray.shutdown()


@contextmanager
def fake_upstream() -> Iterator[tuple[str, str]]:
    """The gateway tests' fake serving API (aiohttp, answers at once): what the gateway alone adds, without
    a serving stack competing for the same cores."""
    from tests.gateway.fake_serving import FakeServing

    fake = FakeServing(api_key="bench-fake-key")
    fake.start()
    try:
        yield fake.base_url, fake.api_key
    finally:
        fake.stop()


@contextmanager
def serving(url: str | None, api_key: str | None, model: str, fake: bool) -> Iterator[tuple[str, str]]:
    if url:
        yield url, api_key
    elif fake:
        with fake_upstream() as upstream:
            yield upstream
    else:
        with local_stack(model) as stack:
            yield stack


def gateway_endpoints(serving_url: str, model: str) -> list[dict]:
    """The completions endpoint of gateway_configs/local.yaml on `serving_url`, limits included, except
    MLflow's per-IP `limit`, which allows fewer calls a minute than this benchmark sends."""
    endpoints = yaml.safe_load((REPO / "gateway_configs" / "local.yaml").read_text())["endpoints"]
    (endpoint,) = [e for e in endpoints if e["name"] == ENDPOINT]
    endpoint.pop("limit", None)
    endpoint["model"]["name"] = model
    endpoint["model"]["config"]["mosaic_api_base"] = serving_url.rstrip("/")
    return [endpoint]


def timed(call: Callable[[], None]) -> float:
    started = time.perf_counter_ns()
    call()
    return (time.perf_counter_ns() - started) / 1e6


def first_chunk_ms(client: httpx.Client, url: str, body: dict, headers: dict) -> float:
    """Milliseconds until the first SSE data line arrives (the rest of the stream is drained)."""
    started = time.perf_counter_ns()
    first = None
    with client.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith("data:"):
                first = (time.perf_counter_ns() - started) / 1e6
    if first is None:
        raise RuntimeError(f"no data line from {url}")
    return first


def measure(
    serving_url: str,
    api_key: str,
    gateway_url: str,
    model: str,
    requests: int,
    warmup: int,
    stream_tokens: int,
) -> dict:
    direct_url = f"{serving_url.rstrip('/')}/v1/completions"
    gateway_url = f"{gateway_url}/gateway/{ENDPOINT}/invocations"
    auth = {"Authorization": f"Bearer {api_key}"}
    params = {"prompt": "Hello", "max_tokens": 1, "temperature": 0.0}
    stream_params = {**params, "max_tokens": stream_tokens, "stream": True}
    samples: dict[str, list[float]] = {
        k: [] for k in ("direct", "gateway", "direct_stream", "gateway_stream")
    }
    with httpx.Client(timeout=60) as client:

        def post(url: str, body: dict, headers: dict) -> None:
            client.post(url, json=body, headers=headers).raise_for_status()

        for i in range(warmup + requests):
            # Alternate which path goes first so neither always meets a warmer cache.
            rounds = [
                ("direct", lambda: timed(lambda: post(direct_url, {"model": model, **params}, auth))),
                ("gateway", lambda: timed(lambda: post(gateway_url, params, {}))),
                (
                    "direct_stream",
                    lambda: first_chunk_ms(client, direct_url, {"model": model, **stream_params}, auth),
                ),
                ("gateway_stream", lambda: first_chunk_ms(client, gateway_url, stream_params, {})),
            ]
            if i % 2:
                rounds = [rounds[1], rounds[0], rounds[3], rounds[2]]
            for name, run in rounds:
                value = run()
                if i >= warmup:
                    samples[name].append(value)
    return samples


def summarize(samples: dict[str, list[float]]) -> dict:
    def stats(values: list[float]) -> dict:
        return {
            "p50_ms": float(np.median(values)),
            "p99_ms": float(np.percentile(values, 99)),
            "n": len(values),
        }

    result = {name: stats(values) for name, values in samples.items()}
    for kind, direct, gateway in (
        ("request", "direct", "gateway"),
        ("first_chunk", "direct_stream", "gateway_stream"),
    ):
        paired = np.subtract(samples[gateway], samples[direct])
        result[f"added_{kind}"] = {
            "p50_ms": result[gateway]["p50_ms"] - result[direct]["p50_ms"],
            "p99_ms": result[gateway]["p99_ms"] - result[direct]["p99_ms"],
            "paired_median_ms": float(np.median(paired)),
        }
    result["goal_ms"] = GOAL_MS
    result["meets_goal"] = result["added_request"]["p50_ms"] <= GOAL_MS
    return result


def print_table(result: dict) -> None:
    print(f"{'':28}{'p50 ms':>10}{'p99 ms':>10}")
    for label, key in (
        ("completion, direct", "direct"),
        ("completion, via gateway", "gateway"),
        ("completion, added", "added_request"),
        ("first chunk, direct", "direct_stream"),
        ("first chunk, via gateway", "gateway_stream"),
        ("first chunk, added", "added_first_chunk"),
    ):
        print(f"{label:28}{result[key]['p50_ms']:>10.2f}{result[key]['p99_ms']:>10.2f}")
    verdict = "meets" if result["meets_goal"] else "misses"
    print(
        f"added at the median: {result['added_request']['p50_ms']:.2f} ms ({verdict} the {GOAL_MS} ms goal; "
        f"paired median {result['added_request']['paired_median_ms']:.2f} ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--serving-url", help="a running serving API (default: start a local stack)")
    parser.add_argument(
        "--api-key", default=os.environ.get("MOSAIC_API_KEY"), help="default: $MOSAIC_API_KEY"
    )
    parser.add_argument("--model", default="tiny-llama-2-chat")
    parser.add_argument("--fake-upstream", action="store_true",
                        help="measure against an instant fake serving API instead of a local stack")
    parser.add_argument("--requests", type=int, default=300, help="measured requests per path and kind")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--stream-tokens", type=int, default=4, help="max_tokens of the streamed requests")
    parser.add_argument(
        "--output", type=Path, help="default: benchmarks/results/gateway_overhead[-fake-upstream].json"
    )
    args = parser.parse_args()
    if args.fake_upstream:
        from tests.gateway.fake_serving import TEXT_MODEL

        args.model = TEXT_MODEL
    name = "gateway_overhead-fake-upstream.json" if args.fake_upstream else "gateway_overhead.json"
    args.output = args.output or REPO / "benchmarks" / "results" / name

    if args.serving_url and not args.api_key:
        parser.error("--api-key (or $MOSAIC_API_KEY) is required with --serving-url")
    with serving(args.serving_url, args.api_key, args.model, args.fake_upstream) as (serving_url, api_key):
        with tempfile.TemporaryDirectory() as workdir:
            gateway = start_gateway(
                Path(workdir), gateway_endpoints(serving_url, args.model), {"MOSAIC_API_KEY": api_key}
            )
            try:
                samples = measure(
                    serving_url,
                    api_key,
                    gateway.url,
                    args.model,
                    args.requests,
                    args.warmup,
                    args.stream_tokens,
                )
            finally:
                gateway.stop()

    result = summarize(samples)
    result["config"] = {
        "requests": args.requests, "warmup": args.warmup, "stream_tokens": args.stream_tokens, "model": args.model, "gateway_workers": 1,
        "upstream": "fake" if args.fake_upstream else (args.serving_url or "local stack"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
