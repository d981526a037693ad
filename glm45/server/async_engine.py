"""The bridge between asyncio request handlers and the synchronous, single-threaded `LLMEngine`.

One background thread owns the engine. Handlers never touch it: they put commands (add, abort, stop)
on a thread-safe queue, and the thread applies them between steps, steps while there is work, and
hands every `RequestOutput` to the request's `RequestStream` through `loop.call_soon_threadsafe`.
When idle the thread blocks on the queue, so an idle server costs nothing.

`add_request` waits until the engine has accepted the request, so validation errors (context too long,
bad token ids) reach the handler as `ValueError` before any response has started. Outputs are cumulative
(the full text so far); the handler reads every step's output in order.

The thread also keeps the statistics: a snapshot of `engine.stats()` after every step for /metrics, and
per-request token timings for the latency histograms.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from glm45.engine.engine import LLMEngine
from glm45.engine.sampling_params import SamplingParams
from glm45.engine.sequence import RequestOutput
from glm45.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine failed while running a request (a server bug, not the client's mistake)."""


class RequestStream:
    """The outputs of one request, read by its handler with `async for`."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:
        """Called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    async def __aiter__(self):
        # Every step's output is yielded, in order, so a stream's chunks follow the engine's steps whatever the
        # handler's speed.
        while not self.finished:
            item = await self._queue.get()
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
class _Stop:
    pass


@dataclass
class _Timing:
    """Token timing of one request, for the latency histograms."""

    arrival_time: float
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
                          arrival_time: float | None = None) -> RequestStream:
        """Submit a request; returns once the engine accepted it. `ValueError` when the engine refuses it."""
        finished = self._thread.ident is not None and not self._thread.is_alive()
        if self.dead is not None or finished:
            raise EngineError("the engine is not running")
        loop = asyncio.get_running_loop()
        stream = RequestStream(request_id, loop)
        accepted = loop.create_future()
        arrival = time.monotonic() if arrival_time is None else arrival_time
        self._commands.put(_Add(request_id, prompt, params, stream, accepted, arrival))
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(request_id)  # applied after the add: the queue keeps order
            raise
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever still runs and end the thread."""
        if self._thread.is_alive():
            self._commands.put(_Stop())
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        try:
            while True:
                busy = self.engine.has_unfinished_requests()
                if not self._apply_commands(block=not busy):
                    break
                if self.engine.has_unfinished_requests():
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
            else:
                self._add(command)
            self._stats = self.engine.stats()

    def _add(self, command: _Add) -> None:
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params, command.arrival_time)
        except ValueError as e:  # the client's mistake
            command.answer(e)
            return
        except Exception as e:
            logger.exception("engine.add_request failed for %s", command.request_id)
            command.answer(EngineError(f"the engine could not take the request: {e}"))
            return
        self._streams[command.request_id] = command.stream
        self._timings[command.request_id] = _Timing(command.arrival_time)
        command.answer(None)

    def _abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            try:
                self.engine.abort_request(request_id)
            except Exception:  # only after an engine failure; the request is gone from our side anyway
                logger.exception("could not abort request %s", request_id)
            self._timings.pop(request_id, None)
            if self.metrics is not None:
                self.metrics.request_finished("abort")
            logger.debug("aborted request %s", request_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            # The engine's state is suspect: fail the requests that were running, keep serving new ones.
            logger.exception("engine step failed; aborting %d requests", len(self._streams))
            for request_id, stream in list(self._streams.items()):
                stream.put(EngineError(f"the engine failed while running this request: {e}"))
                self._abort(request_id)
            return
        now = time.monotonic()
        self._stats = self.engine.stats()  # before the outputs go out, so a client never reads older stats
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            self._observe(output, now)
            if output.finished:
                del self._streams[output.request_id]
            stream.put(output)

    def _observe(self, output: RequestOutput, now: float) -> None:
        timing = self._timings.get(output.request_id)
        if timing is None or self.metrics is None:
            return
        m = self.metrics
        for completion in output.outputs:
            seen = timing.tokens.get(completion.index, 0)
            new = len(completion.token_ids) - seen
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
            timing.tokens[completion.index] = len(completion.token_ids)
            timing.last_token_time[completion.index] = now
        if output.finished:
            del self._timings[output.request_id]
            m.e2e_request_latency.observe(now - timing.arrival_time)
            for completion in output.outputs:
                m.request_finished(completion.finish_reason or "unknown")
