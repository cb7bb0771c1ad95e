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
import socket
import subprocess
import sys
import threading
import time
import types
import typing
from pathlib import Path
from typing import Any

from serving.api.auth import add_key, list_keys, revoke_key

logger = logging.getLogger("mosaic-serve")

APP_NAME = "mosaic"
DEV_DIR = Path(".dev")
DEV_KEY_NAME = "dev"


# ---- keys ------------------------------------------------------------------------------------------------


def _keys_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mosaic-serve keys", description="Manage API keys (hashes only on disk).")
    sub = parser.add_subparsers(dest="action", title="actions", metavar="{add,revoke,list}")
    add = sub.add_parser("add", help="create a key; it is printed once and only its hash is kept")
    add.add_argument("name", help="the key's name (unique in the file)")
    add.add_argument("--requests-per-minute", type=int, default=None,
                     help="requests this key may make per minute (default: unlimited)")
    add.add_argument("--tokens-per-minute", type=int, default=None,
                     help="prompt + completion tokens this key may use per minute (default: unlimited)")
    revoke = sub.add_parser("revoke", help="delete a key (servers stop accepting it within seconds)")
    revoke.add_argument("name", help="the key's name")
    sub.add_parser("list", help="names and limits of the keys")
    for p in sub.choices.values():
        p.add_argument("--api-keys-file", required=True, type=Path, help="the key file (created by the first add)")
    return parser


def keys_main(argv: list[str]) -> int:
    parser = _keys_parser()
    args = parser.parse_args(argv)
    if args.action is None:  # `mosaic-serve keys` alone: say what it can do
        parser.print_help(sys.stderr)
        return 2
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


# Flags whose names predate the generated ones (`--<field-name>`), kept working, by AppConfig field.
_ALIASES = {
    "stall_timeout_s": ["--stall-timeout"],
    "graceful_shutdown_timeout_s": ["--graceful-shutdown-timeout"],
    "ingress_num_replicas": ["--ingress-replicas"],
    "llm_num_cpus": ["--num-cpus-per-replica"],
    "llm_num_gpus": ["--num-gpus-per-replica"],
}
# What the command line does differently from AppConfig's default (the help says so).
_CLI_DEFAULTS = {
    "llm_num_cpus": "the local cores shared out among the LLM replicas, less one for the HTTP path",
    "insecure_no_auth": "off; without keys, serving on a loopback address of a local Ray instance is allowed",
}
_AUTOSCALING = "autoscaling."


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _gpus(text: str) -> float | str:
    return text if text == "auto" else float(text)


def _none_or(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _add_setting(group: argparse._ArgumentGroup, name: str, annotation: Any, info: Any, dest: str) -> None:
    """One flag for one setting, its parsing from the field's type, its help and default from the field."""
    choices = (info.json_schema_extra or {}).get("choices") if isinstance(info.json_schema_extra, dict) else None
    default = info.get_default(call_default_factory=True)
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS}
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = typing.get_args(annotation) if optional else ()
    base = next((a for a in args if a is not type(None)), annotation) if optional else annotation
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
    elif name == "llm_num_gpus":
        kwargs.update(type=_gpus, metavar="auto|N")
    elif typing.get_origin(base) is dict:
        kwargs.update(type=json.loads, metavar="JSON")
    else:
        kind = base if base in (int, float, str) else str
        kwargs["type"] = _none_or(kind) if type(None) in args else kind
        kwargs["metavar"] = "N" if kind in (int, float) else name.upper()
        if choices is not None:
            kwargs["choices"] = list(choices)
            kwargs["type"] = _none_or(kind) if None in choices else kind
            kwargs["metavar"] = "{" + ",".join("none" if c is None else str(c) for c in choices) + "}"
    shown = _CLI_DEFAULTS.get(name, "none" if default is None else json.dumps(default) if isinstance(default, dict)
                              else default)
    # A help text that says its default itself (a computed one) keeps its own words.
    described = info.description if "(default" in info.description else f"{info.description} (default: {shown})"
    kwargs["help"] = described.replace("%", "%%")
    group.add_argument(_flag(name.removeprefix(_AUTOSCALING)), *_ALIASES.get(name, []), **kwargs)


