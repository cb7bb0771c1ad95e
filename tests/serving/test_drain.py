"""Drain means drain: Ctrl-C to `mosaic-serve`'s process group while a plain request and a stream are in
flight. New requests are refused at once, both accepted ones finish whole, and the server exits with nothing
of its own left running. `mosaic-serve` runs as users run it, with its own Ray instance."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from serving.api.auth import add_key
from tests.serving.helpers import scrape

# Long enough (seconds, even on a fast machine) that both requests are still in flight when the test looks.
MAX_TOKENS = 640


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_processes(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid=,sid=,comm="], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if int(line.split()[1]) == sid]


def _start_server(keys: Path, port: int, *flags: str) -> tuple[subprocess.Popen, list[str], threading.Thread]:
    """`mosaic-serve` in its own process group, like a command started from a terminal; its output
    accumulates in the returned list, read by the returned thread until the server's output closes."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    server = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "--port", str(port), "--api-keys-file", str(keys),
         "--embedding-model", "none", "--num-cpus-per-replica", "1", *flags],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(server.stdout), daemon=True)
    reader.start()
    return server, log, reader


def _server_session(server: subprocess.Popen) -> int | None:
    """The session of the server process proper: the supervisor's child, in a session of its own."""
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(server.pid)], capture_output=True, text=True)
    return int(children.stdout.split()[0]) if children.stdout.split() else None


def _kill_everything(server: subprocess.Popen, server_session: int | None) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
    if server_session is not None:
        for line in _session_processes(server_session):
            os.kill(int(line.split()[0]), signal.SIGKILL)


def _in_flight(base: str) -> float:
    samples = scrape(base)
    return sum(value for _, value in samples.get("mosaic_replica_in_flight_requests", []))


@pytest.mark.slow
def test_sigint_to_the_group_drains_a_request_and_a_stream(tmp_path: Path):
    keys = tmp_path / "keys.json"
    key = add_key(keys, "drain")
    port = _free_port()
    server, log, reader = _start_server(keys, port, "--max-num-seqs", "4", "--graceful-shutdown-timeout", "120")
    base, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    body = {"model": "tiny-llama-2-chat", "prompt": "Once upon a time", "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "temperature": 0.0}
    server_session = None
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, "".join(log)[-3000:]
            try:
                if httpx.get(f"{base}/v1/models", headers=headers, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "".join(log)[-3000:]
            time.sleep(1)
        server_session = _server_session(server)

        results: dict[str, object] = {}

        def plain() -> None:
            results["plain"] = httpx.post(f"{base}/v1/completions", headers=headers, json=body, timeout=300)

        stream_started = threading.Event()

        def stream() -> None:
            events = []
            with httpx.stream("POST", f"{base}/v1/completions", headers=headers, json={**body, "stream": True},
                              timeout=300) as r:
                results["stream_status"] = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        stream_started.set()
            results["stream"] = events

        threads = [threading.Thread(target=plain), threading.Thread(target=stream)]
        for t in threads:
            t.start()
        assert stream_started.wait(120)
        # Both accepted: the LLM replica holds two requests (the plain one has no first byte to wait for).
        deadline = time.monotonic() + 120
        while _in_flight(base) < 2:
            assert time.monotonic() < deadline and "plain" not in results, "the plain request was not admitted"
            time.sleep(0.1)
        os.killpg(server.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        # New requests are refused at once while the accepted ones finish.
        refused = None
        for _ in range(100):
            try:
                r = httpx.post(f"{base}/v1/completions", headers=headers, json={**body, "max_tokens": 1}, timeout=30)
            except httpx.HTTPError:
                refused = "closed"
                break
            if r.status_code == 503:
                refused = r
                break
            time.sleep(0.1)
        assert refused == "closed" or (refused.headers.get("Retry-After") and
                                       refused.json()["error"]["code"] == "shutting_down"), refused
        for t in threads:
            t.join(300)
        plain_reply = results["plain"]
        assert plain_reply.status_code == 200, plain_reply.text
        assert plain_reply.json()["usage"]["completion_tokens"] == MAX_TOKENS
        events = results["stream"]
        assert results["stream_status"] == 200 and events[-1] == "[DONE]", events[-3:]
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert server.wait(180) == 0, "".join(log)[-3000:]
        reader.join(10)
        assert "drained: no request in flight" in "".join(log)
        assert _session_processes(server_session) == []
    finally:
        _kill_everything(server, server_session)


@pytest.mark.slow
def test_sigint_while_starting_drains_and_exits_once_up(tmp_path: Path):
    """Ctrl-C in the first seconds (imports, ray.init) is not lost: the server comes up, drains (nothing yet)
    and exits, with nothing of its own left running."""
    keys = tmp_path / "keys.json"
    add_key(keys, "early")
    server, log, reader = _start_server(keys, _free_port())
    server_session = None
    try:
        deadline = time.monotonic() + 60
        while server_session is None:
            assert server.poll() is None and time.monotonic() < deadline, "".join(log)[-3000:]
            server_session = _server_session(server)
            time.sleep(0.2)
        time.sleep(1.0)   # the server process is importing or starting Ray
        os.killpg(server.pid, signal.SIGINT)
        assert server.wait(180) == 0, "".join(log)[-3000:]
        reader.join(10)
        assert "drained: no request in flight" in "".join(log)
        assert _session_processes(server_session) == []
    finally:
        _kill_everything(server, server_session)
