"""Endpoint configuration of the `mosaic` gateway provider (the `model.config` block of a gateway YAML)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from limits.errors import ConfigurationError
from mlflow.exceptions import MlflowException
from mlflow.gateway.base_models import ConfigModel
from pydantic import ConfigDict, Field, SecretStr, ValidationError, field_validator

from serving.utils.shared_limits import limits_storage


def resolve_api_key(reference: str) -> SecretStr:
    """Read a key from `$VARIABLE` or from a file path (surrounding whitespace stripped).

    Literal keys are refused so that a config file never holds a credential. Error messages name
    the variable or the path, never a value.
    """
    if reference.startswith("$"):
        name = reference[1:]
        value = os.environ.get(name)
        if not value:
            raise ValueError(
                f"mosaic_api_key: environment variable {name} is not set (or is empty); "
                f"export {name}=<key> before starting the gateway"
            )
        return SecretStr(value.strip())
    path = Path(reference).expanduser()
    # `is_file` raises OSError for names longer than the filesystem allows (a pasted key, say).
    try:
        is_file = path.is_file()
    except OSError:
        is_file = False
    if not is_file:
        raise ValueError(
            "mosaic_api_key must be $ENV_VARIABLE or the path of a file holding the key; the given "
            "value is neither a $-reference nor an existing file (literal keys are not accepted)"
        )
    value = path.read_text().strip()
    if not value:
        raise ValueError(f"mosaic_api_key: the key file {path} is empty")
    return SecretStr(value)


def _serving_root(url: str) -> str:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError("mosaic_api_base must be an http:// or https:// URL")
    if url.endswith("/v1"):
        raise ValueError("mosaic_api_base is the serving root (e.g. http://127.0.0.1:8000), without /v1")
    return url


class MosaicConfig(ConfigModel):
    """`model.config` of a `provider: mosaic` endpoint.

    `mosaic_api_base` is one serving root or an ordered list of them (regions): requests go to the first
    healthy one and fail over to the next on refused or dropped connections, timeouts and 503s (see
    regions.py); a region that failed is skipped for `region_cooldown_s` (or the Retry-After of its 503).

    Timeouts are in seconds. `max_concurrent_requests` is enforced per gateway worker process
    (an in-flight count dies with its process); `tokens_per_minute` lives in `limits_storage_uri`,
    so a shared store (redis://, memcached://) makes all workers spend one budget.
    """

    # Inputs stay out of validation messages: the key reference sits next to every other field.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    mosaic_api_base: str | list[str] = "http://127.0.0.1:8000"
    mosaic_api_key: SecretStr | None = None
    connect_timeout_s: float = Field(5.0, gt=0)
    request_timeout_s: float = Field(300.0, gt=0)
    stream_idle_timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0)
    retry_budget_s: float = Field(10.0, ge=0)
    region_cooldown_s: float = Field(10.0, gt=0)
    max_concurrent_requests: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    limits_storage_uri: str = "memory://"

    def __init__(self, **data: Any) -> None:
        # MLflow validates this model inside its own EndpointConfig, whose errors print the raw
        # `config` dict. An MlflowException is not a ValueError, so pydantic lets it through
        # unwrapped and the gateway start fails with only this message.
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise MlflowException.invalid_parameter_value(
                f"Invalid config for the mosaic provider: {e}"
            ) from None

    @property
    def api_bases(self) -> list[str]:
        """The serving roots in failover order."""
        return [self.mosaic_api_base] if isinstance(self.mosaic_api_base, str) else list(self.mosaic_api_base)

    @field_validator("mosaic_api_base")
    @classmethod
    def _check_api_base(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str):
            return _serving_root(value)
        if not value:
            raise ValueError("mosaic_api_base: give one URL or a non-empty list of URLs (regions)")
        roots = [_serving_root(url) for url in value]
        if len(set(roots)) != len(roots):
            raise ValueError("mosaic_api_base: a region is listed twice")
        return roots

    @field_validator("mosaic_api_key", mode="before")
    @classmethod
    def _resolve_key(cls, value: Any) -> Any:
        if isinstance(value, str):
            return resolve_api_key(value)
        return value

    @field_validator("limits_storage_uri")
    @classmethod
    def _check_storage(cls, value: str) -> str:
        # Building the storage checks the scheme and its client library now, at gateway start,
        # rather than on the first limited request.
        try:
            limits_storage(value)
        except ConfigurationError as e:
            raise ValueError(f"limits_storage_uri: {e}") from None
        return value
