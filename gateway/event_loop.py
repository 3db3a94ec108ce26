"""``server.event_loop``: uvloop where it is installed (a dependency on Linux), else asyncio.

uvloop's loop runs the same gateway with less CPU per request (the bench's hit path); the
plain asyncio loop is there for platforms uvloop does not build on, or to rule it out.
"""

from __future__ import annotations

import asyncio
import importlib.util

EVENT_LOOPS = ("auto", "asyncio", "uvloop")


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def resolve(choice: str) -> str:
    """The loop ``choice`` ("auto", "asyncio" or "uvloop") names on this machine."""
    if choice == "auto":
        return "uvloop" if uvloop_installed() else "asyncio"
    return choice


def use_event_loop(choice: str) -> str:
    """Make the loops created from now on (``web.run_app``'s) ``choice``'s; returns its name.
    "uvloop" when it is not installed was refused by the config already."""
    name = resolve(choice)
    if name == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    else:
        asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    return name
