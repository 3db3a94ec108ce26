"""gateway.http.deadlines: a body read past its deadline ends in its own error, nothing else
does."""

from __future__ import annotations

import asyncio

import pytest

from gateway.http.deadlines import Deadlines


async def _guarded(deadlines: Deadlines, seconds: float, work: asyncio.Future[str]) -> str:
    return await deadlines.within(work, seconds)


async def test_a_read_past_its_deadline_times_out_and_one_in_time_does_not() -> None:
    deadlines = Deadlines(tick=0.02)
    sweeper = asyncio.create_task(deadlines.run())
    loop = asyncio.get_running_loop()
    slow, quick = loop.create_future(), loop.create_future()
    late = asyncio.create_task(_guarded(deadlines, 0.1, slow))
    on_time = asyncio.create_task(_guarded(deadlines, 5, quick))
    started = loop.time()
    with pytest.raises(TimeoutError):
        await late
    assert 0.1 <= loop.time() - started < 1.0
    quick.set_result("body")
    assert await on_time == "body"
    sweeper.cancel()


async def test_a_task_that_finished_its_read_is_never_cancelled_later() -> None:
    deadlines = Deadlines(tick=0.02)
    sweeper = asyncio.create_task(deadlines.run())
    loop = asyncio.get_running_loop()

    async def read_then_work() -> str:
        done: asyncio.Future[str] = loop.create_future()
        done.set_result("body")
        body = await _guarded(deadlines, 0.05, done)
        await asyncio.sleep(0.2)  # past the deadline, outside the guarded read
        return body

    assert await read_then_work() == "body"
    sweeper.cancel()


async def test_a_cancellation_that_is_not_the_deadline_stays_a_cancellation() -> None:
    deadlines = Deadlines(tick=0.02)
    sweeper = asyncio.create_task(deadlines.run())
    never: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    reading = asyncio.create_task(_guarded(deadlines, 5, never))
    await asyncio.sleep(0.05)
    reading.cancel()  # e.g. the client went away
    with pytest.raises(asyncio.CancelledError):
        await reading
    sweeper.cancel()
