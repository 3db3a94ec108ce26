"""Deadlines for many short awaits at the cost of a dict entry each, not a loop timer each.

``asyncio.timeout()`` arms and disarms a timer for every use: about 5 us under uvloop, a
noticeable share of a cache hit (``python bench/hot_path_bench.py``). A body read needs a deadline
seconds long that need not be exact to the millisecond, so one sweeper task looks at the
reads in progress every ``tick`` seconds and cancels those past their deadline; the read
turns that cancellation into ``TimeoutError``, as ``asyncio.timeout`` would:

    body = await deadlines.within(read(), seconds)

The cancellation always lands inside the guarded await: a task is registered only while it
is suspended there, and the sweeper runs only while it is suspended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class Deadlines:
    def __init__(self, tick: float = 0.1) -> None:
        self.tick = tick
        self._due: dict[asyncio.Task[object], float] = {}
        self._expired: set[asyncio.Task[object]] = set()

    async def within(self, awaitable: Awaitable[T], seconds: float) -> T:
        """Its result, or ``TimeoutError`` once ``seconds`` have passed (give or take a tick)."""
        task = asyncio.current_task()
        assert task is not None
        self._due[task] = asyncio.get_running_loop().time() + seconds
        try:
            return await awaitable
        except asyncio.CancelledError:
            if task in self._expired:  # the deadline's cancellation: taken back
                self._expired.discard(task)
                task.uncancel()
                raise TimeoutError from None
            raise
        finally:
            self._due.pop(task, None)

    def move(self, due: float) -> None:
        """Move the current task's deadline (inside ``within``) to loop time ``due``."""
        task = asyncio.current_task()
        if task in self._due:
            self._due[task] = due

    def sweep(self) -> None:
        now = asyncio.get_running_loop().time()
        late = [task for task, due in self._due.items() if due <= now]
        for task in late:
            del self._due[task]
            if not task.done():
                self._expired.add(task)
                task.cancel()

    async def run(self) -> None:
        """The sweeper: runs until cancelled."""
        while True:
            await asyncio.sleep(self.tick)
            self.sweep()
