"""`mlflow gateway start` refuses a mosaic config whose key variable is missing, and says which."""

from __future__ import annotations

import os
import subprocess

import yaml

from tests.fixtures.gateway import GATEWAY_ENV, free_port, gateway_command


def test_missing_key_variable_fails_the_start_naming_it(tmp_path):
    variable = "MOSAIC_KEY_NOBODY_SET"
    endpoint = {
        "name": "chat",
        "endpoint_type": "llm/v1/chat",
        "model": {"provider": "mosaic", "name": "m", "config": {"mosaic_api_key": f"${variable}"}},
    }
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"endpoints": [endpoint]}))
    env = {k: v for k, v in os.environ.items() if k != variable} | GATEWAY_ENV
    # A timeout here would mean the gateway started with a dead endpoint instead of failing.
    result = subprocess.run(
        gateway_command(config, free_port()), env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert f"environment variable {variable} is not set" in result.stderr
    assert "Traceback" not in result.stderr
