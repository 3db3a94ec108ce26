"""Upload parsing cost: gateway.http.form.read_form, old and new, per upload size and boundary
length.

    python bench/form_bench.py [--quick] [--old REV]

Bodies are the seed's Python example (four fields, then the file), fed in 64 KiB chunks as
aiohttp's StreamReader.readany() hands them out, with boundaries of 1, 8, 32 (requests and
urllib3: 32 hex digits) and 38 characters (Chrome: ----WebKitFormBoundary + 16). Bodies up
to 1 MiB are read whole (read_form's memory_limit), larger ones streamed and spooled to a temp
file. Columns, in microseconds per call (best of five rounds):

    read      the readany() loop plus b"".join: what `await request.read()` costs here
    hash      xxh3-128 of the file's bytes
    find      one bytes.find of the delimiter over the file: the scan's floor without StringZilla
    sz-find   the same search by StringZilla's find (gateway.http.form.SCANS), the one used
    old       read_form as of REV (default 30877d4: the in-memory path walked back from the
              body's end and did not scan the file)
    new       read_form as it is now: one forward scan of every body (StringZilla's find)
    new-bytes the same with bytes.find (what it costs where StringZilla does not install)
    new-mem   read_form as the gateway calls it, with the process's UploadMemory: bodies past
              memory_limit up to 16 MiB read whole instead of spooled
    new-old   what the scan costs the hit path (read_form runs on every request)
    parse     new - read - hash: what parsing adds to reading and hashing
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType

import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.http import form as new_form

ROOT = Path(__file__).resolve().parent.parent

CHUNK = 64 * 1024
OLD_REV = "30877d4"
MOVED = {"gateway.errors": "gateway.core.errors", "gateway.form": "gateway.http.form"}
SIZES = [("10 KB", 10_000, 2000), ("100 KB", 100_000, 400), ("1 MB", 1_000_000, 40),
         ("5 MB", 5_000_000, 8)]
BOUNDARIES = ["x", "a1B2c3D4", "8b7a8a7e4b7f4b0f9b2f0e7c2d3a1b4c",
              "----WebKitFormBoundary7MA4YWxkTrZu0gW"]
FIELDS = [("apikey", "YOUR-API-KEY"), ("type", "objects"), ("max_labels", "10"),
          ("min_confidence", "80")]


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


def old_module(rev: str) -> ModuleType | None:
    """gateway/form.py as of `rev`, imported as its own module; None outside a git checkout."""
    try:
        source = subprocess.run(["git", "show", f"{rev}:gateway/form.py"], cwd=ROOT,
                                capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    # Modules it imports that have moved since (the package is laid out by layer now).
    for old, new in MOVED.items():
        source = source.replace(f"from {old} import".encode(), f"from {new} import".encode())
    path = Path(tempfile.mkdtemp(prefix="form-bench-old-")) / "form_old.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("form_old", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def body_of(image: bytes, boundary: str) -> bytes:
    out = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
           .encode() for name, value in FIELDS]
    out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
               f'filename="file"\r\n\r\n'.encode() + image + f"\r\n--{boundary}--\r\n".encode())
    return b"".join(out)


async def per_call(fn: Callable[[], Awaitable[object]], n: int) -> float:
    """Microseconds per call: the best of five rounds of n calls."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            await fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def contenders(image: bytes, boundary: str, spool: str, modules: list[ModuleType]
               ) -> list[Callable[[], Awaitable[object]]]:
    body = body_of(image, boundary)
    content_type = f"multipart/form-data; boundary={boundary}"
    chunks = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]
    view = memoryview(image)
    delim = b"\r\n--" + boundary.encode()

    async def read() -> bytes:
        stream, parts = ChunkStream(chunks), []
        while chunk := await stream.readany():
            parts.append(chunk)
        return b"".join(parts)

    async def hash_only() -> str:
        return xxhash.xxh3_128_hexdigest(view)

    file_start = body.index(b"\r\n\r\n", body.index(b'name="file"')) + 4

    async def find() -> int:
        return body.find(delim, file_start)  # over the file: the next delimiter ends it

    async def sz_find() -> int:  # the installed search: StringZilla's where it installs
        return new_form._find(body, delim, file_start)

    def parse_with(module: ModuleType, scan: str | None = None,
                   memory: bool = False) -> Callable[[], Awaitable[object]]:
        extra = {"memory": new_form.UploadMemory()} if memory else {}

        async def parse() -> None:
            used = new_form._find
            if scan is not None:
                new_form._find = new_form.SCANS[scan]
            try:
                form = await module.read_form(content_type, len(body), ChunkStream(chunks),
                                              spool_dir=spool, **extra)
            finally:
                new_form._find = used
            assert form.file is not None and form.file.size == len(image)
            form.close()

        return parse

    return [read, hash_only, find, sz_find, *(parse_with(m) for m in modules),
            parse_with(new_form, "bytes"), parse_with(new_form, memory=True)]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 calls a round")
    parser.add_argument("--old", default=OLD_REV, help="the revision to compare with")
    args = parser.parse_args()
    old = old_module(args.old)
    modules = [m for m in (old, new_form) if m is not None]
    spool = tempfile.mkdtemp(prefix="form-bench-")
    print(f"{'body':>6} {'boundary':>8} {'read':>8} {'hash':>8} {'find':>8} {'sz-find':>8} "
          + (f"{'old':>8} " if old else "") + f"{'new':>8} {'new-bytes':>9} {'new-mem':>8} "
          + (f"{'new-old':>8} " if old else "") + f"{'parse':>8}")
    for label, size, n in SIZES:
        image = b"\xff\xd8\xff\xe0" + os.urandom(size - 4)
        for boundary in BOUNDARIES:
            costs = [await per_call(fn, 2 if args.quick else n)
                     for fn in contenders(image, boundary, spool, modules)]
            read, hash_, find, sz_find, *parses, new_bytes, new_mem = costs
            new = parses[-1]
            row = (f"{label:>6} {len(boundary):>8} {read:>8.1f} {hash_:>8.1f} {find:>8.1f} "
                   f"{sz_find:>8.1f} ")
            if old:
                row += f"{parses[0]:>8.1f} "
            row += f"{new:>8.1f} {new_bytes:>9.1f} {new_mem:>8.1f} "
            if old:
                row += f"{new - parses[0]:>+8.1f} "
            print(row + f"{new - read - hash_:>8.1f}")
    os.rmdir(spool)


if __name__ == "__main__":
    asyncio.run(main())
