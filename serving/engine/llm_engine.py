"""The synchronous engine: requests in, one scheduled model step per `step()`, outputs back.

Not thread-safe: one caller drives it (the offline `LLM`, or the `AsyncLLMEngine` loop). `make_request`
only reads the engine, so a caller can validate on its own thread and hand the request to the driver.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from serving.config import EngineConfig
from serving.engine.block_manager import BlockManager
from serving.engine.block_size import resolve_block_size
from serving.engine.detokenizer import IncrementalDetokenizer, backend_tokenizer
from serving.engine.errors import EngineDeadError, RequestFailedError, RequestTooLargeError
from serving.engine.executor import make_executor
from serving.engine.guided import GrammarCompiler, new_matcher
from serving.engine.model_runner import StepInputs, StepPlan
from serving.engine.prompts import check_context_window, encode_chat, encode_prompt
from serving.engine.scheduler import Scheduler, SchedulerOutput
from serving.engine.sequence import Request, Sequence
from serving.layers.sampler import Logprobs, SamplerOutput
from serving.models.loader import load_config
from serving.models.tiny import resolve_model
from serving.outputs import CompletionOutput, RequestMetrics, RequestOutput
from serving.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# The probe step (LLMEngine._probe) samples one token greedily.
_PROBE_PARAMS = SamplingParams(temperature=0.0, max_tokens=1)


@dataclass
class EngineStats:
    num_waiting: int
    num_running: int
    kv_cache_usage: float           # share of KV blocks held by requests (cached free blocks count as free)
    num_free_blocks: int
    num_total_blocks: int
    num_preemptions: int            # cumulative
    prefix_cache_queries: int       # cumulative, in prompt tokens looked up at admission
    prefix_cache_hits: int          # cumulative, in tokens served from the cache
    num_steps: int
    kv_cache_dtype: str             # auto (the model dtype) or int8
    kv_bytes_per_token: int         # one cached token's keys and values, all layers, per tensor-parallel rank
    kv_capacity_tokens: int         # tokens the whole pool holds
    block_size: int                 # tokens per KV-cache block
    block_size_source: str          # why that size: as configured, or what auto resolved it from
    # Pure decode steps within the batch buckets: "cuda_graphs" (replayed), "compiled" or "eager".
    decode_path: str = "eager"
    decode_buckets: int = 0         # buckets captured (cuda_graphs) or compiled at start
    bucketed_decode_steps: int = 0  # cumulative steps on that path (graph replays under cuda_graphs)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        # Before anything below (executor, followers, KV pool, block manager) counts in blocks.
        config, self.block_size_source = resolve_block_size(config)
        logger.info("KV-cache blocks of %d tokens (%s)", config.block_size, self.block_size_source)
        self.config = config
        path = resolve_model(config.model)
        self.model_path: Path = path
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(config.tokenizer or path)
        self._backend_tokenizer = backend_tokenizer(self.tokenizer)
        model_config = load_config(path)
        limit = model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(
                f"invalid max_model_len={config.max_model_len}: the model supports {limit} positions")
        self.max_model_len: int = config.max_model_len or limit
        self.executor = make_executor(config, path, self.max_model_len)
        self.vocab_size = self.executor.vocab_size
        self.block_manager = BlockManager(self.executor.num_kv_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens, self.block_manager)
        eos = model_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_token_ids: frozenset[int] = frozenset(
            eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size)
        self._requests: dict[str, Request] = {}
        self._failures: dict[str, RequestFailedError] = {}
        # The probe step's prompt (see _probe): fixed text, so it is the same known-good input every time.
        self._probe_ids: list[int] = self.tokenizer.encode("Hello", add_special_tokens=True)
        self.num_steps = 0

    # ---- input -------------------------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation under the model's chat template, ready for the assistant's turn."""
        return encode_chat(self.tokenizer, messages)

    def make_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                     stream: bool = False) -> Request:
        """Validate and tokenize; raises ValueError (RequestTooLargeError if it could never fit the pool)."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id must be a non-empty string")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            text, token_ids = prompt, self.encode(prompt)
        elif isinstance(prompt, list):
            if not prompt:
                raise ValueError("prompt is empty")
            bad = next((t for t in prompt if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"prompt token id {bad!r} is outside the vocabulary [0, {self.vocab_size})")
            text, token_ids = None, list(prompt)
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        self._check_top_k(params)
        check_context_window(len(token_ids), params.max_tokens, self.max_model_len)
        total = len(token_ids) + params.max_tokens
        blocks = self.block_manager.blocks_needed(total)
        if blocks > self.block_manager.num_blocks:
            raise RequestTooLargeError(
                f"request needs {blocks} KV-cache blocks for {total} tokens (prompt + max_tokens) but the "
                f"whole pool has {self.block_manager.num_blocks} blocks of {self.config.block_size} tokens: "
                "lower max_tokens or the prompt, or give the engine more num_kv_blocks"
            )
        bad = next((t for t in [*(params.logit_bias or ()), *params.stop_token_ids] if t >= self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"invalid token id {bad} in logit_bias or stop_token_ids: the vocabulary is "
                             f"[0, {self.vocab_size})")
        guide = params.guided_decoding
        compiled = self.grammars.compile(guide) if guide is not None else None
        request = Request(request_id=request_id, prompt=text, prompt_token_ids=token_ids, params=params,
                          stream=stream)
        if params.min_tokens:
            eos = [] if params.ignore_eos else sorted(self.eos_token_ids)
            request.min_tokens_banned = sorted({*eos, *params.stop_token_ids})
        for index in range(params.n):
            detokenizer = IncrementalDetokenizer(self._backend_tokenizer, token_ids, params.stop, params.min_tokens)
            grammar = new_matcher(compiled) if compiled is not None else None
            request.seqs.append(Sequence(request, index, detokenizer, grammar))
        return request

    def _check_top_k(self, params: SamplingParams) -> None:
        """What SamplingParams cannot know: top_k against this model's vocabulary (token ids: below)."""
        if params.top_k > self.vocab_size:
            raise ValueError(f"invalid top_k={params.top_k}: expected -1 (disabled) or at most the vocabulary "
                             f"size {self.vocab_size}")

    def add(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self._requests[request.request_id] = request
        for seq in request.seqs:
            self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        """Drop a request and free its KV blocks now; False if it is unknown or already finished."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.seqs:
            if not seq.finished:
                self.scheduler.abort(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # ---- the step ----------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one model step. Returns an output for every streaming request that advanced and for every
        request that finished. A request that makes the step raise is failed alone (see `_isolate`); collect
        those with `pop_failures`."""
        batch = self.scheduler.schedule()
        if batch is None:
            if self.scheduler.has_unfinished():
                # Cannot happen while requests are size-checked; failing beats spinning forever.
                raise RuntimeError("no waiting request fits the KV-cache pool although nothing is running")
            return []
        try:
            executed = self._execute(batch)
        except EngineDeadError:
            raise
        except Exception as error:  # noqa: BLE001 (attributed to a request below, or re-raised)
            batch, executed = self._isolate(batch, error)
            if executed is None:
                return []
        inputs, plan, result = executed
        sampled = plan.sampled
        token_ids: list[int] = result.token_ids.tolist()
        self.num_steps += 1
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += num_new
            self.block_manager.register(seq)
        now = time.time()
        advanced: dict[str, Request] = {}
        if result.prompt_logprobs is not None:
            self._record_prompt_logprobs(plan, result.prompt_logprobs, inputs.prompt_target_ids.tolist())
        if sampled and result.logprobs is not None:
            self._record_logprobs(sampled, result.logprobs, token_ids)
        for seq, token_id in zip(sampled, token_ids):
            request = seq.request
            if request.request_id not in self._requests:
                continue
            try:
                self._append_token(seq, token_id)
            except Exception as error:  # noqa: BLE001 (this request's own text handling)
                self._fail_request(request, error)
                advanced.pop(request.request_id, None)
                continue
            if request.first_token_time is None:
                request.first_token_time = now
            advanced[request.request_id] = request
        self.scheduler.remove_finished()
        outputs = []
        for request in advanced.values():
            finished = request.finished
            if finished:
                request.finished_time = now
            try:
                output = self._output(request, finished) if finished or request.stream else None
            except Exception as error:  # noqa: BLE001 (this request's own text handling)
                self._fail_request(request, error)
                continue
            if finished:
                del self._requests[request.request_id]
            if output is not None:
                outputs.append(output)
        return outputs

    def pop_failures(self) -> dict[str, RequestFailedError]:
        """Requests failed by the steps since the last call (already removed from the engine)."""
        failures, self._failures = self._failures, {}
        return failures

    # ---- fault isolation ---------------------------------------------------------------------------------

    def _execute(self, batch: SchedulerOutput) -> tuple[StepInputs, StepPlan, SamplerOutput]:
        """Prepare and run one step (its results on the host); nothing in the engine's bookkeeping changes
        until it returned."""
        inputs, plan = self.executor.prepare(batch)
        return inputs, plan, self.executor.run(inputs).cpu()

    def _isolate(self, batch: SchedulerOutput, error: Exception) -> tuple[SchedulerOutput, tuple | None]:
        """Find the requests that make the step raise, fail them alone, and run the step without them.

        A step only writes KV slots past each sequence's computed tokens and changes no bookkeeping until it
        returns, so it can be re-run on a subset. The culprit is found by re-running without the newest
        requests: a binary search for the shortest failing prefix of the batch's requests by arrival; its
        newest request is the culprit (the prefix before it ran fine). Repeated until the rest runs.

        When no trial ran (the culprit is the batch's oldest request, or alone), the engine itself may be
        what fails (a device error, an OOM left after freeing): a probe step that holds no client request
        decides. If it fails too, the error is re-raised and the caller declares the engine dead; if it
        runs, the culprit is failed alone, however many such requests came in a row.
        """
        suspects = sorted({s.request.request_id: s.request for s in batch.seqs}.values(),
                          key=lambda r: r.arrival_time)
        logger.warning("engine step failed with %s over %d requests; isolating the cause",
                       type(error).__name__, len(suspects))
        proven = False   # some step ran: the engine itself works
        remaining, failing = suspects, True
        executed = None
        while remaining and failing:
            lo, hi = 1, len(remaining)
            while lo < hi:
                mid = (lo + hi) // 2
                if self._trial(_sub_batch(batch, remaining[:mid])) is None:
                    hi = mid
                else:
                    lo, proven = mid + 1, True
            culprit = remaining[hi - 1]
            remaining = [r for r in remaining if r is not culprit]
            # Failed first, so that its blocks are free for the probe.
            self._fail_request(culprit, error)
            if not proven:
                if not self._probe():
                    logger.error("the probe step failed too (%s): the engine cannot run steps",
                                 type(error).__name__)
                    # Not its fault after all: it ends with the engine's death like every other request.
                    del self._failures[culprit.request_id]
                    raise error
                proven = True
            if remaining:
                batch = _sub_batch(batch, remaining)
                executed = self._trial(batch)
                failing = executed is None
        if executed is None:
            batch = _sub_batch(batch, [])
        return batch, executed

    def _trial(self, batch: SchedulerOutput) -> tuple | None:
        try:
            return self._execute(batch)
        except EngineDeadError:
            raise
        except Exception:  # noqa: BLE001 (a trial is expected to fail while the culprit is in it)
            return None

    def _probe(self) -> bool:
        """Whether the executor runs a step that holds no client request: a greedy prefill of a fixed
        prompt on fresh KV blocks (never offered to the prefix cache), freed afterwards."""
        request = Request(request_id="engine-probe", prompt=None, prompt_token_ids=self._probe_ids,
                          params=_PROBE_PARAMS)
        seq = Sequence(request, 0, IncrementalDetokenizer(self._backend_tokenizer, self._probe_ids, []))
        num_new = seq.num_tokens
        if not self.block_manager.grow(seq, num_new):
            # Cannot happen after failing a scheduled request (its blocks are free); without a block the
            # engine cannot be blamed, so the request is.
            logger.warning("no free KV block for the probe step; blaming the request")
            return True
        try:
            self._execute(SchedulerOutput(seqs=[seq], num_new_tokens=[num_new],
                                          num_prefill_seqs=int(num_new > 1)))
            return True
        except EngineDeadError:
            raise
        except Exception:  # noqa: BLE001 (the answer: the engine cannot run a step)
            return False
        finally:
            self.block_manager.free(seq)

    def _fail_request(self, request: Request, error: Exception) -> None:
        logger.warning("request %s failed in the engine step (%s); removed, the engine serves on",
                       request.request_id, type(error).__name__)
        self.abort_request(request.request_id)
        failure = RequestFailedError(
            f"the engine could not run this request ({type(error).__name__}: {str(error)[:200]}); "
            "other requests were not affected")
        failure.__cause__ = error
        self._failures[request.request_id] = failure

    def _append_token(self, seq: Sequence, token_id: int) -> None:
        seq.token_ids.append(token_id)
        params = seq.request.params
        detokenizer = seq.detokenizer
        # A grammar that is complete only allows its stop tokens; accepting one terminates the matcher.
        grammar_done = seq.grammar is not None and seq.grammar.accept_token(token_id) and seq.grammar.is_terminated()
        if (token_id in params.stop_token_ids or (token_id in self.eos_token_ids and not params.ignore_eos)
                or grammar_done):
            # The stop token stays in token_ids (like transformers' output) but adds no text.
            detokenizer.flush()
            seq.finish("stop")
        elif detokenizer.add_token(token_id):
            seq.finish("stop")
        elif seq.num_output_tokens >= params.max_tokens:
            seq.finish("stop" if detokenizer.flush() else "length")

    def _record_logprobs(self, sampled: list[Sequence], logprobs: Logprobs, token_ids: list[int]) -> None:
        entries = _entries(logprobs, token_ids, [seq.request.params.logprobs for seq in sampled])
        for seq, entry in zip(sampled, entries):
            if seq.logprobs is not None:
                seq.logprobs.append(entry)

    def _record_prompt_logprobs(self, plan: StepPlan, logprobs: Logprobs, token_ids: list[int]) -> None:
        ks = [seq.request.params.prompt_logprobs for seq, count in plan.prompt_scored for _ in range(count)]
        entries = iter(_entries(logprobs, token_ids, ks))
        for seq, count in plan.prompt_scored:
            scored = seq.request.prompt_logprobs
            scored.extend(itertools.islice(entries, count))

    def _output(self, request: Request, finished: bool) -> RequestOutput:
        completions = []
        for seq in request.seqs:
            delta_text = seq.detokenizer.take_delta(seq.finished)
            delta_ids = seq.token_ids[seq.num_prompt_tokens + seq.num_sent_tokens:]
            seq.num_sent_tokens = seq.num_output_tokens
            completions.append(CompletionOutput(
                index=seq.index, text=seq.detokenizer.sent_text, token_ids=seq.output_token_ids,
                finish_reason=seq.finish_reason, delta_text=delta_text, delta_token_ids=delta_ids,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
            ))
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt, prompt_token_ids=request.prompt_token_ids,
            outputs=completions, finished=finished, num_cached_tokens=request.seqs[0].num_cached_tokens or 0,
            metrics=RequestMetrics(request.arrival_time, request.first_token_time, request.finished_time),
            prompt_logprobs=list(request.prompt_logprobs) if request.prompt_logprobs is not None else None,
        )

    def check_health(self) -> None:
        """Raise EngineDeadError when a part of the model executor (a tensor-parallel rank) is gone."""
        self.executor.check_health()

    def shutdown(self) -> None:
        self.executor.shutdown()

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_waiting=len(self.scheduler.waiting), num_running=len(self.scheduler.running),
            kv_cache_usage=1.0 - bm.num_free_blocks / bm.num_blocks, num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks, num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=bm.prefix_cache_queries, prefix_cache_hits=bm.prefix_cache_hits,
            num_steps=self.num_steps, kv_cache_dtype=self.config.kv_cache_dtype,
            kv_bytes_per_token=self.executor.runner.kv_pool.bytes_per_token,
            kv_capacity_tokens=self.executor.runner.kv_pool.capacity_tokens, block_size=self.config.block_size,
            block_size_source=self.block_size_source, **self._decode_stats(),
        )

    def _decode_stats(self) -> dict[str, str | int]:
        decode = self.executor.runner.decode
        if decode is None:
            return {}
        return {"decode_path": decode.path, "decode_buckets": len(decode.prepare_seconds),
                "bucketed_decode_steps": decode.steps}


