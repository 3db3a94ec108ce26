"""Named points on the miss path where a test can have the process killed (``kill -9``).

``GATEWAY_FAILPOINTS=answered`` in a gateway's environment makes it SIGKILL itself the first
time a miss reaches that point; the crash tests use it to check the ledger after a death at
each step. Unset (always, outside tests), ``hit()`` is one dict lookup that finds nothing.

Points, in the order a miss passes them:
  reserved  the team's unit is charged, the request is not yet marked sent
  answered  the upstream answered; nothing is stored yet
  saved     the result and its charge are committed; the client is not answered yet
"""

from __future__ import annotations

import os
import signal

POINTS = ("reserved", "answered", "saved")
_armed = {p for p in os.environ.get("GATEWAY_FAILPOINTS", "").split(",") if p in POINTS}


def hit(point: str) -> None:
    if point in _armed:
        os.kill(os.getpid(), signal.SIGKILL)
