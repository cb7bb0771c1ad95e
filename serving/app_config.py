"""The application's settings: everything `mosaic-serve` and `serve deploy` can set, as one flat schema
(the `args:` of deploy/serve_config.yaml, the fields of `mosaic-serve --config FILE`).

The engine's and the HTTP layer's fields are not restated here: they are generated from `EngineConfig` and
`ApiSettings` (serving/config.py), which stay the source of their defaults, checks and help texts (the
engine takes a dataclass, with or without this schema: the offline API has no pydantic). The replica,
embedding, ingress and lifecycle fields are declared in the sections below. `SECTIONS` groups all of them
the way `mosaic-serve --help` shows them; the CLI flags are generated from it.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from pydantic.fields import FieldInfo

from serving.config import DEFAULT_MODEL, ApiSettings, EngineConfig
from serving.embeddings import DEFAULT_EMBEDDING_MODEL
from serving.replicas.placement import check_placement


class AutoscalingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0, description="autoscaling: fewest LLM replicas (0: scale to zero)")
    max_replicas: int = Field(2, ge=1, description="autoscaling: most LLM replicas")
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="autoscaling: ongoing requests per replica to aim for (default: max_num_seqs)")


class ReplicaSettings(BaseModel):
    """The LLM replicas: how many, what each one takes from the cluster, how much each admits."""

    num_replicas: int = Field(1, ge=1, description="LLM replicas (a fixed count; see autoscaling)")
    autoscaling: AutoscalingSettings | None = Field(None, description="autoscale LLM replicas instead")
    llm_num_cpus: float = Field(1.0, gt=0, description="CPUs (and torch threads) per tensor-parallel rank")
    llm_num_gpus: float | Literal["auto"] = Field(
        "auto", description="GPUs per tensor-parallel rank: auto is 1 when the Ray cluster has GPUs, else 0 "
        "(CPU, float32); a fraction in (0, 1) shares a GPU (tensor_parallel_size 1 only)")
    llm_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per rank, e.g. {\"llm_node\": 1}: replicas go only "
        "to nodes started with them (ray start --resources ...)")
    max_waiting_requests: int = Field(64, ge=0, description="requests one replica queues behind a full batch; "
                                      "more are answered 503")
    stream_items_per_s: float = Field(100.0, ge=0, description="stream items per second one replica sends, "
                                      "shared by its streams (0: one item per engine step)")


class EmbeddingSettings(BaseModel):
    embedding_model: str = Field(DEFAULT_EMBEDDING_MODEL, description=f"{DEFAULT_EMBEDDING_MODEL} (bundled), a "
                                 "sentence-transformers folder, or none")
    embedding_served_name: str | None = Field(None, description="the name clients use (default: the model's)")
    embedding_num_replicas: int = Field(1, ge=1, description="embedding replicas")
    embedding_num_cpus: float = Field(0.5, gt=0, description="CPUs per embedding replica")
    embedding_max_ongoing_requests: int = Field(8, ge=1, description="requests one embedding replica runs")
    embedding_max_queued_requests: int = Field(64, ge=0, description="requests queued for the embedding "
                                               "replicas; more are answered 503")


class IngressSettings(BaseModel):
    ingress_num_replicas: int = Field(1, ge=1, description="ingress (HTTP handling) replicas")
    ingress_num_cpus: float = Field(0.5, gt=0, description="CPUs per ingress replica")
    ingress_resources: dict[str, float] = Field(default_factory=dict,
                                                description="custom Ray resources per ingress replica")
    ingress_max_ongoing_requests: int = Field(1024, ge=1, description="requests one ingress replica answers "
                                              "at once (as many more wait at the proxy; one serving its own "
                                              "port answers twice this many), more are answered 503")
    # Serving without keys must be asked for by name: build_app refuses otherwise (fail closed).
    insecure_no_auth: bool = Field(False, description="serve without API keys (refused otherwise)")


class LifecycleSettings(BaseModel):
    health_check_period_s: float = Field(10.0, gt=0, description="seconds between Ray's replica health checks")
    health_check_timeout_s: float = Field(30.0, gt=0, description="seconds a health check may take")
    graceful_shutdown_timeout_s: float = Field(60.0, ge=0, description="seconds a stopping replica drains the "
                                               "requests in flight")


def _dataclass_fields(cls: type) -> dict[str, tuple[Any, FieldInfo]]:
    """Pydantic fields for a settings dataclass: its types, defaults and help; its own __post_init__ checks
    the values (AppConfig's validator builds it)."""
    hints = typing.get_type_hints(cls)
    def spec(f: dataclasses.Field) -> FieldInfo:
        choices = f.metadata.get("choices")
        return Field(f.default, description=f.metadata["help"],
                     json_schema_extra={"choices": list(choices)} if choices is not None else None)

    return {f.name: (hints[f.name], spec(f)) for f in dataclasses.fields(cls)}


def _model_fields(cls: type[BaseModel]) -> dict[str, tuple[Any, FieldInfo]]:
    return {name: (info.annotation, info) for name, info in cls.model_fields.items()}


# How `--help` groups the settings: (title, source of its fields).
SECTIONS: list[tuple[str, type]] = [
    ("engine", EngineConfig),
    ("replicas", ReplicaSettings),
    ("embeddings", EmbeddingSettings),
    ("ingress & auth", IngressSettings),
    ("ingress & auth", ApiSettings),
    ("lifecycle", LifecycleSettings),
]


def section_fields(source: type) -> dict[str, tuple[Any, FieldInfo]]:
    return _dataclass_fields(source) if dataclasses.is_dataclass(source) else _model_fields(source)


class _AppConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _check(self) -> _AppConfigBase:
        # Fail at build time with the engine's, the API's and the limiter's own messages, not later inside a
        # replica.
        self.engine_config()
        self.api_settings()
        _check_rate_limit_storage(self.rate_limit_storage)
        check_placement(self)
        if self.api_keys_file is not None:
            self.api_keys_file = str(Path(self.api_keys_file).expanduser().resolve())
        if self.autoscaling is not None and self.autoscaling.max_replicas < max(1, self.autoscaling.min_replicas):
            raise ValueError("autoscaling.max_replicas must be >= min_replicas")
        return self

    @property
    def has_embeddings(self) -> bool:
        return self.embedding_model.lower() != "none"

    @property
    def replica_capacity(self) -> int:
        """Requests one LLM replica admits: a full batch running plus its bounded waiting queue."""
        return self.max_num_seqs + self.max_waiting_requests

    @property
    def router_queue(self) -> int:
        """Requests the ingress's handle may hold unassigned: what all replicas admit together.

        Ray counts a request as queued until it is assigned, which takes a probe of the replicas; with a
        smaller bound a burst that arrives at once is refused although the replicas have room. Once every
        replica is full, at most this many more wait here; beyond it, 503 at once.
        """
        replicas = self.autoscaling.max_replicas if self.autoscaling is not None else self.num_replicas
        return replicas * self.replica_capacity

    def engine_config(self) -> EngineConfig:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(EngineConfig)}
        values["served_model_name"] = self.served_model_name or default_served_name(self.model)
        return EngineConfig(**values)

    def api_settings(self) -> ApiSettings:
        return ApiSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ApiSettings)})


def _check_rate_limit_storage(uri: str) -> None:
    from limits.errors import ConfigurationError

    from serving.api.ratelimit import RateLimiter

    try:
        RateLimiter(uri)
    except ConfigurationError as exc:
        raise ValueError(f"rate_limit_storage={uri!r}: {exc}") from None


def default_served_name(model: str) -> str:
    """A model name is served as itself; a checkpoint folder under its folder name."""
    return model if model == DEFAULT_MODEL else Path(model).expanduser().resolve().name


AppConfig = create_model(
    "AppConfig", __base__=_AppConfigBase, __module__=__name__,
    __doc__="Everything `mosaic-serve` and `serve deploy` can set (the `args:` of deploy/serve_config.yaml).",
    **{name: spec for _, source in SECTIONS for name, spec in section_fields(source).items()},
)
