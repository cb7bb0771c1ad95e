"""Offline batch API (contract): `LLM(model=...).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import itertools
from collections.abc import Sequence as SequenceABC

from transformers import PreTrainedTokenizerBase

from serving.config import EngineConfig
from serving.engine.llm_engine import LLMEngine
from serving.outputs import RequestOutput
from serving.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    # The defaults are EngineConfig's (the one source of each setting); the keywords are the documented ones.
    def __init__(self, model: str = EngineConfig.model,
                 tensor_parallel_size: int = EngineConfig.tensor_parallel_size, dtype: str = EngineConfig.dtype,
                 max_model_len: int | None = EngineConfig.max_model_len,
                 max_num_seqs: int = EngineConfig.max_num_seqs,
                 max_num_batched_tokens: int | None = EngineConfig.max_num_batched_tokens,
                 block_size: int | None = EngineConfig.block_size,
                 num_kv_blocks: int | None = EngineConfig.num_kv_blocks,
                 enable_prefix_caching: bool = EngineConfig.enable_prefix_caching, seed: int = EngineConfig.seed,
                 kv_cache_dtype: str = EngineConfig.kv_cache_dtype,
                 quantization: str | None = EngineConfig.quantization, **kwargs) -> None:
        """Extra keyword arguments go to EngineConfig (device, tokenizer, attention_backend, ...)."""
        self.engine = LLMEngine(EngineConfig(
            model=model, tensor_parallel_size=tensor_parallel_size, dtype=dtype, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
            num_kv_blocks=num_kv_blocks, enable_prefix_caching=enable_prefix_caching, seed=seed,
            kv_cache_dtype=kv_cache_dtype, quantization=quantization, **kwargs,
        ))
        self._request_ids = itertools.count()

    def shutdown(self) -> None:
        """Stop tensor-parallel followers now (they also stop when this process exits)."""
        self.engine.shutdown()

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order.

        Every prompt is validated before any runs, so one bad prompt raises ValueError and runs nothing.
        A request that makes a model step raise raises RequestFailedError (the engine itself stays usable).
        """
        single_ids = isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], int)
        if isinstance(prompts, str) or single_ids:
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts")
        requests = [self.engine.make_request(str(next(self._request_ids)), prompt, params)
                    for prompt, params in zip(prompts, sampling_params)]
        results: dict[str, RequestOutput] = {}
        try:
            for request in requests:
                self.engine.add(request)
            while len(results) < len(requests):
                for output in self.engine.step():
                    results[output.request_id] = output
                failures = self.engine.pop_failures()
                if failures:
                    # The others are aborted below; their partial outputs would be a silent half answer.
                    raise next(iter(failures.values()))
        finally:
            for request in requests:
                if request.request_id not in results:
                    self.engine.abort_request(request.request_id)
        return [results[request.request_id] for request in requests]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """One conversation (a list of messages) or several; applies the model's chat template."""
        is_one = isinstance(messages, SequenceABC) and bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if is_one else messages
        return self.generate([self.engine.encode_chat(list(c)) for c in conversations], sampling_params)