def _serve_parser(prog: str = "mosaic-serve") -> argparse.ArgumentParser:
    """The flags: one per AppConfig field (grouped as serving/app_config.py's SECTIONS), plus where to listen
    and which Ray cluster to use. A flag overrides the same field of --config FILE."""
    from serving.app_config import SECTIONS, AutoscalingSettings, section_fields

    p = argparse.ArgumentParser(
        prog=prog, usage="%(prog)s [--config FILE.yaml] [flags]", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a Llama chat model (and an embedding model) over HTTP on Ray Serve.",
        epilog="subcommands:\n  mosaic-serve keys {add,revoke,list} ...   manage API keys\n"
               "  mosaic-serve plan ...                      capacity plan for a checkpoint on GPUs\n"
               "  mosaic-serve dev [flags]                   the local stack of `make serve`")
    p.add_argument("--config", type=Path, metavar="FILE.yaml",
                   help="settings file: AppConfig fields, or a Ray Serve config such as deploy/serve_config.yaml "
                        "(its application's args); flags override it")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for title, source in SECTIONS:
        group = groups.get(title) or groups.setdefault(title, p.add_argument_group(title))
        for name, (annotation, info) in section_fields(source).items():
            if name == "autoscaling":
                for sub, (sub_annotation, sub_info) in section_fields(AutoscalingSettings).items():
                    _add_setting(group, _AUTOSCALING + sub, sub_annotation, sub_info, _AUTOSCALING + sub)
            else:
                _add_setting(group, name, annotation, info, name)
    http = groups["ingress & auth"]
    http.add_argument("--host", default="127.0.0.1", help="address the HTTP server listens on (default: %(default)s)")
    http.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    cluster = p.add_argument_group("Ray cluster")
    cluster.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                         help="Ray cluster to deploy onto (default: $RAY_ADDRESS, else start a local Ray instance)")
    cluster.add_argument("--proxy-location", default="EveryNode", choices=["EveryNode", "HeadOnly"],
                         help="with --address: where Ray Serve runs HTTP proxies (HeadOnly: several nodes on one "
                              "machine share a port); without it the ingress replicas serve --port themselves "
                              "(default: %(default)s)")
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _config_file(path: Path) -> dict[str, Any]:
    """AppConfig fields from a YAML file: a mapping of them, or a Ray Serve config (its app_builder's args)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings")
    if "applications" in data:
        apps = [a for a in data["applications"] if a.get("import_path") == "serving.deployment:app_builder"]
        if len(apps) != 1:
            raise ValueError(f"{path}: expected one application with import_path serving.deployment:app_builder")
        data = apps[0].get("args") or {}
    return dict(data)


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The AppConfig fields --config FILE and the flags set (a flag wins)."""
    from serving.app_config import AppConfig

    fields = _config_file(args.config) if args.config else {}
    given = {k: v for k, v in vars(args).items() if k in AppConfig.model_fields}
    scaling = {k.removeprefix(_AUTOSCALING): v for k, v in vars(args).items() if k.startswith(_AUTOSCALING)}
    fields.update(given)
    if scaling:
        scaling = {**(fields.get("autoscaling") or {}), **scaling}
        if "min_replicas" in scaling and "max_replicas" not in scaling:
            scaling["max_replicas"] = max(1, scaling["min_replicas"])  # --min-replicas alone: a floor that holds
        fields["autoscaling"] = scaling
    return fields


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """AppConfig fields from --config FILE, the flags, and the command line's own defaults (validated by
    AppConfig itself); call it once _check_auth has allowed the settings."""
    fields = given_settings(args)
    if "llm_num_cpus" not in fields:
        from serving.replicas.placement import default_llm_cpus

        replicas = (fields.get("autoscaling") or {}).get("min_replicas", fields.get("num_replicas", 1))
        fields["llm_num_cpus"] = default_llm_cpus(replicas)
    # _check_auth allowed this run: keys, an explicit flag, or a local instance on loopback only.
    fields["insecure_no_auth"] = fields.get("insecure_no_auth", False) or fields.get("api_keys_file") is None
    return fields


