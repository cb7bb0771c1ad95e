"""The prepared GPU check: it exits cleanly, saying so, where there is no CUDA device; its check functions
(parity on mixed steps, the full decode, host-sync capture, throughput, the graph option) run on CPU here."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from serving import LLM
from serving.config import EngineConfig

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the check would run")
def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    command = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--output", str(tmp_path / "o.json")]
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout
    assert not (tmp_path / "o.json").exists()


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory, tiny_chat_dir) -> Path:
    return gpu_check.write_models(tmp_path_factory.mktemp("gpu-check"), tiny_chat_dir, mbu=False)["llama3"]


def test_mixed_step_parity_on_cpu(llama3_dir, llama_dir, capsys, tmp_path):
    """The check's mixed steps really mix (a chunked prompt, a prefix hit, decodes beside chunks) and agree
    with transformers in float32; against another model the same check fails."""
    assert "rope_scaling" in (llama3_dir / "config.json").read_text()
    llm = LLM(str(llama3_dir), device="cpu", dtype="float32", attention_backend="sdpa", max_num_batched_tokens=64,
              max_num_seqs=8, max_model_len=1024)
    report = gpu_check.Report(tmp_path / "check.json", device="cpu")
    reference = gpu_check.hf_model(llama3_dir, CPU, torch.float32)
    run = gpu_check.mixed_parity(report, "cpu", llm, {"transformers cpu fp32": reference})
    [check] = report.checks
    assert check["verdict"] == "PASS", check
    assert check["top1"] == {"transformers cpu fp32": 1.0}
    assert run.chunked and run.prefix_hits >= 128 and run.mixed_steps > 0 and not run.nan
    assert [len(t) for t in run.tokens] == [8, 12, 12, 12, 8, 12, 12]
    assert gpu_check.top1_agreement(gpu_check.hf_model(llama_dir, CPU, torch.float32), run.prompts, run.tokens) < 0.5
    assert "PASS mixed-step parity cpu" in capsys.readouterr().out
    assert json.loads((tmp_path / "check.json").read_text()) == {"device": "cpu", "checks": report.checks}


def test_full_decode_and_host_syncs_on_cpu(llama3_dir):
    llm = LLM(str(llama3_dir), device="cpu", max_num_seqs=4, max_model_len=256)
    assert [len(t) for t in gpu_check.full_decode(llm, long_prompt_len=200, new_tokens=3)] == [3] * 4
    assert gpu_check.decode_step_syncs(llm, CPU) == []            # no CUDA: nothing synchronizes
    assert not llm.engine.has_unfinished_requests()
    with gpu_check.host_sync_sites(CPU) as sites:
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
    assert len(sites) == 1 and "test_gpu_check.py" in sites[0] and "synchronizing" in sites[0]


def test_throughput_vs_transformers_on_cpu(llama3_dir):
    result = gpu_check.throughput_vs_transformers(llama3_dir, CPU, torch.float32, 3, (8, 24), (2, 4))
    assert result["engine_tok_s"] > 0 and result["transformers_tok_s"] > 0


def test_graph_option_follows_engine_config():
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    option = gpu_check.graph_option()
    assert (option is None) == ("cuda_graphs" not in names)
    if option is not None:
        for settings in option:
            EngineConfig(**settings)                                 # both settings are valid configs
