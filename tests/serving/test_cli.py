"""`mosaic-serve` as users run it (keys, refusals), the dev-key flow of `make serve`, and the Ray Serve
config file for `serve deploy`."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serving.api.auth import KeyStore, hash_key, list_keys
from serving.cli import _dev_key, _port_taken, curl_line, gateway_line

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("mosaic-serve", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "serving.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120, check=False)


def test_keys_add_list_revoke(tmp_path):
    keys = tmp_path / "keys.json"
    added = _cli("keys", "add", "alice", "--api-keys-file", str(keys), "--requests-per-minute", "5",
                 "--tokens-per-minute", "1000")
    assert added.returncode == 0, added.stderr
    (key,) = added.stdout.split()  # the key, printed once, alone on stdout
    assert key.startswith("msk-") and key not in keys.read_text() and hash_key(key) in keys.read_text()
    assert KeyStore(keys).authenticate(f"Bearer {key}").name == "alice"

    listed = _cli("keys", "list", "--api-keys-file", str(keys))
    assert listed.returncode == 0 and "alice" in listed.stdout and "requests_per_minute=5" in listed.stdout
    assert key not in listed.stdout + listed.stderr and hash_key(key) not in listed.stdout

    duplicate = _cli("keys", "add", "alice", "--api-keys-file", str(keys))
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr and not duplicate.stdout
    assert _cli("keys", "revoke", "alice", "--api-keys-file", str(keys)).returncode == 0
    assert list_keys(keys) == []
    again = _cli("keys", "revoke", "alice", "--api-keys-file", str(keys))
    assert again.returncode == 1 and "no key named" in again.stderr


def test_keys_alone_and_dev_help_say_what_they_take():
    alone = _cli("keys")
    assert alone.returncode == 2 and all(a in alone.stderr for a in ("add", "revoke", "list"))
    assert "required" not in alone.stderr
    dev = _cli("dev", "--help")
    assert dev.returncode == 0 and "passes through to the server" in dev.stdout and "--gateway-port" in dev.stdout


def test_refuses_unsafe_or_invalid_settings_before_starting(tmp_path):
    open_no_auth = _cli("--host", "0.0.0.0", "--port", "8999")
    assert open_no_auth.returncode == 2 and "without API keys" in open_no_auth.stderr
    missing = _cli("--api-keys-file", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    invalid = _cli("--max-num-seqs", "0", "--num-gpus-per-replica", "0")
    assert invalid.returncode == 2 and "max_num_seqs" in invalid.stderr


def test_dev_key_is_created_once_and_kept_private(tmp_path):
    keys_file, key_path = tmp_path / ".dev" / "api_keys.json", tmp_path / ".dev" / "api_key"
    key, created = _dev_key(keys_file, key_path)
    assert created and key_path.read_text().strip() == key and (key_path.stat().st_mode & 0o077) == 0
    assert _dev_key(keys_file, key_path) == (key, False)
    # A key file that lost the dev key (revoked by hand) gets a fresh one.
    keys_file.unlink()
    new_key, created = _dev_key(keys_file, key_path)
    assert created and new_key != key and [r.name for r in list_keys(keys_file)] == ["dev"]
    line = curl_line("http://127.0.0.1:8000", "tiny-llama-2-chat", key_path)
    assert new_key not in line and f"$(cat {key_path})" in line and "/v1/chat/completions" in line


def test_dev_dir_is_git_ignored():
    ignored = subprocess.run(["git", "check-ignore", "-q", ".dev/api_key"], cwd=REPO, check=False)
    assert ignored.returncode == 0


def test_serve_deploy_config_builds_the_application():
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from serving.deployment import app_builder

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text()))
    (app,) = config.applications
    assert app.import_path == "serving.deployment:app_builder"
    assert isinstance(app_builder(app.args), Application)
    with pytest.raises(ValueError, match="num_replicas"):
        app_builder({**app.args, "num_replicas": 0})


def test_the_app_fails_closed_without_keys():
    """`serve deploy` (app_builder) and build_app refuse to run without keys unless asked by name."""
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from serving.deployment import app_builder

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text()))
    (app,) = config.applications
    args = {k: v for k, v in app.args.items() if k != "api_keys_file"}
    with pytest.raises(ValueError, match="without authentication"):
        app_builder(args)
    assert isinstance(app_builder({**args, "insecure_no_auth": True}), Application)


def test_cli_refuses_a_running_cluster_without_keys():
    """--address: the cluster's proxies keep their own HTTP options, so loopback cannot be promised."""
    refused = _cli("--address", "127.0.0.1:1", "--host", "127.0.0.1")
    assert refused.returncode == 2 and "running Ray cluster without API keys" in refused.stderr


def test_dev_gateway_port_check_and_example():
    """`make serve` skips the gateway when its port is taken; the example it prints runs with this venv."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert _port_taken(port)
    assert not _port_taken(port)
    line = gateway_line(port)
    assert line.startswith(f"{sys.executable} -c ") and f"http://127.0.0.1:{port}" in line


def test_plan_flags_have_help_and_defaults():
    from serving.plan_cli import _parser

    parser = _parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest != "help":
            shown = formatter._get_help_string(action)
            assert action.help and ("(default" in shown or action.required), action.dest
