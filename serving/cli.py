"""`mosaic-serve`: run the serving stack on Ray Serve, and manage its API keys.

    mosaic-serve --model M [--served-model-name N] [--tensor-parallel-size T] [--num-replicas R]
                 [--host H] [--port P] [--api-keys-file F] [--embedding-model E|none] [...]
    mosaic-serve keys add NAME --api-keys-file F [--requests-per-minute N] [--tokens-per-minute N]
    mosaic-serve keys revoke NAME --api-keys-file F
    mosaic-serve keys list --api-keys-file F
    mosaic-serve plan --model DIR_OR_CONFIG [--tensor-parallel-size T] [--gpus N] [...]   # capacity plan
    mosaic-serve dev        # what `make serve` runs: a dev key under .dev/, the default models on 127.0.0.1:8000

Without `--address` (or RAY_ADDRESS) a local Ray instance is started; with it the application is deployed
onto that cluster. Ctrl-C (or SIGTERM, to the process or its group) stops taking requests at once (503
with Retry-After), lets the accepted ones and their streams finish for up to --graceful-shutdown-timeout
seconds, and exits with nothing left running; a second signal stops without waiting.
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from serving.api.auth import add_key, list_keys, revoke_key
from serving.config import DEFAULT_MODEL
from serving.embeddings import DEFAULT_EMBEDDING_MODEL

logger = logging.getLogger("mosaic-serve")

APP_NAME = "mosaic"
DEV_DIR = Path(".dev")
DEV_KEY_NAME = "dev"


# ---- keys ------------------------------------------------------------------------------------------------


def _keys_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mosaic-serve keys", description="Manage API keys (hashes only on disk).")
    sub = parser.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="create a key; it is printed once and only its hash is kept")
    add.add_argument("name")
    add.add_argument("--requests-per-minute", type=int, default=None)
    add.add_argument("--tokens-per-minute", type=int, default=None)
    revoke = sub.add_parser("revoke", help="delete a key (servers stop accepting it within seconds)")
    revoke.add_argument("name")
    sub.add_parser("list", help="names and limits of the keys")
    for p in sub.choices.values():
        p.add_argument("--api-keys-file", required=True, type=Path)
    return parser


def keys_main(argv: list[str]) -> int:
    args = _keys_parser().parse_args(argv)
    try:
        if args.action == "add":
            print(add_key(args.api_keys_file, args.name, args.requests_per_minute, args.tokens_per_minute))
            print(f"key {args.name!r} added to {args.api_keys_file}; it is shown only this once", file=sys.stderr)
        elif args.action == "revoke":
            revoke_key(args.api_keys_file, args.name)
            print(f"key {args.name!r} revoked", file=sys.stderr)
        else:
            for r in list_keys(args.api_keys_file):
                print(f"{r.name}\trequests_per_minute={r.requests_per_minute or 'unlimited'}\t"
                      f"tokens_per_minute={r.tokens_per_minute or 'unlimited'}\tcreated={r.created_at}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


# ---- serve -----------------------------------------------------------------------------------------------


def _serve_parser(prog: str = "mosaic-serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Serve a Llama chat model (and an embedding model) over "
                                "HTTP on Ray Serve. Subcommands: `keys` (API keys), `dev` (`make serve`).")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"{DEFAULT_MODEL} or a Hugging Face checkpoint folder")
    p.add_argument("--served-model-name", help="the name clients use (default: the model name or folder name)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences one replica runs at once")
    p.add_argument("--num-kv-blocks", type=int, help="KV-cache blocks per replica (default: from free memory)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"],
                   help="auto: the model dtype; int8: quantized per token and KV head (head_dim + 4 bytes each)")
    p.add_argument("--quantization", default=None, choices=["int8"],
                   help="int8: weight-only, per output channel, quantized at load time")
    p.add_argument("--num-replicas", type=int, default=1, help="LLM replicas (fixed count)")
    p.add_argument("--min-replicas", type=int, help="autoscale LLM replicas between --min and --max-replicas")
    p.add_argument("--max-replicas", type=int)
    p.add_argument("--num-cpus-per-replica", type=float,
                   help="CPUs (and torch threads) per LLM replica; default: the local cores shared out")
    p.add_argument("--num-gpus-per-replica", type=float,
                   help="GPUs per LLM replica (default: tensor-parallel-size when CUDA is visible, else 0)")
    p.add_argument("--max-waiting-requests", type=int, default=64,
                   help="requests one replica queues behind a full batch; more are refused with 503")
    p.add_argument("--embedding-model", default=DEFAULT_EMBEDDING_MODEL,
                   help=f"{DEFAULT_EMBEDDING_MODEL} (bundled), a sentence-transformers folder, or none")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-keys-file", type=Path, help="API key file (mosaic-serve keys add ...)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow serving without API keys on a non-loopback address")
    p.add_argument("--rate-limit-storage", default="memory://",
                   help="memory:// (per ingress replica) or a shared store such as redis://host:6379")
    p.add_argument("--ingress-replicas", type=int, default=1)
    p.add_argument("--stall-timeout", type=float, default=30.0,
                   help="seconds with work but no engine step before a replica reports unhealthy")
    p.add_argument("--graceful-shutdown-timeout", type=float, default=60.0,
                   help="seconds a stopping replica drains in-flight requests")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to deploy onto (default: start a local Ray instance)")
    p.add_argument("--llm-resources", type=json.loads, default={}, metavar="JSON",
                   help='custom Ray resources per LLM replica, e.g. \'{"llm_node": 1}\' (nodes started with them)')
    p.add_argument("--ingress-resources", type=json.loads, default={}, metavar="JSON",
                   help="custom Ray resources per ingress replica")
    p.add_argument("--proxy-location", default="EveryNode", choices=["EveryNode", "HeadOnly"],
                   help="where Ray Serve runs HTTP proxies (HeadOnly: several nodes on one machine share a port)")
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """AppConfig fields from the command line (validated by AppConfig itself)."""
    replicas = args.min_replicas if args.min_replicas is not None else args.num_replicas
    from serving.deployment import default_llm_cpus

    llm_cpus = args.num_cpus_per_replica if args.num_cpus_per_replica is not None else default_llm_cpus(replicas)
    if args.num_gpus_per_replica is not None:
        gpus = args.num_gpus_per_replica
    else:
        import torch

        gpus = 1.0 if torch.cuda.is_available() else 0.0  # per tensor-parallel rank
    fields: dict[str, Any] = dict(
        model=args.model, served_model_name=args.served_model_name,
        tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, num_kv_blocks=args.num_kv_blocks, kv_cache_dtype=args.kv_cache_dtype,
        quantization=args.quantization, num_replicas=args.num_replicas,
        llm_num_cpus=llm_cpus, llm_num_gpus=gpus, max_waiting_requests=args.max_waiting_requests,
        embedding_model=args.embedding_model, ingress_num_replicas=args.ingress_replicas,
        api_keys_file=str(args.api_keys_file) if args.api_keys_file else None,
        # _check_auth allowed this run: keys, an explicit flag, or a local instance on loopback only.
        insecure_no_auth=args.api_keys_file is None,
        rate_limit_storage=args.rate_limit_storage, stall_timeout_s=args.stall_timeout,
        graceful_shutdown_timeout_s=args.graceful_shutdown_timeout,
        llm_resources=args.llm_resources, ingress_resources=args.ingress_resources,
    )
    if args.min_replicas is not None or args.max_replicas is not None:
        fields["autoscaling"] = {"min_replicas": args.min_replicas if args.min_replicas is not None else 1,
                                 "max_replicas": args.max_replicas or max(1, args.min_replicas or 1)}
    return fields


def _check_auth(args: argparse.Namespace) -> str | None:
    """Why the server must not start with these auth settings, or None."""
    if args.api_keys_file is None:
        if args.insecure_no_auth:
            return None
        if args.address:
            # A running cluster keeps the HTTP options it started with: --host says nothing about where its
            # proxies listen, so "loopback only" cannot be promised.
            return ("refusing to deploy onto a running Ray cluster without API keys: its proxies may listen on "
                    "any address; pass --api-keys-file or --insecure-no-auth")
        if not _is_loopback(args.host):
            return (f"refusing to serve on {args.host} without API keys: pass --api-keys-file (create keys with "
                    "`mosaic-serve keys add NAME --api-keys-file F`) or --insecure-no-auth")
        return None
    if not args.api_keys_file.is_file():
        return (f"API key file {args.api_keys_file} does not exist; create it with "
                f"`mosaic-serve keys add NAME --api-keys-file {args.api_keys_file}`")
    return None


def serve_main(argv: list[str], on_ready: Any = None) -> int:
    args = _serve_parser().parse_args(argv)
    problem = _check_auth(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from serving.deployment import AppConfig, build_app, resources_needed

    try:
        config = AppConfig(**config_from_args(args))
    except ValidationError as exc:
        print(f"error: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if not args.api_keys_file:
        logger.warning("serving WITHOUT authentication on %s", args.host)

    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.address:
        ray.init(address=args.address)
    else:
        # Logical CPUs: at least what the replicas ask for, so fractional shares fit on a small machine.
        ray.init(include_dashboard=False,
                 num_cpus=max(os.cpu_count() or 1, math.ceil(resources_needed(config))))
    # First signal: drain. Second: stop draining and shut down now.
    stop, hurry = threading.Event(), threading.Event()

    def on_signal(*_: Any) -> None:
        (hurry if stop.is_set() else stop).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        serve.start(http_options={"host": args.host, "port": args.port}, proxy_location=args.proxy_location)
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        host, port = _listening_address(args.host, args.port)
        logger.info("HTTP proxy listening on %s:%d (%s)", host, port,
                    "API keys from " + str(args.api_keys_file) if args.api_keys_file else "NO authentication")
        base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        print(f"mosaic-serve: serving {config.engine_config().served_model_name}"
              f"{' and ' + config.embedding_model if config.has_embeddings else ''} at {base_url}", flush=True)
        if on_ready is not None:
            on_ready(base_url, config)
        stop.wait()
        print("mosaic-serve: refusing new requests, draining the ones in flight", flush=True)
        _drain(config.graceful_shutdown_timeout_s, hurry)
    finally:
        if args.address:
            serve.delete(APP_NAME)  # leave the cluster's other applications alone
        else:
            serve.shutdown()
        ray.shutdown()
    return 0


def _drain(timeout_s: float, hurry: threading.Event) -> None:
    """Every ingress replica answers new requests 503 from now; wait until the accepted ones (streams to
    their last byte) are done, for up to `timeout_s` (or until a second signal)."""
    from ray import serve

    handle = serve.get_deployment_handle("Ingress", app_name=APP_NAME)
    deadline = time.monotonic() + timeout_s
    method = "drain"
    while True:
        try:
            in_flight = sum(handle.broadcast(method).results(timeout_s=10))
        except Exception as exc:  # noqa: BLE001 (an ingress that cannot answer has nothing left to drain)
            logger.warning("could not reach the ingress while draining (%s)", type(exc).__name__)
            return
        method = "in_flight"
        if in_flight == 0:
            logger.info("drained: no request in flight")
            return
        if hurry.is_set() or time.monotonic() > deadline:
            logger.warning("stopping with %d requests still in flight", in_flight)
            return
        time.sleep(0.2)


def _listening_address(host: str, port: int) -> tuple[str, int]:
    """Where Ray Serve's proxies really listen: a running cluster keeps the HTTP options it started with."""
    from ray import serve

    try:
        client = serve.context._get_global_client()
        import ray

        options = ray.get(client._controller.get_http_config.remote(), timeout=10)
        return options.host or host, options.port or port
    except Exception as exc:  # noqa: BLE001 (private API: fall back to what was asked for)
        logger.warning("could not read the proxies' HTTP options (%s); assuming %s:%d", type(exc).__name__, host, port)
        return host, port


