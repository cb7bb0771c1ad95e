"""One source per setting: AppConfig is generated from EngineConfig / ApiSettings and the sections, every
field has a `mosaic-serve` flag, the flags' defaults are AppConfig's, and `--config FILE` merges under flags."""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

from serving.app_config import SECTIONS, AppConfig, AutoscalingSettings, section_fields
from serving.cli import _serve_parser, config_from_args, given_settings, serve_main
from serving.config import ApiSettings, EngineConfig
from serving.llm import LLM

REPO = Path(__file__).resolve().parents[2]
# What the command line sets on its own when not told (documented in its --help).
CLI_DEFAULTS = {"llm_num_cpus", "insecure_no_auth"}


def _parse(*argv: str):
    return _serve_parser().parse_args(list(argv))


def _actions() -> dict[str, object]:
    return {action.dest: action for action in _serve_parser()._actions}


def _other_value(annotation, default, action):
    """A value for the flag that differs from the field's default, as text and as parsed."""
    if action.choices:
        choice = next(c for c in action.choices if c != default)
        return ("none" if choice is None else str(choice)), choice
    if annotation is bool:
        return None, not default
    if isinstance(default, dict):
        return '{"r": 1.5}', {"r": 1.5}
    if "float" in str(annotation):
        return "0.75", 0.75
    if "int" in str(annotation):
        value = (default or 1) + 1
        return str(value), value
    return "other-value", "other-value"


def test_every_field_is_a_flag_that_sets_it():
    actions = _actions()
    fields = {name: spec for _, source in SECTIONS for name, spec in section_fields(source).items()}
    assert set(fields) == set(AppConfig.model_fields)
    fields.pop("autoscaling")
    fields.update({f"autoscaling.{n}": s for n, s in section_fields(AutoscalingSettings).items()})
    for name, (annotation, info) in fields.items():
        action = actions[name]
        assert info.description and info.description in action.help.replace("%%", "%"), name
        assert "(default" in action.help, name
        text, value = _other_value(annotation, info.get_default(call_default_factory=True), action)
        argv = [action.option_strings[0]] if text is None else [action.option_strings[0], text]
        if text is None and value is False:
            argv = ["--no-" + action.option_strings[0].removeprefix("--")]
        given = given_settings(_parse(*argv))
        if name.startswith("autoscaling."):
            assert given["autoscaling"][name.removeprefix("autoscaling.")] == value, name
        else:
            assert given == {name: value}, name


def test_flag_defaults_are_appconfig_defaults_and_engine_defaults():
    from_cli = AppConfig(**config_from_args(_parse())).model_dump()
    defaults = AppConfig().model_dump()
    assert {k: v for k, v in from_cli.items() if k not in CLI_DEFAULTS} == \
        {k: v for k, v in defaults.items() if k not in CLI_DEFAULTS}
    engine, api = EngineConfig(), ApiSettings()
    for f in dataclasses.fields(EngineConfig):
        if f.name != "max_num_batched_tokens":  # EngineConfig fills it from max_num_seqs
            assert defaults[f.name] == getattr(engine, f.name), f.name
    for f in dataclasses.fields(ApiSettings):
        assert defaults[f.name] == getattr(api, f.name), f.name
    # The offline API's documented keywords take EngineConfig's defaults.
    for name, parameter in inspect.signature(LLM.__init__).parameters.items():
        if parameter.default is not inspect.Parameter.empty:
            assert parameter.default == dataclasses.fields(EngineConfig)[
                [f.name for f in dataclasses.fields(EngineConfig)].index(name)].default, name
    assert "(default: 256)" in _actions()["max_num_seqs"].help


def test_old_flag_names_still_work():
    given = given_settings(_parse("--stall-timeout", "5", "--graceful-shutdown-timeout", "7",
                                  "--ingress-replicas", "2", "--num-cpus-per-replica", "3",
                                  "--num-gpus-per-replica", "0", "--min-replicas", "2"))
    assert given == {"stall_timeout_s": 5.0, "graceful_shutdown_timeout_s": 7.0, "ingress_num_replicas": 2,
                     "llm_num_cpus": 3.0, "llm_num_gpus": 0.0, "autoscaling": {"min_replicas": 2, "max_replicas": 2}}


def test_config_file_then_flags(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text(yaml.safe_dump({"max_num_seqs": 8, "seed": 3, "autoscaling": {"max_replicas": 5},
                                    "embedding_model": "none"}))
    config = AppConfig(**config_from_args(_parse("--config", str(flat), "--seed", "4", "--min-replicas", "2")))
    assert (config.max_num_seqs, config.seed, config.has_embeddings) == (8, 4, False)
    assert (config.autoscaling.min_replicas, config.autoscaling.max_replicas) == (2, 5)
    # The file `serve deploy` takes: its application's args.
    serve_file = REPO / "deploy" / "serve_config.yaml"
    (app,) = yaml.safe_load(serve_file.read_text())["applications"]
    config = AppConfig(**config_from_args(_parse("--config", str(serve_file), "--max-num-seqs", "4")))
    assert config.max_num_seqs == 4 and config.model == app["args"]["model"]
    assert config.llm_num_cpus == app["args"]["llm_num_cpus"]  # the file's, not the command line's default


def test_bad_config_file_is_refused_naming_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_num_seqz: 8\n")
    assert serve_main(["--config", str(bad)]) == 2
    assert "max_num_seqz" in capsys.readouterr().err
    bad.write_text("block_size: 24\n")
    assert serve_main(["--config", str(bad)]) == 2
    assert "block_size" in capsys.readouterr().err
    assert serve_main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_appconfig_checks_api_settings_with_their_own_messages():
    with pytest.raises(ValueError, match="max_prompts_per_request"):
        AppConfig(max_prompts_per_request=10_000)
    with pytest.raises(ValueError, match="retry_after_s"):
        AppConfig(retry_after_s=0)
    assert AppConfig(retry_after_s=5).api_settings().retry_after_s == 5
