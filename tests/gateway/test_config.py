"""MosaicConfig: credentials, validation messages that never show a key, and MLflow's config loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.exceptions import MlflowException
from mlflow.gateway.config import _load_gateway_config
from mlflow.gateway.provider_registry import provider_registry

from mlflow_mosaic_provider.config import MosaicConfig
from mlflow_mosaic_provider.provider import MosaicProvider

SECRET = "s3cr3t-key-7f00d1e5"


def test_entry_point_registers_the_provider():
    assert provider_registry.get("mosaic") is MosaicProvider


def test_key_from_environment_variable(monkeypatch):
    monkeypatch.setenv("MOSAIC_TEST_KEY", SECRET)
    config = MosaicConfig(mosaic_api_key="$MOSAIC_TEST_KEY")
    assert config.mosaic_api_key.get_secret_value() == SECRET
    for text in (repr(config), str(config), config.model_dump_json()):
        assert SECRET not in text


def test_key_from_file_strips_the_trailing_newline(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "\n")
    assert MosaicConfig(mosaic_api_key=str(key_file)).mosaic_api_key.get_secret_value() == SECRET


def test_missing_variable_names_it(monkeypatch):
    monkeypatch.delenv("MOSAIC_TEST_UNSET", raising=False)
    with pytest.raises(MlflowException, match="environment variable MOSAIC_TEST_UNSET is not set"):
        MosaicConfig(mosaic_api_key="$MOSAIC_TEST_UNSET")


def test_literal_key_is_refused_without_echoing_it():
    with pytest.raises(MlflowException) as raised:
        MosaicConfig(mosaic_api_key=SECRET)
    assert "literal keys are not accepted" in raised.value.message
    assert SECRET not in raised.value.message


def test_unrelated_error_does_not_echo_inputs(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(SECRET)
    with pytest.raises(MlflowException) as raised:
        MosaicConfig(mosaic_api_key=str(key_file), max_retries="many", max_concurent_requests=3)
    message = raised.value.message
    assert "max_retries" in message and "max_concurent_requests" in message
    assert "many" not in message and str(key_file) not in message


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("mosaic_api_base", "http://host:8000/v1", "without /v1"),
        ("mosaic_api_base", "host:8000", "http:// or https://"),
        ("limits_storage_uri", "bogus://x", "unknown storage scheme"),
        ("tokens_per_minute", 0, "tokens_per_minute"),
        ("request_timeout_s", -1, "request_timeout_s"),
    ],
)
def test_invalid_settings_are_rejected(field, value, fragment):
    with pytest.raises(MlflowException, match=fragment):
        MosaicConfig(**{field: value})


def test_api_base_trailing_slash_is_dropped():
    assert MosaicConfig(mosaic_api_base="http://h:1/").mosaic_api_base == "http://h:1"


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "gateway.yaml"
    endpoint = {
        "name": "chat",
        "endpoint_type": "llm/v1/chat",
        "model": {"provider": "mosaic", "name": "m", "config": config},
    }
    path.write_text(yaml.safe_dump({"endpoints": [endpoint]}))
    return path


def test_mlflow_loads_a_mosaic_endpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("MOSAIC_TEST_KEY", SECRET)
    loaded = _load_gateway_config(
        _write(tmp_path, {"mosaic_api_key": "$MOSAIC_TEST_KEY", "max_concurrent_requests": 2})
    )
    config = loaded.endpoints[0].model.config
    assert isinstance(config, MosaicConfig)
    assert config.max_concurrent_requests == 2


def test_mlflow_config_error_carries_only_our_message(tmp_path):
    with pytest.raises(MlflowException) as raised:
        _load_gateway_config(_write(tmp_path, {"mosaic_api_key": SECRET}))
    assert "mosaic_api_key must be $ENV_VARIABLE" in raised.value.message
    assert SECRET not in raised.value.message


@pytest.mark.parametrize("name", ["local.yaml", "llama2-70b-chat.yaml"])
def test_shipped_configs_load(name, tmp_path, monkeypatch):
    monkeypatch.setenv("MOSAIC_API_KEY", SECRET)
    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "gateway_configs" / name).read_text())
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    loaded = _load_gateway_config(path)
    assert {e.endpoint_type for e in loaded.endpoints} == {
        "llm/v1/chat",
        "llm/v1/completions",
        "llm/v1/embeddings",
    }
    assert all(isinstance(e.model.config, MosaicConfig) and e.limit is not None for e in loaded.endpoints)


@pytest.mark.parametrize("uri", ["redis://cache:6379/0", "rediss://cache:6380", "memcached://cache:11211"])
def test_shared_storage_uris_load(uri):
    # The clients come with the shared-limits extra; building the storage does not connect.
    assert MosaicConfig(limits_storage_uri=uri).limits_storage_uri == uri


def test_unknown_storage_scheme_is_refused():
    with pytest.raises(MlflowException, match="limits_storage_uri"):
        MosaicConfig(limits_storage_uri="cassandra://db:9042")