# ---- dev (`make serve`) ----------------------------------------------------------------------------------


def _dev_key(keys_file: Path, key_path: Path) -> tuple[str, bool]:
    """The development key (kept in the git-ignored .dev/), created on first use. (key, newly created)."""
    from serving.api.auth import hash_key

    if key_path.is_file() and keys_file.is_file():
        key = key_path.read_text().strip()
        if any(r.sha256 == hash_key(key) for r in list_keys(keys_file)):
            return key, False
    if any(r.name == DEV_KEY_NAME for r in list_keys(keys_file)):
        revoke_key(keys_file, DEV_KEY_NAME)
    key = add_key(keys_file, DEV_KEY_NAME)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, True


def curl_line(base_url: str, model: str, key_path: Path) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello! Who are you?"}],
                       "max_tokens": 32})
    return (f"curl -s {base_url}/v1/chat/completions -H \"Authorization: Bearer $(cat {key_path})\" "
            f"-H 'Content-Type: application/json' -d '{body}'")


def dev_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mosaic-serve dev",
                                     description="Local development stack: a dev API key and the default models.")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dir", type=Path, default=DEV_DIR, help="where the dev key files live (git-ignored)")
    parser.add_argument("--gateway-port", type=int, default=5000,
                        help="MLflow AI Gateway port (gateway_configs/local.yaml); 0 to run without the gateway")
    args, rest = parser.parse_known_args(argv)
    keys_file, key_path = args.dir / "api_keys.json", args.dir / "api_key"
    key, created = _dev_key(keys_file, key_path)
    if created:
        print(f"Created a development API key (stored in {key_path}, shown only now):\n  {key}", flush=True)

    def on_ready(base_url: str, config: Any) -> None:
        import httpx

        # Run the request the printed line makes, so the line shown is known to work.
        model = config.engine_config().served_model_name
        reply = httpx.post(f"{base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"model": model, "messages": [{"role": "user", "content": "Hello! Who are you?"}],
                                 "max_tokens": 32}, timeout=120)
        reply.raise_for_status()
        print(f"\nReady. Try:\n  {curl_line(base_url, model, key_path)}", flush=True)
        if gateway is not None:
            print(f"\nMLflow AI Gateway on http://127.0.0.1:{args.gateway_port} (endpoints llama2-chat, "
                  "llama2-completions, embeddings):\n  python -c \"from mlflow.deployments import get_deploy_client; "
                  f"print(get_deploy_client('http://127.0.0.1:{args.gateway_port}').predict(endpoint='llama2-chat', "
                  "inputs={'messages': [{'role': 'user', 'content': 'Hi'}], 'max_tokens': 16}))\"", flush=True)
        print("\nCtrl-C stops the server.", flush=True)

    gateway = _start_gateway(args.gateway_port, args.port, key, args.dir) if args.gateway_port else None
    try:
        return serve_main(["--host", "127.0.0.1", "--port", str(args.port), "--api-keys-file", str(keys_file),
                           *rest], on_ready=on_ready)
    finally:
        if gateway is not None:
            os.killpg(gateway.pid, signal.SIGTERM)
            gateway.wait(timeout=30)


