"""The server's worker on a stand-in engine: jobs run one at a time in order, a cancelled job stops at its
next event and its iterator is closed on the worker's thread, every job is released, and each client's prefix
cache comes back to it (least recently used dropped first)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from lyra_cli.serve.errors import ApiError
from lyra_cli.serve.worker import Finished, Inbox, Job, PrefixCaches, Worker

WAIT_S = 30  # a wait, not a timing


class Recorder:
    """A job that yields `n` events, each after `gate` lets it (when given), and records what happened."""

    def __init__(self, n: int, gate: threading.Semaphore | None = None, prefix: str | None = None) -> None:
        self.n, self.gate, self.prefix = n, gate, prefix
        self.yielded = 0
        self.closed_on: str | None = None
        self.released = False
        self.saw_prefix: Any = "unset"

    def __call__(self, engine: Any, check: Any) -> Iterator[int]:
        self.saw_prefix = engine._prefix
        try:
            for i in range(self.n):
                if self.gate is not None:
                    assert self.gate.acquire(timeout=WAIT_S)
                self.yielded += 1
                yield i
            if self.prefix is not None:
                engine._prefix = self.prefix  # as a completed prefill leaves it
        finally:
            self.closed_on = threading.current_thread().name

    def close(self) -> None:
        self.released = True


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def drain(loop: asyncio.AbstractEventLoop, job: Job) -> list[Any]:
    async def collect() -> list[Any]:
        items = []
        while True:
            item = await asyncio.wait_for(job.events.get(), WAIT_S)
            items.append(item)
            if isinstance(item, Finished):
                return items

    return loop.run_until_complete(collect())


def test_jobs_run_in_order_and_are_released(loop: asyncio.AbstractEventLoop) -> None:
    worker = Worker(SimpleNamespace(_prefix=None), max_queue=4)
    works = [Recorder(3), Recorder(2)]
    jobs = [worker.submit(Job(w, "a", loop)) for w in works]
    assert drain(loop, jobs[0]) == [0, 1, 2, Finished()]
    assert drain(loop, jobs[1]) == [0, 1, Finished()]
    assert worker.wait_idle(WAIT_S) and all(w.released and w.closed_on == "lyra-serve-worker" for w in works)
    worker.stop()


def test_a_cancelled_job_stops_at_its_next_event_and_is_closed_by_the_worker(loop: asyncio.AbstractEventLoop) -> None:
    worker = Worker(SimpleNamespace(_prefix=None), max_queue=4)
    gate = threading.Semaphore(0)
    work = Recorder(100, gate)
    job = worker.submit(Job(work, "a", loop))
    gate.release()
    assert loop.run_until_complete(asyncio.wait_for(job.events.get(), WAIT_S)) == 0
    job.cancel()
    gate.release()  # the worker takes one more event, sees the cancellation and closes the iterator
    assert worker.wait_idle(WAIT_S)
    assert work.yielded <= 2 and work.closed_on == "lyra-serve-worker" and work.released
    items = drain(loop, job)
    assert items[-1] == Finished(cancelled=True)
    worker.stop()


def test_a_job_cancelled_while_waiting_never_runs(loop: asyncio.AbstractEventLoop) -> None:
    worker = Worker(SimpleNamespace(_prefix=None), max_queue=4)
    gate = threading.Semaphore(0)
    first, waiting = Recorder(1, gate), Recorder(1)
    worker.submit(Job(first, "a", loop))
    job = worker.submit(Job(waiting, "b", loop))
    job.cancel()
    gate.release()
    assert worker.wait_idle(WAIT_S)
    assert waiting.yielded == 0 and waiting.released and drain(loop, job) == [Finished(cancelled=True)]
    worker.stop()


def test_a_failing_job_reports_its_error_and_the_worker_goes_on(loop: asyncio.AbstractEventLoop) -> None:
    worker = Worker(SimpleNamespace(_prefix=None), max_queue=4)

    def broken(_engine: Any, _check: Any) -> Iterator[int]:
        raise ValueError("boom")
        yield 0

    failed = drain(loop, worker.submit(Job(broken, "a", loop)))[-1]
    assert isinstance(failed.error, ValueError)
    assert drain(loop, worker.submit(Job(Recorder(1), "a", loop))) == [0, Finished()]
    worker.stop()


def test_the_queue_refuses_beyond_its_size_with_a_503(loop: asyncio.AbstractEventLoop) -> None:
    worker = Worker(SimpleNamespace(_prefix=None), max_queue=1)
    gate = threading.Semaphore(0)
    worker.submit(Job(Recorder(1, gate), "a", loop))
    while not worker.busy:
        threading.Event().wait(0.005)
    worker.submit(Job(Recorder(1), "b", loop))
    with pytest.raises(ApiError) as refused:
        worker.submit(Job(Recorder(1), "c", loop))
    assert refused.value.status == 503 and int(refused.value.headers["Retry-After"]) > 0
    gate.release()
    assert worker.wait_idle(WAIT_S)
    worker.stop()


def test_each_client_gets_its_own_prefix_back(loop: asyncio.AbstractEventLoop) -> None:
    engine = SimpleNamespace(_prefix=None)
    worker = Worker(engine, max_queue=8, cached_clients=2)
    for client in ("alice", "bob"):
        drain(loop, worker.submit(Job(Recorder(0, prefix=f"{client}'s cache"), client, loop)))
    alice, nobody = Recorder(0), Recorder(0)
    drain(loop, worker.submit(Job(alice, "alice", loop)))  # bob ran in between
    drain(loop, worker.submit(Job(nobody, None, loop)))  # a job keeping no cache (a transcription)
    assert alice.saw_prefix == "alice's cache" and nobody.saw_prefix is None
    assert engine._prefix is None  # between jobs the engine holds no client's cache
    worker.stop()


def test_the_least_recently_used_client_is_dropped_first() -> None:
    caches = PrefixCaches(capacity=2)
    engine = SimpleNamespace(_prefix=None)
    for client in ("a", "b", "a", "c"):  # `a` used again after `b`: `b` is the oldest when `c` comes
        caches.swap_in(engine, client)
        engine._prefix = f"{client}-cache"
        caches.swap_out(engine, client)
    assert caches.clients() == ["a", "c"]
    assert PrefixCaches(capacity=0).clients() == []


# -- the inbox: events handed from the worker's thread to the event loop in batches --------------------------


def counting_wakeups(loop: asyncio.AbstractEventLoop) -> list[Any]:
    """Every `call_soon_threadsafe` the loop gets from now on (each one a self-pipe write and a wake-up)."""
    calls: list[Any] = []
    real = loop.call_soon_threadsafe

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real(*args, **kwargs)

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
    return calls


def test_events_posted_while_nobody_waits_arrive_in_order_in_one_take_without_a_wakeup(
    loop: asyncio.AbstractEventLoop,
) -> None:
    inbox = Inbox(loop)
    wakeups = counting_wakeups(loop)
    writer = threading.Thread(target=lambda: [inbox.put(i) for i in range(50)])
    writer.start()
    writer.join()
    assert loop.run_until_complete(inbox.take()) == list(range(50))
    assert wakeups == []  # the reader was busy (not waiting): nothing to wake


def test_a_waiting_reader_is_woken_once_for_what_arrives_before_it_runs(loop: asyncio.AbstractEventLoop) -> None:
    inbox = Inbox(loop)
    wakeups = counting_wakeups(loop)

    async def read() -> list[Any]:
        reader = asyncio.ensure_future(inbox.take())
        await asyncio.sleep(0)  # the reader now waits
        writer = threading.Thread(target=lambda: [inbox.put(i) for i in range(5)])
        writer.start()
        writer.join()  # all 5 are in before the loop runs the wake-up
        return await asyncio.wait_for(reader, WAIT_S)

    assert loop.run_until_complete(read()) == [0, 1, 2, 3, 4]
    assert len(wakeups) == 1


def test_a_reader_cancelled_while_waiting_loses_nothing(loop: asyncio.AbstractEventLoop) -> None:
    inbox = Inbox(loop)

    async def read() -> list[Any]:
        reader = asyncio.ensure_future(inbox.take())
        await asyncio.sleep(0)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        threading.Thread(target=inbox.put, args=("after",)).start()
        return await asyncio.wait_for(inbox.take(), WAIT_S)

    assert loop.run_until_complete(read()) == ["after"]


def test_batches_from_a_running_job_join_to_every_event_in_order(loop: asyncio.AbstractEventLoop) -> None:
    worker = Worker(SimpleNamespace(_prefix=None), max_queue=4)
    job = worker.submit(Job(Recorder(300), "a", loop))

    async def collect() -> list[list[Any]]:
        batches = []
        while not batches or not isinstance(batches[-1][-1], Finished):
            batches.append(await asyncio.wait_for(job.events.take(), WAIT_S))
        return batches

    batches = loop.run_until_complete(collect())
    assert [item for batch in batches for item in batch] == [*range(300), Finished()]
    assert all(batch for batch in batches)  # a take never comes back empty
    worker.stop()


def test_a_job_whose_event_loop_closed_is_cancelled() -> None:
    closed = asyncio.new_event_loop()
    closed.close()
    job = Job(Recorder(1), "a", closed)
    job.post(0)
    assert job.cancelled


def test_the_pacer_wakes_for_the_first_text_then_once_an_interval_and_for_everything_else() -> None:
    from lyra_cli.engine.run.events import AudioChunk, Prefilled, TextDelta
    from lyra_cli.serve.worker import _Pacer

    audio = AudioChunk(np.zeros(4, dtype=np.float32), 16_000, 0.0)
    # (event, when it comes, in ms): tokens 5 ms apart, then two 30 ms apart (a slower stretch)
    timeline = [(Prefilled(3, 3, 0.0), 0), (TextDelta(""), 5), *[(TextDelta(f"t{i}"), 10 + 5 * i) for i in range(6)],
                (audio, 40), (TextDelta("u0"), 45), (TextDelta("u1"), 50), (TextDelta("s0"), 80), (TextDelta("s1"), 110)]
    now = [0.0]
    pacer = _Pacer(20, clock=lambda: now[0])  # a clock in milliseconds, so the interval is too
    woken = []
    for event, at_ms in timeline:
        now[0] = at_ms
        if pacer.wake(event):
            woken.append(event.text if isinstance(event, TextDelta) else type(event).__name__)
    # a token of no text yet waits for t0 (10 ms); t1..t3 wait for t4 (30 ms, 20 ms on); t5 goes with the audio
    # chunk (40 ms), which restarts the interval; u0, u1 wait for s0 (80 ms); s1 comes 30 ms later: at once
    assert woken == ["Prefilled", "t0", "t4", "AudioChunk", "s0", "s1"]
    assert all(_Pacer(0).wake(event) for event, _ in timeline)


@pytest.mark.parametrize("interval_ms", [0, 1000])
def test_with_a_stream_interval_every_event_still_arrives_in_order(loop: asyncio.AbstractEventLoop,
                                                                    interval_ms: float) -> None:  # fmt: skip
    from lyra_cli.engine.run.events import TextDelta

    def texts(_engine: Any, _check: Any) -> Iterator[Any]:
        yield from (TextDelta(f"t{i}") for i in range(10))  # all but the first held: the end brings them

    worker = Worker(SimpleNamespace(_prefix=None), max_queue=4, stream_interval_ms=interval_ms)
    calls = counting_wakeups(loop)
    job = worker.submit(Job(texts, "a", loop))

    async def collect() -> list[Any]:
        items: list[Any] = []
        while not items or not isinstance(items[-1], Finished):
            items += await asyncio.wait_for(job.events.take(), WAIT_S)
        return items

    items = loop.run_until_complete(collect())
    assert [i.text for i in items[:-1]] == [f"t{i}" for i in range(10)] and items[-1] == Finished()
    # only the posts that may wake can: t0 and the end within a long interval; all 11 with none
    assert len(calls) <= (2 if interval_ms else 11)
    worker.stop()
