"""Many clients, one model: a single thread runs engine jobs one at a time, first come first served.

A job is a function of the engine that yields events (the engine's own, in order); its `close()`, if it has
one, runs once the job ran or was dropped. The worker hands each event to the job's `Inbox` as it comes, so
an HTTP response streams while the model generates; the event loop is woken only when the request's
coroutine waits for events, and takes every event that arrived meanwhile at once (a wake-up per token, on
the thread that decodes, was most of the server's cost per token).
Cancelling a job (its client went away, a stop sequence matched, the server stops) ends it at its next
event or prefill chunk: the worker closes the engine's iterator itself, on its own thread, which runs
`Engine.respond`'s clean-up there (the unfinished turn leaves its conversation) before the next job starts.

Each client keeps the KV cache of its last prompt (`PrefixCache`), swapped into the engine around its jobs:
a conversation continued by the same client prefills only what is new, whoever else was served between."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lyra_cli.serve import internals
from lyra_cli.serve.errors import ApiError

if TYPE_CHECKING:
    from lyra_cli.engine import Engine

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 16
DEFAULT_CACHED_CLIENTS = 4  # prefix caches kept (each holds a prompt's keys and values on the model's device)
RETRY_AFTER_S = 1  # what a 503 for a full queue tells the client to wait
# text deltas per wake-up of the event loop: 1 sends every token as it comes; N > 1 lets N - 1 tokens wait
# for the next, sent together (each wake-up costs the decoding thread ~0.2-0.3 ms on a busy 2-core CPU:
# benchmarks/RESULTS.md). The first token, every audio chunk and the end are always sent at once.
# Streamed text wakes the HTTP side at most this often (ms); speech, the first text and the end at once. Each
# wake-up costs the decoding thread the GIL twice (benchmarks/serve_wakeups.py): a model faster than one token
# per interval (the tiny one on a CPU: ~5 ms) sends its text in small groups, a slower one token by token.
DEFAULT_STREAM_INTERVAL_MS = 20.0


class Cancelled(Exception):
    """Raised inside a job's prefill when the job was cancelled (prefill has no events to stop at)."""


# A job's work: given the engine and a check that raises `Cancelled` once the job is cancelled, its events.
Work = Callable[["Engine", Callable[[], None]], Iterator[Any]]


@dataclass(frozen=True)
class Finished:
    """The last item of a job's queue: why it ended (None: ran to its end), and its error if it failed."""

    cancelled: bool = False
    error: BaseException | None = None


class Inbox:
    """Items put by one thread, taken in order by coroutines of one event loop. `put` never blocks and
    wakes the loop (`call_soon_threadsafe`: a self-pipe write) only when a coroutine waits and no wake-up is
    on its way; while the reader is busy, items pile up without costing the writer anything, and `take`
    returns them all at once. Nothing waits for more: a reader gets whatever has arrived."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[Any] = deque()
        self._lock = threading.Lock()
        self._waiter: asyncio.Future[None] | None = None  # set while a coroutine waits and nothing woke it yet

    def put(self, item: Any, *, wake: bool = True) -> None:
        """From any thread. `wake` False: a waiting reader gets the item with the next one put with `wake`.
        Raises `RuntimeError` when the event loop is closed (nobody will ever read)."""
        if self._loop.is_closed():
            raise RuntimeError("the event loop is closed")
        with self._lock:
            self._items.append(item)
            if not wake:
                return
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._loop.call_soon_threadsafe(_wake, waiter)

    async def take(self) -> list[Any]:
        """Every item not taken yet, in order; waits for the first when there is none."""
        while True:
            with self._lock:
                if self._items:
                    items = list(self._items)
                    self._items.clear()
                    return items
            await self._wait()

    async def get(self) -> Any:
        """The next item (waits for it), as `asyncio.Queue.get`."""
        while True:
            with self._lock:
                if self._items:
                    return self._items.popleft()
            await self._wait()

    async def _wait(self) -> None:
        with self._lock:
            if self._items:
                return
            waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            with self._lock:
                if self._waiter is waiter:
                    self._waiter = None


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():  # its coroutine may have been cancelled meanwhile
        waiter.set_result(None)


class Job:
    """One request's engine work and the inbox its events arrive on (read from the event loop)."""

    def __init__(self, work: Work, client: str | None, loop: asyncio.AbstractEventLoop) -> None:
        """`client` names whose prefix cache the job continues (None: it starts and keeps none)."""
        self.work = work
        self.client = client
        self.events = Inbox(loop)
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        if self.cancelled:
            raise Cancelled()

    def post(self, item: Any, *, wake: bool = True) -> None:
        """From the worker thread: hand `item` to the request's coroutine (`wake` False: with the next)."""
        try:
            self.events.put(item, wake=wake)
        except RuntimeError:  # the event loop is closed: the server stopped, nobody is listening
            self.cancel()


