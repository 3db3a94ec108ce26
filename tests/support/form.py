"""A stand-in for aiohttp's StreamReader, for the form parser's tests."""

from __future__ import annotations

import itertools
from collections.abc import Sequence


class FakeStream:
    """aiohttp's StreamReader.readany(), over given chunks; counts what was consumed."""

    def __init__(self, body: bytes, cuts: Sequence[int] | int = 65536) -> None:
        if isinstance(cuts, int):
            cuts = range(cuts, len(body), cuts)
        points = [0, *sorted(c for c in set(cuts) if 0 < c < len(body)), len(body)]
        self.chunks = [body[a:b] for a, b in itertools.pairwise(points) if b > a]
        self.consumed = 0

    async def readany(self) -> bytes:
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        self.consumed += len(chunk)
        return chunk
