"""Token sampling for a whole batch in a few tensor ops.

Greedy rows take the argmax of the raw logits. Sampled rows are scaled by their temperature, cut to their
top-k / top-p set, and sampled with the Gumbel-max trick: argmax(logits + Gumbel noise) draws from
softmax(logits). Rows with a `seed` take their noise from a counter-based hash of (seed, step, token id)
computed with integer tensor ops, so a seeded request draws the same tokens whatever else shares the batch
and no per-row torch.Generator is needed; other rows use the engine's generator.

Before that, the logits of rows that ask for it are processed, each kind in one batched op over the rows
that use it: a grammar's allowed-token bitmask, sparse additions (logit_bias, and -inf for EOS under
min_tokens), the repetition penalty over prompt and output tokens, and the frequency/presence penalties over
output-token counts. Those counts stay on the device from step to step (serving/layers/penalty_counts.py), so
a step uploads only the tokens sampled since. Greedy rows take the argmax of the processed logits.

Log-probabilities are of the raw model distribution (log_softmax of the unprocessed logits, vLLM's default
`raw_logprobs`), computed once for the step's rows: the chosen token's plus the top-k.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from serving.layers.penalty_counts import PenaltyCounts

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31: products with 32-bit values stay below 2**63, so int64 never overflows.
_MUL_A = 0x7FEB352D
_MUL_B = 0x2C1B3C6D
_MIN_UNIFORM = 1e-20


@dataclass
class SamplingTensors:
    """Per-row sampling settings (on the model's device) and the host-side facts that pick the code path.

    Rows are the rows of the logits passed to the sampler. Only rows that sample (temperature > 0) have
    settings; `sample_rows` lists them (None when every row is greedy).
    """
    sample_rows: torch.Tensor | None = None     # [R] int64 row indices
    temperature: torch.Tensor | None = None     # [R] float32
    top_k: torch.Tensor | None = None           # [R] int64, vocab size when disabled; None: no row uses it
    top_p: torch.Tensor | None = None           # [R] float32; None: no row uses it
    seeded_rows: torch.Tensor | None = None     # [S] int64 indices into the R sampled rows
    seeds: torch.Tensor | None = None           # [S] int64
    steps: torch.Tensor | None = None           # [S] int64: tokens the sequence generated before this one
    all_sampled: bool = False                   # no greedy row at all
    num_logprobs: int | None = None             # top logprobs to return; None: no row asked for logprobs
    # Processing (rows index the logits; None: no row uses it).
    mask_rows: torch.Tensor | None = None       # [G] int64 rows under a grammar
    token_bitmask: torch.Tensor | None = None   # [G, ceil(V / 32)] int32: bit j of word w allows token 32w + j
    bias_rows: torch.Tensor | None = None       # [B] int64 (logit_bias entries and min_tokens bans)
    bias_ids: torch.Tensor | None = None        # [B] int64
    bias_values: torch.Tensor | None = None     # [B] float32 (-inf bans)
    penalty_rows: torch.Tensor | None = None    # [P] int64 rows with a penalty
    presence: torch.Tensor | None = None        # [P] float32
    frequency: torch.Tensor | None = None       # [P] float32
    repetition: torch.Tensor | None = None      # [P] float32; None: no row uses it
    # Their token counts (PenaltyCounts), one slot per sequence, and this step's uploads to them.
    num_penalty_slots: int = 0
    penalty_slots: torch.Tensor | None = None   # [P] int64 slot of each penalty row
    reset_slots: torch.Tensor | None = None     # [R] int64 slots a new sequence took: zeroed first
    prompt_slots: torch.Tensor | None = None    # [Q] int64, with prompt_ids: prompt tokens to mark
    prompt_ids: torch.Tensor | None = None      # [Q] int64
    count_slots: torch.Tensor | None = None     # [M] int64, with count_ids: generated tokens to count
    count_positions: torch.Tensor | None = None # [M] int64 index among the sequence's generated tokens
    count_ids: torch.Tensor | None = None       # [M] int64

    @property
    def processes(self) -> bool:
        return self.mask_rows is not None or self.bias_rows is not None or self.penalty_rows is not None


@dataclass
class Logprobs:
    chosen: torch.Tensor                        # [N] float32: log-probability of the given token
    top_ids: torch.Tensor | None = None         # [N, k] int64
    top_logprobs: torch.Tensor | None = None    # [N, k] float32

    def cpu(self) -> Logprobs:
        return Logprobs(*(None if t is None else t.to("cpu", non_blocking=True)
                          for t in (self.chosen, self.top_ids, self.top_logprobs)))


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor                     # [N] int64
    logprobs: Logprobs | None = None            # of the sampled tokens
    prompt_logprobs: Logprobs | None = None     # of the prompt tokens whose logits the step computed

    def cpu(self) -> SamplerOutput:
        """Host copies of everything, with a single synchronization for the whole step."""
        if self.token_ids.device.type == "cpu":
            return self
        out = SamplerOutput(self.token_ids.to("cpu", non_blocking=True),
                            self.logprobs.cpu() if self.logprobs is not None else None,
                            self.prompt_logprobs.cpu() if self.prompt_logprobs is not None else None)
        torch.cuda.current_stream(self.token_ids.device).synchronize()
        return out


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> Logprobs:
    """logprobs: [N, V] log-probabilities; the given tokens' values and the top k of every row."""
    out = Logprobs(chosen=logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1))
    if k > 0:
        out.top_logprobs, out.top_ids = logprobs.topk(k, dim=-1)
    return out


