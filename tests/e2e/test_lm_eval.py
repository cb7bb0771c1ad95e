"""A real evaluation harness against the real serving stack: lm-eval's `local-completions` model runs a
loglikelihood (multiple-choice) task and a generation task, both defined by files this test writes (no hub).
Its loglikelihoods must equal log-probabilities computed directly with transformers on the served checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from serving.models.tiny import resolve_model
from tests.fixtures.checkpoints import hf_model

ATOL = 1e-4
MC_DOCS = [
    {"question": "The capital of France is", "choices": [" Paris", " Rome", " a small blue bird"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" four", " five"], "answer": 0},
    {"question": "Water is made of", "choices": [" hydrogen and oxygen", " sand", " light"], "answer": 0},
    {"question": "Once upon a", "choices": [" time", " tree"], "answer": 0},
]
GEN_DOCS = [{"question": "Q: Say yes.\nA:", "answer": " yes"}, {"question": "Q: Count to three.\nA:", "answer": " 1 2 3"}]


def write_tasks(folder: Path) -> None:
    for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (folder / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")


@pytest.mark.slow
def test_lm_eval_local_completions(serving_stack, tmp_path: Path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    for name, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "ds"),
                        "HF_HOME": str(tmp_path / "hf"), "OPENAI_API_KEY": serving_stack.api_key}.items():
        monkeypatch.setenv(name, value)
    write_tasks(tmp_path)
    checkpoint = resolve_model(serving_stack.model)
    lm = LocalCompletionsAPI(base_url=f"{serving_stack.base_url}/v1/completions", model=serving_stack.model,
                             tokenizer=str(checkpoint), tokenizer_backend="huggingface", add_bos_token=True,
                             max_length=512, max_retries=1, num_concurrent=1, batch_size=4)
    results = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc", "tiny_gen"], log_samples=True,
                                      task_manager=TaskManager(include_path=str(tmp_path)), random_seed=0,
                                      numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    assert set(results["results"]) == {"tiny_mc", "tiny_gen"}
    assert 0.0 <= results["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert "exact_match,remove_whitespace" in results["results"]["tiny_gen"] or any(
        k.startswith("exact_match") for k in results["results"]["tiny_gen"])
    gens = [s["resps"][0][0] for s in results["samples"]["tiny_gen"]]
    assert len(gens) == len(GEN_DOCS) and all(isinstance(g, str) and "\n" not in g for g in gens)

    model = hf_model(checkpoint)
    samples = results["samples"]["tiny_mc"]
    assert len(samples) == len(MC_DOCS)
    checked = 0
    for sample in samples:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            context_ids, continuation_ids = lm._encode_pair(context, continuation)
            ids = context_ids + continuation_ids
            with torch.inference_mode():
                logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            rows = logprobs[len(context_ids) - 1:len(ids) - 1]
            expected = rows.gather(1, torch.tensor(continuation_ids)[:, None]).sum().item()
            greedy = bool((rows.argmax(-1) == torch.tensor(continuation_ids)).all())
            loglikelihood, is_greedy = resp[0]
            assert abs(loglikelihood - expected) < ATOL
            assert is_greedy == greedy
            checked += 1
    assert checked == sum(len(d["choices"]) for d in MC_DOCS)
