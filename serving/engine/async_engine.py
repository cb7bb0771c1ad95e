"""Asynchronous front of the engine: a background loop steps the engine while callers stream outputs.

Each step runs on one dedicated worker thread, so the event loop keeps serving while the model computes.
Engine state is only changed between steps, on the event loop's thread: new requests and aborts that
arrive during a step are applied right after it (an abort while the loop is idle frees blocks at once).
A request that makes a step raise fails alone with RequestFailedError (the engine finds it, see
`LLMEngine._isolate`); the others go on. If a step raises for no request's sake, every in-flight request
fails with EngineDeadError (the cause chained) and the engine stays dead: later calls raise at once and
`check_health` reports it, so no caller ever waits forever.

All methods must be called from the event loop's thread.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from transformers import PreTrainedTokenizerBase

from serving.config import EngineConfig
from serving.engine.errors import EngineDeadError, EngineStalledError, RequestFailedError
from serving.engine.llm_engine import EngineStats, LLMEngine
from serving.engine.sequence import Request
from serving.outputs import RequestOutput
from serving.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Put on a request's stream when it is aborted from outside: its generator then ends quietly.
_ABORTED = object()


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.engine = LLMEngine(config)
        self.tokenizer: PreTrainedTokenizerBase = self.engine.tokenizer
        self.max_model_len: int = self.engine.max_model_len
        self.model_name: str = config.served_model_name or config.model
        self._streams: dict[str, asyncio.Queue] = {}
        self._pending: list[Request] = []
        self._pending_aborts: list[str] = []
        self._stepping = False
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        self._death: BaseException | None = None
        self._last_progress = time.monotonic()

    # ---- tokenization ------------------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        return self.engine.encode(prompt)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.engine.encode_chat(messages)

    # ---- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._raise_if_dead()
        loop = asyncio.get_running_loop()
        if self._loop_task is None:
            self._wakeup = asyncio.Event()
            self._loop_task = loop.create_task(self._run_loop(), name="engine-loop")
        elif self._loop_task.get_loop() is not loop:
            # Its streams are fed from the loop it started on: waiting on them here would never end.
            raise RuntimeError("this AsyncLLMEngine runs on another event loop")

    async def shutdown(self) -> None:
        if self._death is None:
            self._fail(EngineDeadError("the engine was shut down"))
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
        self.engine.shutdown()
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def is_dead(self) -> bool:
        return self._death is not None

    def check_health(self) -> None:
        """Raise EngineDeadError if the loop died, EngineStalledError if work waits without progress."""
        self._raise_if_dead()
        try:
            self.engine.check_health()
        except EngineDeadError as error:
            self._fail(error)
            raise
        if self._has_work():
            idle = time.monotonic() - self._last_progress
            if idle > self.config.stall_timeout_s:
                raise EngineStalledError(
                    f"the engine made no step for {idle:.1f}s (stall_timeout_s="
                    f"{self.config.stall_timeout_s}) with {len(self._streams)} requests in flight"
                )

    def stats(self) -> EngineStats:
        stats = self.engine.stats()
        return dataclasses.replace(stats, num_waiting=stats.num_waiting + len(self._pending))

    # ---- requests ----------------------------------------------------------------------------------------

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (cumulative text plus the delta since the last one) until finished.

        Raises ValueError (RequestTooLargeError when it could never fit the KV pool) before the first
        output for invalid input, RequestFailedError if this request made a step raise, and EngineDeadError
        if the engine loop dies. Closing or cancelling the
        consumer aborts the request.
        """
        await self.start()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.guided_decoding is not None:
            # Compiling a grammar can take a while; the engine's compile below then hits the cache.
            await asyncio.to_thread(self.engine.grammars.compile, params.guided_decoding)
        request = self.engine.make_request(request_id, prompt, params, stream=True)
        if not self._has_work():
            # The stall clock starts when work arrives, not at the last step before an idle spell.
            self._last_progress = time.monotonic()
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        self._pending.append(request)
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if item is _ABORTED:
                    return
                if isinstance(item, EngineDeadError):
                    self._raise_if_dead()
                if isinstance(item, RequestFailedError):
                    raise item
                finished = item.finished
                yield item
        finally:
            if self._streams.get(request_id) is queue:
                del self._streams[request_id]
                if not finished:
                    self._abort_in_engine(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (now, or right after the step in progress)."""
        queue = self._streams.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(_ABORTED)
        self._abort_in_engine(request_id)

    def _abort_in_engine(self, request_id: str) -> None:
        if self._death is not None:
            return
        self._pending = [r for r in self._pending if r.request_id != request_id]
        if self._stepping:
            self._pending_aborts.append(request_id)
        else:
            self.engine.abort_request(request_id)

    # ---- the loop ----------------------------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._pending or self.engine.has_unfinished_requests())

    async def _run_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._has_work():
                    self._wakeup.clear()
                    await self._wakeup.wait()
                self._apply_pending()
                if not self.engine.has_unfinished_requests():
                    continue
                self._stepping = True
                try:
                    outputs = await loop.run_in_executor(self._executor, self.engine.step)
                finally:
                    self._stepping = False
                self._last_progress = time.monotonic()
                for output in outputs:
                    queue = self._streams.get(output.request_id)
                    if queue is not None:
                        queue.put_nowait(output)
                for request_id, failure in self.engine.pop_failures().items():
                    queue = self._streams.get(request_id)
                    if queue is not None:
                        queue.put_nowait(failure)
        except asyncio.CancelledError:
            if self._death is None:
                self._fail(EngineDeadError("the engine loop was cancelled"))
            raise
        except BaseException as exc:
            logger.exception("engine step failed; the engine is dead")
            error = EngineDeadError(f"the engine loop died: {exc!r}")
            error.__cause__ = exc
            self._fail(error)

    def _apply_pending(self) -> None:
        # Aborts first: a request id may be reused right after its abort.
        aborts, self._pending_aborts = self._pending_aborts, []
        for request_id in aborts:
            self.engine.abort_request(request_id)
        pending, self._pending = self._pending, []
        for request in pending:
            try:
                self.engine.add(request)
            except ValueError as error:  # its id is still in use (reused right after an abort mid-step)
                queue = self._streams.get(request.request_id)
                if queue is not None:
                    queue.put_nowait(RequestFailedError(str(error)))

    def _fail(self, error: EngineDeadError) -> None:
        self._death = error
        self._pending.clear()
        for queue in self._streams.values():
            queue.put_nowait(error)

    def _raise_if_dead(self) -> None:
        if self._death is not None:
            raise EngineDeadError(str(self._death)) from self._death.__cause__