def _entries(logprobs: Logprobs, token_ids: list[int], ks: list[int | None]) -> list[dict[int, float] | None]:
    """Per row: {token id: log-probability} of the row's token first, then its top k (None where k is)."""
    chosen = logprobs.chosen.tolist()
    top_ids = logprobs.top_ids.tolist() if logprobs.top_ids is not None else None
    top_lps = logprobs.top_logprobs.tolist() if logprobs.top_logprobs is not None else None
    entries: list[dict[int, float] | None] = []
    for row, (token_id, k) in enumerate(zip(token_ids, ks)):
        entry = None if k is None else {token_id: chosen[row]}
        if k:
            entry.update(zip(top_ids[row][:k], top_lps[row][:k]))
        entries.append(entry)
    return entries


def _sub_batch(batch: SchedulerOutput, requests: list[Request]) -> SchedulerOutput:
    """The part of `batch` that belongs to `requests`, in the batch's order (prefill group first)."""
    keep = {r.request_id for r in requests}
    rows = [i for i, seq in enumerate(batch.seqs) if seq.request.request_id in keep]
    return SchedulerOutput(seqs=[batch.seqs[i] for i in rows], num_new_tokens=[batch.num_new_tokens[i] for i in rows],
                           num_prefill_seqs=sum(1 for i in rows if i < batch.num_prefill_seqs))
