"""The embedded default model `tiny-llama-2-chat`: a Llama-2-architecture chat checkpoint built offline.

It is built once, deterministically (fixed seed, weights drawn by our own generator so a transformers
upgrade cannot change them), into a cache folder, and from then on it is an ordinary Hugging Face
checkpoint folder that goes through the same loader as any other.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch

from serving.config import DEFAULT_MODEL
from serving.utils.cache import cache_dir

logger = logging.getLogger(__name__)

# Bump when the recipe changes, so old caches are rebuilt instead of reused.
_RECIPE_VERSION = "v1"
_SEED = 0
_COMPLETE_MARKER = ".complete"

# The Llama-2-chat template as Meta's tokenizer_config ships it: system prompt folded into the first user
# turn, roles must alternate, each assistant turn closed by </s>.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


def resolve_model(name_or_path: str) -> Path:
    """Map a model argument to a checkpoint folder, building the embedded default on first use."""
    if name_or_path == DEFAULT_MODEL:
        return ensure_tiny_checkpoint()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model {name_or_path!r} is neither {DEFAULT_MODEL!r} nor a Hugging Face checkpoint folder "
            "with a config.json"
        )
    return path


def ensure_tiny_checkpoint(root: Path | None = None) -> Path:
    root = root or cache_dir()
    target = root / f"{DEFAULT_MODEL}-{_RECIPE_VERSION}"
    if (target / _COMPLETE_MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    # Build in a private folder and rename it into place: rename is atomic, so a concurrent first use
    # either wins the rename or finds the finished folder; nobody ever reads a half-written one.
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=root))
    try:
        build_tiny_checkpoint(staging)
        (staging / _COMPLETE_MARKER).write_text(_RECIPE_VERSION)
        try:
            staging.rename(target)
            logger.info("built the embedded model %s in %s", DEFAULT_MODEL, target)
        except OSError:
            if not (target / _COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_tiny_checkpoint(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = build_tokenizer(folder)
    config = dict(TINY_CONFIG, vocab_size=vocab_size)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}, indent=2)
    )
    write_random_weights(folder, config, seed=_SEED)


def build_tokenizer(folder: Path, vocab_size: int = 1000) -> int:
    """Train a sentencepiece BPE tokenizer like Llama-2's (byte fallback, digits split) on the shipped text."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    corpus = resources.files("serving") / "data" / "tiny_corpus.txt"
    with resources.as_file(corpus) as corpus_path:
        spm.SentencePieceTrainer.train(
            input=str(corpus_path),
            model_prefix=str(folder / "tokenizer"),
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            character_coverage=1.0,
            byte_fallback=True,
            split_digits=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            add_dummy_prefix=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            num_threads=1,
            minloglevel=2,
        )
    (folder / "tokenizer.vocab").unlink(missing_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "model_max_length": TINY_CONFIG["max_position_embeddings"],
        "chat_template": LLAMA2_CHAT_TEMPLATE,
    }, indent=2))
    # Converting once here writes tokenizer.json, so every later load is the fast tokenizers path.
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def write_random_weights(folder: Path, config: dict, seed: int, std: float = 0.02,
                         logit_std: float | None = None) -> None:
    """Write a HF-layout safetensors file with weights drawn from a seeded generator.

    Random weights give near-uniform next-token distributions. `logit_std` (untied models only) draws the LM
    head so that logits have about this spread (the final RMSNorm makes the hidden state's norm
    sqrt(hidden_size)): around 7 the top token typically has probability > 0.5, like a trained model's,
    which is what checks of quantization quality need.
    """
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    head_std = std if logit_std is None else logit_std / config["hidden_size"] ** 0.5
    tensors = {name: _init(shape, name, generator, head_std if name == "lm_head.weight" else std)
               for name, shape in llama_weight_shapes(config).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def llama_weight_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    vocab = config["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _init(shape: tuple[int, ...], name: str, generator: torch.Generator, std: float) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    return torch.randn(shape, generator=generator) * std
