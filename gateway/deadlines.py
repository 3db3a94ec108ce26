"""Deadlines for many short awaits at the cost of a dict entry each, not a loop timer each.

``asyncio.timeout()`` arms and disarms a timer for every use: about 6 us under uvloop, a
noticeable share of a cache hit (``python bench/hot_path_bench.py``). A body read needs a deadline
seconds long that need not be exact to the millisecond, so one sweeper task looks at the
reads in progress every ``tick`` seconds and cancels those past their deadline; the read
turns that cancellation into its own error (``expired``), as ``asyncio.timeout`` would.

    task = asyncio.current_task()
    deadlines.add(task, seconds)
    try:
        return await read()
    except asyncio.CancelledError:
        if deadlines.expired(task):
            raise TimeoutError from None
        raise
    finally:
        deadlines.discard(task)

The cancellation always lands inside the guarded await: a task is registered only while it
is suspended there, and the sweeper runs only while it is suspended.
"""

from __future__ import annotations

import asyncio


class Deadlines:
    def __init__(self, tick: float = 0.1) -> None:
        self.tick = tick
        self._due: dict[asyncio.Task[object], float] = {}
        self._expired: set[asyncio.Task[object]] = set()

    def add(self, task: asyncio.Task[object], seconds: float) -> None:
        self._due[task] = asyncio.get_running_loop().time() + seconds

    def discard(self, task: asyncio.Task[object]) -> None:
        self._due.pop(task, None)

    def expired(self, task: asyncio.Task[object]) -> bool:
        """Whether this cancellation is the deadline's; if so it is taken back."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        task.uncancel()
        return True

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