def _check_auth(args: argparse.Namespace, settings: dict[str, Any]) -> str | None:
    """Why the server must not start with these auth settings, or None."""
    keys_file = settings.get("api_keys_file")
    if keys_file is None:
        if settings.get("insecure_no_auth"):
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
    if not Path(keys_file).expanduser().is_file():
        return (f"API key file {keys_file} does not exist; create it with "
                f"`mosaic-serve keys add NAME --api-keys-file {keys_file}`")
    return None


class ShutdownSignals:
    """SIGINT and SIGTERM in the server process: the first asks to drain, the second to stop draining and
    shut down now. `main` installs them first thing: a signal that arrived as a KeyboardInterrupt during the
    start-up's imports or inside ray.init was swallowed there (the server came up and ran on)."""

    def __init__(self) -> None:
        self.stop, self.hurry = threading.Event(), threading.Event()

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, *_: Any) -> None:
        (self.hurry if self.stop.is_set() else self.stop).set()


def serve_main(argv: list[str], on_ready: Any = None, signals: ShutdownSignals | None = None) -> int:
    args = _serve_parser().parse_args(argv)
    from serving.app_config import AppConfig

    try:
        problem = _check_auth(args, given_settings(args))
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        config = AppConfig(**config_from_args(args))
    except (OSError, ValueError) as exc:  # a settings file that cannot be read; ValidationError is a ValueError
        print(f"error: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    problem = None if args.address else _port_problem(args.host, args.port)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if not config.api_keys_file:
        logger.warning("serving WITHOUT authentication on %s", args.host)
    import ray
    from ray import serve

    from serving.deployment import build_app
    from serving.replicas.placement import resources_needed

    # A signal while starting takes effect once the application is up (it drains, nothing yet, and exits).
    signals = signals or ShutdownSignals()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.address:
        ray.init(address=args.address)
    else:
        # Logical CPUs: at least what the replicas ask for, so fractional shares fit on a small machine.
        ray.init(include_dashboard=False,
                 num_cpus=max(os.cpu_count() or 1, math.ceil(resources_needed(config))))
    signals.install()   # (again, for main's: ray.init sets a SIGTERM handler of its own)
    try:
        if args.address:
            # A cluster's clients reach the proxies it was started with (on every node, its load balancer's).
            serve.start(http_options={"host": args.host, "port": args.port}, proxy_location=args.proxy_location)
            serve.run(build_app(config), name=APP_NAME, route_prefix="/")
            host, port = _listening_address(args.host, args.port)
        else:
            # Our own instance: the ingress replicas serve the port themselves, one hop less than the proxy.
            host, port = args.host, args.port
            serve.start(proxy_location="Disabled")
            serve.run(build_app(config, listen=(host, port)), name=APP_NAME, route_prefix="/")
        logger.info("HTTP listening on %s:%d (%s)", host, port,
                    "API keys from " + config.api_keys_file if config.api_keys_file else "NO authentication")
        base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        print(f"mosaic-serve: serving {config.engine_config().served_model_name}"
              f"{' and ' + config.embedding_model if config.has_embeddings else ''} at {base_url}", flush=True)
        if on_ready is not None:
            on_ready(base_url, config)
        signals.stop.wait()
        print("mosaic-serve: refusing new requests, draining the ones in flight", flush=True)
        _drain(config.graceful_shutdown_timeout_s, signals.hurry)
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


def _port_problem(host: str, port: int) -> str | None:
    """Why host:port cannot be served on, or None. The ingress replicas bind it with SO_REUSEPORT, which
    would share it with another such server (another mosaic-serve) instead of failing: check it first."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, port))
    except OSError as exc:
        return f"cannot serve on {host}:{port}: {exc.strerror}"
    return None


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


def dev_main(argv: list[str], signals: ShutdownSignals | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mosaic-serve dev", usage="%(prog)s [--port P] [--dir D] [--gateway-port G] [server flags]",
        description="Local development stack (`make serve`): a dev API key and the default models on 127.0.0.1.",
        epilog="Every other flag passes through to the server: see `mosaic-serve --help` (e.g. --model, "
               "--max-num-seqs, --config FILE.yaml).")
    parser.add_argument("--port", type=int, default=8000, help="serving port (default: %(default)s)")
    parser.add_argument("--dir", type=Path, default=DEV_DIR,
                        help="where the dev key files live, git-ignored (default: %(default)s)")
    parser.add_argument("--gateway-port", type=int, default=5000,
                        help="MLflow AI Gateway port (gateway_configs/local.yaml); 0 to run without the gateway "
                             "(default: %(default)s)")
    args, rest = parser.parse_known_args(argv)
    keys_file, key_path = args.dir / "api_keys.json", args.dir / "api_key"
    key, created = _dev_key(keys_file, key_path)
    if created:
        # The key itself is never printed (terminal scrollback and CI logs keep it): the file holds it.
        print(f"Created a development API key in {key_path} (`cat {key_path}` to see it)", flush=True)

    def on_ready(base_url: str, config: Any) -> None:
        import httpx

        # Run the request the printed line makes, so the line shown is known to work.
        model = config.engine_config().served_model_name
        reply = httpx.post(f"{base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"model": model, "messages": [{"role": "user", "content": "Hello! Who are you?"}],
                                 "max_tokens": 32}, timeout=120)
        reply.raise_for_status()
        print(f"\nReady. Try:\n  {curl_line(base_url, model, key_path)}", flush=True)
        if gateway is not None and _gateway_ready(gateway, args.gateway_port):
            print(f"\nMLflow AI Gateway on http://127.0.0.1:{args.gateway_port} (endpoints llama2-chat, "
                  f"llama2-completions, embeddings; it checks no caller keys):\n  {gateway_line(args.gateway_port)}",
                  flush=True)
        elif gateway is not None:
            print(f"\nThe MLflow AI Gateway did not come up on port {args.gateway_port} (see its log above); "
                  "serving goes on without it.", flush=True)
        print("\nCtrl-C stops the server.", flush=True)

    gateway = None
    if args.gateway_port and _port_taken(args.gateway_port):
        print(f"Port {args.gateway_port} is taken by another program (`mlflow ui`? macOS AirPlay Receiver?): "
              "running without the MLflow AI Gateway; --gateway-port N picks another port.", flush=True)
    elif args.gateway_port:
        gateway = _start_gateway(args.gateway_port, args.port, key, args.dir)
    try:
        return serve_main(["--host", "127.0.0.1", "--port", str(args.port), "--api-keys-file", str(keys_file),
                           *rest], on_ready=on_ready, signals=signals)
    finally:
        if gateway is not None:
            os.killpg(gateway.pid, signal.SIGTERM)
            gateway.wait(timeout=30)


def gateway_line(port: int) -> str:
    """A command that calls the dev gateway, with this interpreter (the venv's, where mlflow is installed)."""
    return (f"{sys.executable} -c \"from mlflow.deployments import get_deploy_client; "
            f"print(get_deploy_client('http://127.0.0.1:{port}').predict(endpoint='llama2-chat', "
            "inputs={'messages': [{'role': 'user', 'content': 'Hi'}], 'max_tokens': 16}))\"")


def _port_taken(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port or holds the port (gunicorn could not bind it, or would
    share it with another program that answers instead)."""
    with socket.socket() as probe:
        probe.settimeout(1.0)
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return True
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _gateway_ready(gateway: subprocess.Popen, port: int, timeout_s: float = 60.0) -> bool:
    """Whether our gateway process is running and answers its health check."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while gateway.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return gateway.poll() is None
        time.sleep(0.5)
    return False


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
    signals = ShutdownSignals()
    signals.install()
    if argv and argv[0] == "dev":
        return dev_main(argv[1:], signals)
    return serve_main(argv, signals=signals)


if __name__ == "__main__":
    sys.exit(main())