class Sampler:
    def __init__(self, device: torch.device, seed: int):
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._token_keys: torch.Tensor | None = None
        self._counts: PenaltyCounts | None = None

    def __call__(self, logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
        """logits: [N, V] float32 (raw model output; not modified)."""
        raw_logprobs = logits.log_softmax(dim=-1) if t.num_logprobs is not None else None
        if t.processes:
            logits = process_logits(logits.clone(), t, self._penalty_counts(t, logits))
        if t.sample_rows is None:
            token_ids = logits.argmax(dim=-1)
        else:
            x = logits if t.all_sampled else logits.index_select(0, t.sample_rows)
            x = x / t.temperature.unsqueeze(1)
            if t.top_k is not None or t.top_p is not None:
                x = apply_top_k_top_p(x, t.top_k, t.top_p)
            sampled = (x + self._gumbel(x, t)).argmax(dim=-1)
            if t.all_sampled:
                token_ids = sampled
            else:
                token_ids = logits.argmax(dim=-1).index_copy_(0, t.sample_rows, sampled)
        out = SamplerOutput(token_ids=token_ids)
        if raw_logprobs is not None:
            out.logprobs = gather_logprobs(raw_logprobs, token_ids, t.num_logprobs)
        return out

    def _penalty_counts(self, t: SamplingTensors, logits: torch.Tensor) -> PenaltyCounts | None:
        """The device-side counts with this step's uploads folded in (allocated at the first penalty)."""
        if t.penalty_rows is None:
            return None
        if self._counts is None:
            self._counts = PenaltyCounts(t.num_penalty_slots, logits.shape[1], logits.device)
        self._counts.update(t)
        return self._counts

    def _gumbel(self, x: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
        uniform = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=torch.float32)
        if t.seeded_rows is not None:
            uniform.index_copy_(0, t.seeded_rows, self._seeded_uniform(t.seeds, t.steps, x.shape[1]))
        return uniform.clamp_(min=_MIN_UNIFORM).log_().neg_().log_().neg_()

    def _seeded_uniform(self, seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """[S, V] uniforms in (0, 1), a pure function of (seed, step, token id)."""
        keys = self._token_keys
        if keys is None or keys.numel() != vocab_size or keys.device != seeds.device:
            keys = self._token_keys = _mix32(torch.arange(vocab_size, device=seeds.device) + 0x9E3779B9)
        row = _mix32(_mix32(_mix32(seeds & _MASK32) ^ (seeds >> 32)) ^ (steps & _MASK32))
        bits = _mix32(row.unsqueeze(1) ^ keys.unsqueeze(0))
        # 24 high bits are exact in float32; the half-step offset keeps 0 and 1 out.
        return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL_B) & _MASK32
    return x ^ (x >> 16)


def process_logits(x: torch.Tensor, t: SamplingTensors, counts: PenaltyCounts | None) -> torch.Tensor:
    """Apply grammar masks, sparse biases and penalties (over `counts`, when a row has one) to `x` [N, V]
    in place (see the module doc)."""
    vocab_size = x.shape[1]
    if t.mask_rows is not None:
        # Each bitmask byte looks up its 8 additive entries (0 allowed, -inf not): two passes over the rows.
        mask_bytes = t.token_bitmask.view(torch.uint8).long()
        additive = _bit_table(x.device)[mask_bytes].flatten(1)[:, :vocab_size]
        x.index_add_(0, t.mask_rows, additive)
    if t.bias_rows is not None:
        x.index_put_((t.bias_rows, t.bias_ids), t.bias_values, accumulate=True)
    if t.penalty_rows is not None:
        rows = x.index_select(0, t.penalty_rows)
        if t.repetition is not None:
            penalty = t.repetition.unsqueeze(1)
            rows = torch.where(counts.seen(t.penalty_slots), torch.where(rows < 0, rows * penalty, rows / penalty),
                               rows)
        if t.presence is not None:
            generated = counts.generated(t.penalty_slots)
            rows -= t.frequency.unsqueeze(1) * generated + t.presence.unsqueeze(1) * (generated > 0)
        x.index_copy_(0, t.penalty_rows, rows)
    return x


@functools.cache
def _bit_table(device: torch.device) -> torch.Tensor:
    """[256, 8] float32: entry (b, k) is 0 if bit k of byte b is set, else -inf (little-endian bitmask words)."""
    bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
    return torch.where(bits.bool(), 0.0, float("-inf")).to(device)


def apply_top_k_top_p(x: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Set logits outside each row's top-k and top-p (nucleus) sets to -inf. The best token always stays."""
    sorted_x, order = x.sort(dim=-1, descending=True)
    if top_k is not None:
        ranks = torch.arange(x.shape[1], device=x.device)
        sorted_x.masked_fill_(ranks.unsqueeze(0) >= top_k.unsqueeze(1), float("-inf"))
    if top_p is not None:
        probs = sorted_x.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_x.masked_fill_(mass_before > top_p.unsqueeze(1), float("-inf"))
    return x.scatter_(1, order, sorted_x)
