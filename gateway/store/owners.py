"""Who owns a pending reservation, and whether that owner is still alive.

Every gateway process (each worker too) is one *owner*: it writes a row to the store when it
starts and bumps that row's beat counter every ``BEAT_INTERVAL_S``. A reservation carries its
owner's id, and housekeeping settles the pending reservations of an owner only once that owner
is known to be gone:

* on this host (same host name and boot): its pid is not running, or runs another program
  (the process start time differs) - decided at once, so a restart after ``kill -9`` finds the
  ledger exact right away;
* elsewhere (another replica on the same Redis): its beat has not moved for ``LEASE_S`` as
  measured by the observer's own monotonic clock, which a wall-clock step does not move.

Nothing here reads the wall clock: reservations are never reclaimed for being old.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass

BEAT_INTERVAL_S = 5.0
LEASE_S = 60.0  # another host's owner whose beat stood still this long is taken as gone


@dataclass(frozen=True, slots=True)
class Owner:
    id: str
    host: str  # host name and boot id: a pid means something only on the same boot
    pid: int
    started: str  # the process's start time in clock ticks since boot ("" if unknown)
    beat: int = 0


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str:
    """Field 22 of /proc/PID/stat (start time since boot), or "" when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return ""
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else ""


def this_host() -> str:
    return f"{socket.gethostname()}/{_boot_id()}"


def this_process() -> Owner:
    pid = os.getpid()
    return Owner(uuid.uuid4().hex, this_host(), pid, process_start(pid))


def gone_locally(owner: Owner, host: str) -> bool | None:
    """True when ``owner`` ran on ``host`` and is certainly not running; False when it is;
    None when this host cannot tell (another host)."""
    if owner.host != host or not owner.host.partition("/")[2]:
        return None
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists, under another user
    started = process_start(owner.pid)
    if owner.started and started and started != owner.started:
        return True  # the pid was reused by a later process
    return False


class Liveness:
    """Tells gone owners from live ones, remembering when each other owner's beat last moved."""

    def __init__(self, me: Owner, *, lease_s: float = LEASE_S) -> None:
        self.me = me
        self.host = me.host
        self.lease_s = lease_s
        self._seen: dict[str, tuple[int, float]] = {}  # owner id -> (beat, monotonic time)

    def gone(self, owner: Owner, now: float | None = None) -> bool:
        if owner.id == self.me.id:
            return False
        if not owner.host:
            return True  # no owner row: it ended cleanly or predates owners (kept charged)
        local = gone_locally(owner, self.host)
        if local is not None:
            return local
        now = time.monotonic() if now is None else now
        beat, since = self._seen.get(owner.id, (owner.beat, now))
        if beat != owner.beat:
            since = now
        self._seen[owner.id] = (owner.beat, since)
        return now - since >= self.lease_s

    def forget(self, owner_id: str) -> None:
        self._seen.pop(owner_id, None)
