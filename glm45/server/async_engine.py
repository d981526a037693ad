"""The bridge between asyncio request handlers and the synchronous, single-threaded `LLMEngine`.

One background thread owns the engine. Handlers never touch it: they put commands (add, abort, stop)
on a thread-safe queue, and the thread applies them between steps, steps while there is work, and
hands every `RequestOutput` to the request's `RequestStream` through `loop.call_soon_threadsafe`.
When idle the thread blocks on the queue, so an idle server costs nothing.

`add_request` waits until the engine has accepted the request, so validation errors (context too long,
bad token ids) reach the handler as `ValueError` before any response has started. Outputs are deltas (what is
new since the request's previous output, `RequestOutputKind.DELTA`), so no step copies a whole answer; the
handler reads every step's output in order (`OutputAccumulator` adds them up where the whole answer is
needed). A request's queue is bounded: when `MAX_PENDING_OUTPUTS` wait unread, the engine pauses the request
(it keeps its KV blocks, the others run on) until its reader is down to `RESUME_PENDING_OUTPUTS` — a slow
reader slows only its own request, and memory does not grow with it.

A step that fails aborts the requests it ran (`StepError`); their handlers get an `EngineError`, the others go on.

The thread also keeps the statistics: a snapshot of `engine.stats()` after every step for /metrics, and
per-request token timings for the latency histograms.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from glm45.engine.engine import LLMEngine, StepError
from glm45.engine.sampling_params import RequestOutputKind, SamplingParams
from glm45.engine.sequence import CompletionOutput, RequestOutput
from glm45.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

MAX_PENDING_OUTPUTS = 32     # unread outputs of one request before the engine pauses it
RESUME_PENDING_OUTPUTS = 8   # and resumes it once its reader is down to this many


class EngineError(RuntimeError):
    """The engine failed while running a request (a server bug, not the client's mistake)."""


class OutputAccumulator:
    """Delta outputs of one request added up: `add` each delta, `result()` is the output as if cumulative."""

    def __init__(self):
        self.last: RequestOutput | None = None
        self._texts: dict[int, list[str]] = {}
        self._tokens: dict[int, list[int]] = {}
        self._logprobs: dict[int, list | None] = {}

    def add(self, delta: RequestOutput) -> None:
        self.last = delta
        for c in delta.outputs:
            self._texts.setdefault(c.index, []).append(c.text)
            self._tokens.setdefault(c.index, []).extend(c.token_ids)
            if c.logprobs is not None:
                self._logprobs.setdefault(c.index, []).extend(c.logprobs)

    def result(self) -> RequestOutput:
        last = self.last
        outputs = [CompletionOutput(c.index, "".join(self._texts[c.index]), self._tokens[c.index], c.finish_reason,
                                    self._logprobs.get(c.index), c.stop_reason) for c in last.outputs]
        return dataclasses.replace(last, outputs=outputs)


class RequestStream:
    """The delta outputs of one request, read by its handler with `async for`; `pending` counts those not yet
    read, for the engine thread to pause the request when its reader is behind."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, resume: Callable[[str], None]):
        self.request_id = request_id
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._resume = resume
        self._lock = threading.Lock()
        self.pending = 0       # outputs put and not yet read
        self.paused = False    # the engine thread paused the request for this reader
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> bool:
        """Called from the engine thread; True when the request is to be paused (its reader is behind)."""
        with self._lock:
            self.pending += 1
            pause = not self.paused and self.pending >= MAX_PENDING_OUTPUTS and isinstance(item, RequestOutput)
            self.paused = self.paused or pause
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass
        return pause

    def _read(self, count: int) -> None:
        """Called from the event loop: `count` outputs were read."""
        with self._lock:
            self.pending -= count
            resume = self.paused and self.pending <= RESUME_PENDING_OUTPUTS
            self.paused = self.paused and not resume
        if resume:
            self._resume(self.request_id)

    async def __aiter__(self):
        # Every step's output is yielded, in order, so a stream's chunks follow the engine's steps whatever the
        # handler's speed; the queue stays short because a request whose reader is behind is paused.
        while not self.finished:
            item = await self._queue.get()
            self._read(1)
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            self.finished = item.finished
            yield item


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    stream: RequestStream
    accepted: asyncio.Future  # of the handler's event loop
    arrival_time: float
    lora_request: Any = None  # a LoRARequest: the served adapter the request runs with

    def answer(self, error: BaseException | None) -> None:
        """From the engine thread: accept (None) or refuse the request. A handler that was cancelled in the
        meantime has a done future; it is left alone (its abort command follows in the queue)."""

        def resolve() -> None:
            if self.accepted.done():
                return
            if error is None:
                self.accepted.set_result(None)
            else:
                self.accepted.set_exception(error)

        try:
            self.accepted.get_loop().call_soon_threadsafe(resolve)
        except RuntimeError:  # the event loop is closed
            pass


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Resume:
    request_id: str


@dataclass
class _Stop:
    pass


@dataclass
class _Timing:
    """Token timing of one request, for the latency histograms."""

    arrival_time: float
    n: int = 1                                                   # completions, each counted when it ends
    first_token_time: float | None = None
    tokens: dict[int, int] = field(default_factory=dict)         # completion index → tokens seen
    last_token_time: dict[int, float] = field(default_factory=dict)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.metrics = metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._timings: dict[str, _Timing] = {}        # engine thread only
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="glm45-engine", daemon=True)
        self.dead: BaseException | None = None

    # ------------------------------------------------------------------ the event-loop side
    def start(self) -> None:
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.dead is None

    def stats(self) -> dict:
        """The engine's statistics after its latest step (safe to call from any thread)."""
        return self._stats

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                          arrival_time: float | None = None, lora_request=None) -> RequestStream:
        """Submit a request; returns once the engine accepted it. `ValueError` when the engine refuses it."""
        finished = self._thread.ident is not None and not self._thread.is_alive()
        if self.dead is not None or finished:
            raise EngineError("the engine is not running")
        loop = asyncio.get_running_loop()
        stream = RequestStream(request_id, loop, self.resume)
        accepted = loop.create_future()
        arrival = time.monotonic() if arrival_time is None else arrival_time
        params = dataclasses.replace(params, output_kind=RequestOutputKind.DELTA)
        self._commands.put(_Add(request_id, prompt, params, stream, accepted, arrival, lora_request))
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(request_id)  # applied after the add: the queue keeps order
            raise
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def resume(self, request_id: str) -> None:
        """The reader of a paused request caught up (any thread)."""
        self._commands.put(_Resume(request_id))

    def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever still runs and end the thread."""
        if self._thread.is_alive():
            self._commands.put(_Stop())
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        try:
            while True:
                busy = self.engine.has_runnable_requests()  # paused requests wait for a _Resume command
                if not self._apply_commands(block=not busy):
                    break
                if self.engine.has_runnable_requests():
                    self._step()
        except BaseException as e:  # a bug: fail everyone loudly rather than hang
            logger.exception("the engine thread died")
            self.dead = e
            self._fail_everything(EngineError(f"the engine stopped: {e}"))
        finally:
            self._fail_everything(EngineError("the server is shutting down"))

    def _fail_everything(self, error: EngineError) -> None:
        for request_id, stream in list(self._streams.items()):
            stream.put(error)
            self._abort(request_id)
        while True:  # requests submitted after the stop
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Add):
                command.answer(error)

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one when `block`); False once told to stop."""
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if isinstance(command, _Stop):
                return False
            if isinstance(command, _Abort):
                self._abort(command.request_id)
            elif isinstance(command, _Resume):
                self.engine.resume_request(command.request_id)
            else:
                self._add(command)
            self._stats = self.engine.stats()

    def _add(self, command: _Add) -> None:
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params, command.arrival_time,
                                    lora_request=command.lora_request)
        except ValueError as e:  # the client's mistake
            command.answer(e)
            return
        except Exception as e:
            logger.exception("engine.add_request failed for %s", command.request_id)
            command.answer(EngineError(f"the engine could not take the request: {e}"))
            return
        self._streams[command.request_id] = command.stream
        self._timings[command.request_id] = _Timing(command.arrival_time, command.params.n)
        command.answer(None)

    def _abort(self, request_id: str, reason: str = "abort") -> None:
        if self._streams.pop(request_id, None) is not None:
            try:
                self.engine.abort_request(request_id)
            except Exception:  # only after an engine failure; the request is gone from our side anyway
                logger.exception("could not abort request %s", request_id)
            timing = self._timings.pop(request_id, None)
            if self.metrics is not None:
                for _ in range(timing.n if timing else 1):  # like a finished request: once per completion
                    self.metrics.request_finished(reason)
            logger.debug("aborted request %s", request_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except StepError as e:  # the engine aborted the step's requests and goes on with the others
            self._fail(e.request_ids, e)
            return
        except Exception as e:  # the engine's state is unknown: fail every request, keep serving new ones
            logger.exception("engine step failed; aborting %d requests", len(self._streams))
            self._fail(list(self._streams), e)
            return
        self._stats = self.engine.stats()  # before the outputs go out, so a client never reads older stats
        now = time.monotonic()
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            self._observe(output, now)
            if output.finished:
                del self._streams[output.request_id]
            if stream.put(output) and not output.finished:
                self.engine.pause_request(output.request_id)

    def _fail(self, request_ids: list[str], error: BaseException) -> None:
        for request_id in request_ids:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put(EngineError(f"the engine failed while running this request: {error}"))
                self._abort(request_id, "error")
        self._stats = self.engine.stats()

    def _observe(self, output: RequestOutput, now: float) -> None:
        timing = self._timings.get(output.request_id)
        if timing is None or self.metrics is None:
            return
        m = self.metrics
        for completion in output.outputs:  # deltas: token_ids are the new tokens
            seen = timing.tokens.get(completion.index, 0)
            new = len(completion.token_ids)
            if new <= 0:
                continue
            if timing.first_token_time is None:
                timing.first_token_time = now
                m.time_to_first_token.observe(now - timing.arrival_time)
            if seen:
                # Tokens that arrived together in one step (MTP) share the step's time.
                per_token = (now - timing.last_token_time[completion.index]) / new
                for _ in range(new):
                    m.time_per_output_token.observe(per_token)
            timing.tokens[completion.index] = seen + new
            timing.last_token_time[completion.index] = now
        if output.finished:
            del self._timings[output.request_id]
            m.e2e_request_latency.observe(now - timing.arrival_time)
            for completion in output.outputs:
                m.request_finished(completion.finish_reason or "unknown")
