"""Our Llama over the paged KV cache against transformers' Llama, logits compared step by step."""
from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from serving.layers.attention import select_backend
from serving.layers.sdpa_backend import CUDA_POLICY, KERNEL_PREFILL_MAX_CONTEXT_BYTES, SdpaBackend
from serving.models.loader import load_model
from serving.models.tiny import ensure_tiny_checkpoint
from tests.fixtures.checkpoints import hf_model
from tests.fixtures.paged_harness import BLOCK_SIZE, PagedHarness

ATOL = 2e-4


def reference_logits(hf: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("backend", ["sdpa", "cpu_kernel", "sdpa_cuda_policy"])
@pytest.mark.parametrize("fixture", ["llama_dir", "llama_alt_dir", "tiny_chat_dir"])
def test_paged_steps_match_transformers(fixture: str, backend: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    ours, hf = load_model(path, torch.float32, torch.device("cpu")), hf_model(path)
    gen = torch.Generator().manual_seed(0)
    vocab = ours.config.vocab_size
    seqs = {i: torch.randint(3, vocab, (n,), generator=gen).tolist() for i, n in enumerate([5, 37, 300])}
    if backend == "sdpa_cuda_policy":
        # What SDPA does on CUDA (expanded KV heads for a masked prefill, decode tiles of similar lengths),
        # computed on the CPU.
        harness = PagedHarness(ours, backend="sdpa")
        harness.use(SdpaBackend(harness.layout, CUDA_POLICY))
    else:
        harness = PagedHarness(ours, backend=select_backend(backend, torch.device("cpu"), torch.float32, BLOCK_SIZE))

    # 1. A mixed prefill: whole prompt prefixes of two lengths in one flat batch.
    logits = harness.step({1: seqs[1][:17], 2: seqs[2][:280]})
    torch.testing.assert_close(logits[:17], reference_logits(hf, seqs[1][:17]), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[17:], reference_logits(hf, seqs[2][:280]), atol=ATOL, rtol=0)

    # 2. A chunk after a cached prefix and a new whole prompt (prefill group), then a single-token decode.
    logits = harness.step({1: seqs[1][17:27], 0: seqs[0], 2: seqs[2][280:281]}, num_prefill_seqs=2)
    torch.testing.assert_close(logits[:10], reference_logits(hf, seqs[1][:27])[17:27], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[10:15], reference_logits(hf, seqs[0][:5]), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[15], reference_logits(hf, seqs[2][:281])[-1], atol=ATOL, rtol=0)

    # 3. A pure decode step over all three.
    logits = harness.step({0: [7], 1: [8], 2: [9]})
    for row, (sid, upto, tok) in enumerate([(0, 5, 7), (1, 27, 8), (2, 281, 9)]):
        expected = reference_logits(hf, seqs[sid][:upto] + [tok])[-1]
        torch.testing.assert_close(logits[row], expected, atol=ATOL, rtol=0)


def test_cpu_kernel_backend_splits_prefills_by_context(llama_dir: Path) -> None:
    """In one step of the CPU kernel backend: prefill chunks whose context exceeds the kernel's bound (a long
    prompt, and a short chunk after a long cached prefix) go through SDPA; a short prompt and a chunk after a
    short prefix through the kernel (each token a query at its position), with a decode row beside them;
    every row as transformers computes it."""
    ours, hf = load_model(llama_dir, torch.float32, torch.device("cpu")), hf_model(llama_dir)
    harness = PagedHarness(ours, backend="cpu_kernel")
    # KERNEL_PREFILL_MAX_CONTEXT_BYTES is 1024 tokens of this model's heads, past its position limit: 256 here.
    bound = 256
    per_token = harness.layout.gathered_bytes_per_token
    assert harness.backend._prefill_max_context == KERNEL_PREFILL_MAX_CONTEXT_BYTES // per_token == 1024
    harness.backend._prefill_max_context = bound
    gen = torch.Generator().manual_seed(1)
    seqs = {i: torch.randint(3, ours.config.vocab_size, (n,), generator=gen).tolist()
            for i, n in enumerate([bound + 40, 50, 9, 12, bound + 30])}
    plans = []
    plan = harness.backend.plan
    harness.backend.plan = lambda ctx: plans.append(plan(ctx)) or plans[-1]
    harness.step({1: seqs[1][:30], 2: seqs[2][:8], 4: seqs[4][:bound + 20]})
    chunks = {0: seqs[0], 1: seqs[1][30:], 4: seqs[4][bound + 20:], 3: seqs[3], 2: seqs[2][8:]}
    logits = harness.step(chunks, num_prefill_seqs=4)
    rows = dict(zip(chunks, torch.tensor([len(c) for c in chunks.values()]).cumsum(0).tolist()))
    starts = {sid: end - len(chunks[sid]) for sid, end in rows.items()}
    assert [p.rows for p in plans[-1].prefill] == [slice(0, bound + 40), slice(starts[4], rows[4])]
    # The kernel's rows see their position + 1 keys: the chunk after 30 cached tokens, the new prompt, the decode.
    lens = plans[-1].seq_lens.tolist()
    assert lens[starts[1]:rows[1]] == list(range(31, 51))
    assert lens[starts[3]:] == [*range(1, 13), 9]
    for sid, cached in [(0, 0), (1, 30), (4, bound + 20), (3, 0), (2, 8)]:
        torch.testing.assert_close(logits[starts[sid]:rows[sid]], reference_logits(hf, seqs[sid])[cached:],
                                   atol=ATOL, rtol=0)


@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
def test_sharded_checkpoint_loads_like_single_file(llama_dir: Path, tmp_path: Path, suffix: str) -> None:
    """Sharded with an index, as safetensors or as PyTorch .bin files (older checkpoints)."""
    tensors = load_file(str(llama_dir / "model.safetensors"))
    names = sorted(tensors)
    stem = "model" if suffix == "safetensors" else "pytorch_model"
    halves = {f"{stem}-00001-of-00002.{suffix}": names[::2], f"{stem}-00002-of-00002.{suffix}": names[1::2]}
    weight_map = {}
    for file, keys in halves.items():
        shard = {k: tensors[k] for k in keys}
        if suffix == "safetensors":
            save_file(shard, str(tmp_path / file))
        else:
            torch.save(shard, tmp_path / file)
        weight_map.update(dict.fromkeys(keys, file))
    (tmp_path / f"{stem}.{suffix}.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    single = load_model(llama_dir, torch.float32, torch.device("cpu")).state_dict()
    sharded = load_model(tmp_path, torch.float32, torch.device("cpu")).state_dict()
    assert single.keys() == sharded.keys()
    for key in single:
        torch.testing.assert_close(single[key], sharded[key], atol=0, rtol=0)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_single_bin_checkpoint_loads_like_safetensors(llama_dir: Path, tmp_path: Path, zip_format: bool) -> None:
    torch.save(load_file(str(llama_dir / "model.safetensors")), tmp_path / "pytorch_model.bin",
               _use_new_zipfile_serialization=zip_format)
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    reference = load_model(llama_dir, torch.float32, torch.device("cpu")).state_dict()
    from_bin = load_model(tmp_path, torch.float32, torch.device("cpu")).state_dict()
    for key in reference:
        torch.testing.assert_close(reference[key], from_bin[key], atol=0, rtol=0)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(ValueError, match="no weights"):
        load_model(tmp_path, torch.float32, torch.device("cpu"))


def test_missing_weights_and_unknown_model_are_clear_errors(llama_dir: Path, tmp_path: Path) -> None:
    from serving.models.tiny import resolve_model

    tensors = load_file(str(llama_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="down_proj"):
        load_model(tmp_path, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(tmp_path / "nowhere"))
    # A Llama whose MLP uses another activation would load and run with SiLU: refused, naming the field.
    config = json.loads((llama_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        load_model(tmp_path, torch.float32, torch.device("cpu"))


def _build(root: str) -> str:
    return str(ensure_tiny_checkpoint(Path(root)))


def test_tiny_checkpoint_is_deterministic_and_safe_to_build_concurrently(tmp_path: Path, tiny_chat_dir: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        built = pool.map(_build, [str(tmp_path)] * 2)
    assert built[0] == built[1]
    folder = Path(built[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no staging folder left behind
    fresh, reference = load_file(str(folder / "model.safetensors")), load_file(str(tiny_chat_dir / "model.safetensors"))
    assert fresh.keys() == reference.keys()
    assert all(torch.equal(fresh[k], reference[k]) for k in fresh)
    assert (folder / "tokenizer.json").read_bytes() == (tiny_chat_dir / "tokenizer.json").read_bytes()


def test_tiny_tokenizer_round_trips_and_has_llama2_chat_template(tiny_chat_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_dir)
    text = "Hello  world! Café 東京 🙂\nnew line"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok.decode(ids, skip_special_tokens=True) == text
    rendered = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}], tokenize=False)
    assert rendered == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Bye [/INST]"
