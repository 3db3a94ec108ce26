"""Who else holds this gateway's port or store, so ``serve`` can refuse to share them by mistake.

With ``server.workers > 1`` the workers bind with SO_REUSEPORT, and the kernel lets any other
process of the same user that does so share the port: a second gateway (or the orphaned workers
of one whose supervisor was killed) would silently take a share of the connections, with its
own config. Workers carry two variables in their environment (``WORKER_OF``: their supervisor's
pid, ``STORE_ID``: a digest naming their store), so workers whose supervisor is gone can be
told apart from a second gateway that shares a store on purpose.

Linux: sockets and environments from ``/proc``. Elsewhere a connect() tells whether the port is
taken (without pids) and orphans are not looked for (their supervisor pipe ends them).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import socket
from pathlib import Path

from gateway.config import StorageConfig

WORKER_OF = "GATEWAY_WORKER_OF"
STORE_ID = "GATEWAY_STORE_ID"
_PROC = Path("/proc")
_LISTEN = "0A"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def store_id(storage: StorageConfig) -> str:
    """A digest naming the store (a Redis URL may hold a password: never the URL itself)."""
    if storage.backend == "sqlite":
        name = "sqlite:" + os.path.realpath(storage.path)
    else:
        name = f"redis:{storage.redis_url}\0{storage.redis_prefix}"
    return hashlib.sha256(name.encode()).hexdigest()[:24]


def port_holders(host: str, port: int) -> list[int] | None:
    """Pids listening on ``port`` at an address that overlaps ``host``, this process excluded;
    ``[-1]`` for a listener whose process is not visible; ``None`` when it can't be known."""
    tables = [_PROC / "net" / "tcp", _PROC / "net" / "tcp6"]
    if not tables[0].exists():
        return _probe(host, port)
    ours = _addresses(host)
    inodes: set[str] = set()
    for table in tables:
        with contextlib.suppress(OSError):
            for line in table.read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) < 10 or fields[3] != _LISTEN:
                    continue
                hexaddr, _, hexport = fields[1].partition(":")
                if int(hexport, 16) != port:
                    continue
                if ours is None or any(_overlap(_decode(hexaddr), a) for a in ours):
                    inodes.add(fields[9])
    if not inodes:
        return []
    found = _socket_owners(inodes)
    pids = sorted({pid for pid, inode in found if pid != os.getpid()})
    if len({inode for _, inode in found}) < len(inodes):
        pids.append(-1)  # a listener owned by a process we can't see (another user)
    return pids


def orphaned_workers(store: str) -> list[int]:
    """Gateway workers on this store whose supervisor is gone (Linux only, else [])."""
    orphans = []
    for proc in _processes():
        try:
            env = dict(
                item.partition(b"=")[::2] for item in (proc / "environ").read_bytes().split(b"\0")
            )
            supervisor = env.get(WORKER_OF.encode())
            if supervisor is None or env.get(STORE_ID.encode()) != store.encode():
                continue
            stat = (proc / "stat").read_text()
            ppid = int(stat.rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if str(ppid).encode() != supervisor:
            orphans.append(int(proc.name))
    return sorted(orphans)


def _processes() -> list[Path]:
    try:
        return [p for p in _PROC.iterdir() if p.name.isdigit() and p.name != str(os.getpid())]
    except OSError:
        return []


def _socket_owners(inodes: set[str]) -> list[tuple[int, str]]:
    wanted = {f"socket:[{inode}]": inode for inode in inodes}
    owners = []
    for proc in _processes():
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    inode = wanted.get(os.readlink(fd))
                    if inode is not None:
                        owners.append((int(proc.name), inode))
    return owners


def _addresses(host: str) -> list[Address] | None:
    """The addresses ``host`` binds to; None (match any) if it doesn't resolve."""
    if host in ("", "*"):
        return [ipaddress.ip_address("0.0.0.0")]
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return None
    return [ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos]


def _decode(hexaddr: str) -> Address:
    raw = bytes.fromhex(hexaddr)
    # /proc/net/tcp{,6} print each 32-bit word of the address in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def _overlap(a: Address, b: Address) -> bool:
    a = getattr(a, "ipv4_mapped", None) or a
    b = getattr(b, "ipv4_mapped", None) or b
    return a.is_unspecified or b.is_unspecified or a == b


def _probe(host: str, port: int) -> list[int] | None:
    target = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    try:
        with socket.create_connection((target, port), timeout=1):
            return [-1]
    except OSError:
        return None