def _start_gateway(port: int, serving_port: int, key: str, dev_dir: Path) -> subprocess.Popen:
    """`mlflow gateway start` on gateway_configs/local.yaml, in its own process group, the key in its env."""
    config = Path(__file__).resolve().parent.parent / "gateway_configs" / "local.yaml"
    text = config.read_text().replace("http://127.0.0.1:8000", f"http://127.0.0.1:{serving_port}")
    dev_config = dev_dir / "gateway.yaml"
    dev_config.parent.mkdir(parents=True, exist_ok=True)
    dev_config.write_text(text)
    env = dict(os.environ, MOSAIC_API_KEY=key, GUNICORN_CMD_ARGS="--no-control-socket")
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow", "gateway", "start", "--config-path", str(dev_config),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, start_new_session=True,
    )


# Set in the server process that `_supervise` starts.
_SERVER_ENV = "MOSAIC_SERVE_SERVER_PROCESS"


def _supervise(argv: list[str]) -> int:
    """Run the server in a session of its own and pass signals on to its main process only.

    Ctrl-C in a terminal, or systemd stopping the service, signals the whole process group. Ray's processes
    (GCS, raylet, workers: the replicas) would be in that group and die at once, cutting every request in
    flight. In a session of their own they only hear of it from the server, which drains first.
    """
    server = subprocess.Popen([sys.executable, "-m", "serving.cli", *argv], env={**os.environ, _SERVER_ENV: "1"},
                              start_new_session=True, preexec_fn=_term_on_parent_death)

    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    try:
        return server.wait()
    finally:
        # Nothing of the server's session outlives it (a Ray process it could not stop, say).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(server.pid, signal.SIGKILL)


def _term_on_parent_death() -> None:
    """In the server process (before exec): SIGTERM when the supervisor dies, even by SIGKILL (Linux), so
    the server drains and stops instead of running on unsupervised."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "keys":
        return keys_main(argv[1:])
    if argv and argv[0] == "plan":  # prints and exits: nothing to supervise
        from serving.plan_cli import plan_main

        return plan_main(argv[1:])
    if os.environ.get(_SERVER_ENV) != "1":
        return _supervise(argv)
    if argv and argv[0] == "dev":
        return dev_main(argv[1:])
    return serve_main(argv)


if __name__ == "__main__":
    sys.exit(main())
