"""Upload parsing cost: gateway.form.read_form against the floor and against aiohttp.

    python bench/form_bench.py

Bodies are the seed's Python example (`requests`, four fields then the file), fed in 64 KiB
chunks as aiohttp's StreamReader.readany() hands them out. Columns, in microseconds per call:

    join       b"".join(chunks): the floor for any parse of a body held in memory
    read       the readany() loop plus the join: what `await request.read()` costs here
    hash       xxh3-128 of the file's bytes
    read_form  gateway.form.read_form, default limits (5 MB: streamed, spooled to a temp file)
    in-memory  read_form with memory_limit above the body: always the read-whole fast path
    aiohttp    aiohttp.MultipartReader, every part read into memory
    post()     aiohttp's `await request.post()` (the handler's alternative; spools files too)
    parse cost in-memory - read - hash: what parsing adds to reading and hashing
    ratios     post() / read_form (both spool a large file to disk), aiohttp / in-memory
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import requests
import xxhash
from aiohttp import MultipartReader, StreamReader
from aiohttp.test_utils import make_mocked_request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.form import read_form

CHUNK = 64 * 1024
SIZES = [("10 KB", 10_000, 4000), ("100 KB", 100_000, 3000), ("5 MB", 5_000_000, 100)]
FIELDS = {"apikey": "YOUR-API-KEY", "type": "objects", "max_labels": 10, "min_confidence": 80}


class ChunkStream:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.i = 0

    async def readany(self) -> bytes:
        i = self.i
        if i == len(self.chunks):
            return b""
        self.i = i + 1
        return self.chunks[i]


class _Protocol:  # what a StreamReader needs of its protocol when it is never paused
    _reading_paused = False

    def pause_reading(self) -> None: ...

    def resume_reading(self, resume_parser: bool = True) -> None: ...


def aiohttp_stream(chunks: list[bytes]) -> StreamReader:
    stream = StreamReader(_Protocol(), 2**30, loop=asyncio.get_running_loop())  # type: ignore[arg-type]
    for chunk in chunks:
        stream.feed_data(chunk)
    stream.feed_eof()
    return stream


async def per_call(fn: Callable[[], Awaitable[object]], n: int) -> float:
    """Microseconds per call: the best of five rounds of n calls."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            await fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def contenders(size: int, spool: str) -> list[Callable[[], Awaitable[object]]]:
    """The seed's Python example with a `size`-byte image, parsed every way the table shows."""
    image = b"\xff\xd8\xff\xe0" + os.urandom(size - 4)
    prepared = requests.Request("POST", "http://x/", data=FIELDS, files={"file": image}).prepare()
    content_type, body = prepared.headers["Content-Type"], prepared.body
    assert isinstance(body, bytes)
    chunks = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]
    headers = {"Content-Type": content_type, "Content-Length": str(len(body))}
    view = memoryview(image)

    async def join() -> bytes:
        return b"".join(chunks)

    async def read() -> bytes:
        stream, parts = ChunkStream(chunks), []
        while chunk := await stream.readany():
            parts.append(chunk)
        return b"".join(parts)

    async def hash_only() -> str:
        return xxhash.xxh3_128_hexdigest(view)

    async def gateway_form(memory_limit: int = 1024 * 1024) -> None:
        form = await read_form(content_type, len(body), ChunkStream(chunks),
                               memory_limit=memory_limit, spool_dir=spool)
        assert form.file is not None and form.file.size == size
        form.close()

    async def gateway_form_in_memory() -> None:
        await gateway_form(memory_limit=len(body))

    async def aiohttp_reader() -> None:
        reader = MultipartReader(headers, aiohttp_stream(chunks))
        while (part := await reader.next()) is not None:
            await part.read()  # type: ignore[union-attr]

    async def aiohttp_post() -> None:
        request = make_mocked_request("POST", "/api/v2/", headers=headers,
                                      payload=aiohttp_stream(chunks), client_max_size=2**30)
        post = await request.post()
        post["file"].file.close()  # type: ignore[union-attr]

    return [join, read, hash_only, gateway_form, gateway_form_in_memory, aiohttp_reader,
            aiohttp_post]


async def main() -> None:
    spool = tempfile.mkdtemp(prefix="form-bench-")
    print(f"{'body':>7} {'join':>8} {'read':>8} {'hash':>8} {'read_form':>10} {'in-memory':>10} "
          f"{'aiohttp':>9} {'post()':>9}  {'parse cost':>10} {'post()/read_form':>16} "
          f"{'aiohttp/in-memory':>17}")
    for label, size, n in SIZES:
        join, read, hash_, form, in_memory, reader, post = [
            await per_call(fn, n) for fn in contenders(size, spool)]
        print(f"{label:>7} {join:>8.1f} {read:>8.1f} {hash_:>8.1f} {form:>10.1f} "
              f"{in_memory:>10.1f} {reader:>9.1f} {post:>9.1f}  "
              f"{in_memory - read - hash_:>10.1f} {post / form:>15.1f}x "
              f"{reader / in_memory:>16.1f}x")
    os.rmdir(spool)


if __name__ == "__main__":
    asyncio.run(main())