class PrefixCaches:
    """Each client's last prompt cache, least recently used dropped first (`capacity` 0: no reuse)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._caches: OrderedDict[str, Any] = OrderedDict()

    def swap_in(self, engine: "Engine", client: str | None) -> None:
        internals.set_prefix(engine, self._caches.pop(client, None) if client is not None else None)

    def swap_out(self, engine: "Engine", client: str | None) -> None:
        cache = internals.take_prefix(engine)
        # None: this job's prefill never completed, or it keeps no cache (a transcription)
        if cache is not None and client is not None and self.capacity > 0:
            self._caches[client] = cache
            while len(self._caches) > self.capacity:
                self._caches.popitem(last=False)

    def clients(self) -> list[str]:
        return list(self._caches)


class Worker:
    """The thread that owns the engine. `submit` refuses with a 503 when `max_queue` jobs already wait."""

    def __init__(self, engine: "Engine", max_queue: int = DEFAULT_MAX_QUEUE,
                 cached_clients: int = DEFAULT_CACHED_CLIENTS,
                 stream_interval_ms: float = DEFAULT_STREAM_INTERVAL_MS) -> None:  # fmt: skip
        self.engine = engine
        self.max_queue = max_queue
        self.stream_interval_ms = stream_interval_ms
        self.prefixes = PrefixCaches(cached_clients)
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._running: Job | None = None
        self._lock = threading.Lock()
        self._pending = 0  # jobs submitted and not yet finished
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._loop, name="lyra-serve-worker", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def busy(self) -> bool:
        return self._running is not None

    def submit(self, job: Job) -> Job:
        self._count(+1)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._count(-1)
            raise ApiError(503, f"the server is busy: {self.max_queue} requests are already waiting; retry later",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None  # fmt: skip
        return job

    def _count(self, change: int) -> None:
        with self._lock:
            self._pending += change
            if self._pending:
                self._idle.clear()
            else:
                self._idle.set()

    def wait_idle(self, timeout_s: float) -> bool:
        """Whether the worker ran out of jobs within `timeout_s` (for shutdown and tests)."""
        return self._idle.wait(timeout_s)

    def cancel_all(self) -> None:
        """Cancel the running job and every waiting one (the server is stopping)."""
        running = self._running
        if running is not None:
            running.cancel()
        for job in list(self._queue.queue):
            if job is not None:
                job.cancel()

    def stop(self) -> None:
        self.cancel_all()
        # cancelled jobs drain at once, so the end marker fits; a stuck queue is not worth waiting for (the
        # thread is a daemon: it ends with the process)
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=1)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._running = job
            try:
                job.post(self._run(job))
            finally:
                self._running = None
                self._count(-1)

    def _run(self, job: Job) -> Finished:
        try:
            return self._answer(job)
        finally:
            _release(job.work)

    def _answer(self, job: Job) -> Finished:
        if job.cancelled:  # its client left while it waited
            return Finished(cancelled=True)
        self.prefixes.swap_in(self.engine, job.client)
        events = None
        try:
            events = job.work(self.engine, job.check)
            pacer = _Pacer(self.stream_interval_ms / 1000)
            for event in events:
                if job.cancelled:
                    return Finished(cancelled=True)
                job.post(event, wake=pacer.wake(event))
            return Finished(cancelled=job.cancelled)
        except Cancelled:
            return Finished(cancelled=True)
        except Exception as exc:  # the request's coroutine turns it into its response (400 or 500)
            return Finished(error=exc)
        finally:
            if events is not None:
                _close(events)
            self.prefixes.swap_out(self.engine, job.client)


class _Pacer:
    """Whether an event wakes the event loop: everything but text does (speech, the prefill, the end), and
    text when it is the answer's first, or when `interval_s` passed since the last wake-up; text that came
    sooner rides on the next one. So text is held at most until the next event after `interval_s`, and not
    at all when tokens come further apart than that."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.perf_counter) -> None:
        from lyra_cli.engine.run.events import TextDelta

        self._text = TextDelta
        self.interval_s = interval_s
        self._clock = clock
        self._last: float | None = None  # when text last woke the loop (None: no text yet)

    def wake(self, event: Any) -> bool:
        if self.interval_s <= 0:
            return True
        now = self._clock()
        if not isinstance(event, self._text):
            if self._last is not None:
                self._last = now  # the text held so far goes with it
            return True
        if self._last is None:  # the answer's first text wakes at once (a token of no text yet waits with it)
            if not event.text:
                return False
            self._last = now
            return True
        if now - self._last >= self.interval_s:
            self._last = now
            return True
        return False


def _release(work: Work) -> None:
    """A job's `close()`, if it has one (its decoded media files), once it ran or was dropped."""
    close = getattr(work, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            log.exception("releasing a job failed")


def _close(events: Iterator[Any]) -> None:
    """Close the engine's iterator here, on the worker thread, so its clean-up runs before the next job."""
    close = getattr(events, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # a failing clean-up must not kill the worker; the next job starts afresh
            log.exception("closing a job's events failed")
