"""Upload parsing: multipart/form-data and urlencoded bodies, with limits, at close to read cost.

aiohttp's ``request.post()`` costs about ten times reading the body, so the upload path uses this.
One forward parser reads every multipart body (RFC 2046 §5.1, RFC 7578), fed one of two ways:

* Bodies of known length up to ``memory_limit`` are read whole and fed at once: the file's
  bytes come out as a view of the body (no copy).
* So are bodies of known length up to ``UploadMemory.largest`` (16 MiB) while the process's
  ``UploadMemory`` (64 MiB for all such bodies at once, each counted twice while read) has
  room for them; the Form holds its share until it is closed. A 5 MB photo is then read at
  memory speed, not written to disk and read back (a 5 MB hit's parse: ~2.4 ms -> ~0.4 ms,
  ``python bench/form_bench.py``).
* Larger or chunked bodies, or any when that budget is spent, are fed chunk by chunk: the
  file's bytes are hashed as they arrive and spooled to a temp file past ``memory_limit``, so
  memory stays at about one chunk plus the text fields.

Where a part ends is never guessed: a delimiter (CRLF, ``--``, the boundary) anywhere in the
body is a boundary, so the parser finds the next one with one substring search over each region
(preamble, every part), and every byte of the body before the close delimiter is scanned once.
That search is ``bytes.find``'s result, computed by StringZilla's SIMD ``find`` where it is
installed (a dependency on CPython; over a 100 KB upload 2.9 us against 9.7 us,
``python bench/form_bench.py``, columns sz-find and find), else by ``bytes.find`` itself
(``SCANS`` names both; the differential tests run the parser on each and hold StringZilla's
``find`` to ``bytes.find``).
The file's bytes, hash and size are therefore exactly what a reference parser extracts
(tests/http/test_form_differential.py checks this against python-multipart). What is accepted:

* any part order and sizes, a preamble and an epilogue of any length, transport padding after
  a delimiter, a quoted boundary of 1-200 characters, bare-LF header lines;
* part headers (from the end of the delimiter to the blank line) of up to ``MAX_PART_HEAD``
  (8 KiB: a 2 KiB filename fits);
* text parts of up to ``max_field_bytes`` are kept; a longer one is skipped unread unless its
  name is one the gateway uses (``USED_FIELDS``), which is refused. The first part of a name
  decides: a later one of the same name is skipped, so is every part named ``file`` after the
  first (its bytes are never added to the first's);
* at most ``max_fields`` parts besides the file, and at most ``max_file_bytes +
  LENGTH_SLACK`` bytes in all (413 past it, by Content-Length before reading, else on arrival).

Every malformed or over-limit input ends in ``NoData`` (300, its message naming why) or
``FileTooLarge`` (413).

Long because: one forward parser and its two feeds (whole body, chunks) share one state
machine, and the differential test (tests/http/test_form_differential.py) checks it as one unit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, NamedTuple, Protocol
from urllib.parse import parse_qsl, unquote, unquote_to_bytes

import xxhash

from gateway.analysis import TYPES
from gateway.core.errors import FileTooLarge, NoData
from gateway.upload import HEAD_BYTES, UploadedFile

MAX_PART_HEAD = 8 * 1024  # padding after a delimiter plus one part's header lines
LENGTH_SLACK = 1024 * 1024  # what the rest of a body may add to a max-size file
SPOOL_BATCH = 1024 * 1024  # spooled bytes are written off the event loop in batches this big
# The fields the API reads (gateway.http.api, gateway.core.cache_key): one over max_field_bytes is
# refused, any other text part that long is skipped.
USED_FIELDS = frozenset(
    {"apikey", "type", "hash"} | {p.name for t in TYPES.values() for p in t.params}
)
_CACHED_HEAD = 512  # header blocks up to this size are memoised (they repeat across requests)


class _Find(Protocol):
    def __call__(self, haystack: bytes, needle: bytes, start: int, /) -> int: ...


# The delimiter search: ``bytes.find(haystack, needle, start)``'s result for start >= 0
# (tests/http/test_form_scan.py); the first installed one is used.
SCANS: dict[str, _Find] = {"bytes": bytes.find}
try:
    from stringzilla import find as _sz_find
except ImportError:  # not built for this platform: bytes.find, the same answers
    pass
else:
    SCANS = {"stringzilla": _sz_find, **SCANS}
_find: _Find = next(iter(SCANS.values()))

_Part = tuple[str, str | None, str | None]  # name, filename, content type
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
_BLANK_LINE = re.compile(rb"\n\r?\n")
# A shortcut for the common shape; anything else takes the general path, with the same result.
_SIMPLE_HEAD = re.compile(
    rb'\r?\ncontent-disposition: form-data; name="([^"\\\r\n]*)"'
    rb'(?:; filename="([^"\\\r\n]*)")?(?:\r?\ncontent-type:([^\r\n]*))?',
    re.I,
)


def _invalid(why: str) -> NoData:
    return NoData(f"Invalid multipart body: {why}")


class AsyncByteStream(Protocol):
    async def readany(self) -> bytes: ...


@dataclass(slots=True)
class Form:
    fields: dict[str, str]  # text parts or pairs but the file; the first of a name decides
    file: UploadedFile | None  # the first part or pair named "file"
    release: Callable[[], None] | None = None  # gives back the body's UploadMemory share

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.release is not None:
            release, self.release = self.release, None
            release()


class UploadMemory:
    """How many bytes of uploads read whole past ``memory_limit`` one process holds at once.

    One per process (``GatewayState.upload_memory``): a body of known length up to
    ``largest`` is read into memory if ``held`` plus twice its length stays within ``limit``
    (twice: its chunks and their join are both held for a moment), else streamed and spooled
    as before, so the budget bounds memory and never refuses an upload."""

    def __init__(self, limit: int = 64 * 1024 * 1024, largest: int = 16 * 1024 * 1024) -> None:
        self.limit = limit
        self.largest = largest
        self.held = 0

    def take(self, size: int) -> Callable[[], None] | None:
        """Reserve what reading a body of ``size`` bytes whole holds (twice its size); the
        answer gives it back, once called. None: no room, or the body is too large."""
        share = 2 * size
        if size > self.largest or self.held + share > self.limit:
            return None
        self.held += share
        return functools.partial(self._give, share)

    def _give(self, share: int) -> None:
        self.held -= share


class _Limits(NamedTuple):
    max_file_bytes: int
    max_field_bytes: int
    max_fields: int
    memory_limit: int
    spool_dir: str | None


async def read_form(
    content_type: str | None,
    content_length: int | None,
    stream: AsyncByteStream,
    *,
    max_file_bytes: int = 50 * 1024 * 1024,
    max_field_bytes: int = 8 * 1024,
    max_fields: int = 64,
    memory_limit: int = 1 * 1024 * 1024,
    spool_dir: str | None = None,
    memory: UploadMemory | None = None,
) -> Form:
    """Read a POST body into text fields and the ``file`` upload. The caller closes the Form
    (which gives back its share of ``memory``)."""
    boundary = _boundary(content_type)
    # Percent-encoding takes up to three bytes per content byte.
    max_body = max_file_bytes * (1 if boundary else 3) + LENGTH_SLACK
    if content_length is not None:
        if content_length <= 0:
            raise NoData()
        if content_length > max_body:
            raise FileTooLarge()
    lim = _Limits(max_file_bytes, max_field_bytes, max_fields, memory_limit, spool_dir)
    if boundary is None:
        return await _read_streamed(_UrlencodedParser(lim), stream, content_length, max_body)
    release = None  # past memory_limit, read whole only within the process's UploadMemory
    if content_length is not None and content_length > memory_limit and memory is not None:
        release = memory.take(content_length)
    if content_length is None or (content_length > memory_limit and release is None):
        parser = _MultipartParser(boundary, lim)
        return await _read_streamed(parser, stream, content_length, max_body)
    if release is not None:
        lim = lim._replace(memory_limit=content_length)
    # Read whole: no temp file to clean up, the file is at most the body.
    try:
        parser = _MultipartParser(boundary, lim)
        parser.feed(await _read_body(stream, content_length), eof=True)
        form = parser.finish()
    except BaseException:
        if release is not None:
            release()
        raise
    form.release = release
    return form


async def _read_streamed(
    parser: _MultipartParser | _UrlencodedParser,
    stream: AsyncByteStream,
    content_length: int | None,
    max_body: int,
) -> Form:
    received = 0
    try:
        # A multipart epilogue is not parsed, but the message must still arrive whole
        # (RFC 9112 6.3): cut short of its Content-Length, or chunked without its last chunk,
        # it is an aborted upload, not a request to forward and charge.
        while chunk := await _read_chunk(stream):
            received += len(chunk)
            if received > max_body:
                raise FileTooLarge()
            if content_length is not None and received > content_length:
                raise NoData("Invalid request: body longer than its Content-Length")
            if not parser.done:
                parser.feed(chunk)
                if parser.sink is not None and parser.sink.backlog >= SPOOL_BATCH:
                    await parser.sink.drain()
        if not received:
            raise NoData()
        if content_length is not None and received != content_length:
            raise NoData("Invalid request: body shorter than its Content-Length")
        if not parser.done:
            parser.feed(b"", eof=True)
        if parser.sink is not None:
            await parser.sink.drain()
        return parser.finish()
    except BaseException:
        if parser.sink is not None:
            parser.sink.discard()
        raise


def parse_query(query_string: str) -> dict[str, str]:
    """Pairs of a raw (still percent-encoded) query string; first occurrence wins."""
    fields: dict[str, str] = {}
    for name, value in parse_qsl(query_string, keep_blank_values=True, errors="replace"):
        fields.setdefault(name, value)
    return fields


def _boundary(content_type: str | None) -> bytes | None:
    """The multipart boundary, or None for urlencoded; NoData for anything else."""
    if content_type and content_type.startswith("multipart/form-data; boundary="):
        boundary = content_type[30:]  # the common shape, e.g. ----WebKitFormBoundaryAbC123
        if len(boundary) <= 70 and boundary.isascii() and boundary.strip("-").isalnum():
            return boundary.encode()
    mtype, _, rest = (content_type or "").partition(";")
    mtype = mtype.strip().lower()
    if mtype == "application/x-www-form-urlencoded":
        return None
    if mtype != "multipart/form-data":
        raise NoData()
    boundary = _params(";" + rest).get("boundary", "")
    # RFC 2046 allows 70 characters; some clients go beyond, none need CR or LF.
    if not 0 < len(boundary) <= 200 or not (boundary.isascii() and boundary.isprintable()):
        raise _invalid("no usable boundary in its Content-Type")
    return boundary.encode("ascii")


def _params(value: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for m in _PARAM.finditer(value):
        raw = m[2]
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = raw[1:-1].replace("\\\\", "\\").replace('\\"', '"')
        else:
            raw = raw.strip()
        params.setdefault(m[1].lower(), raw)
    return params


async def _read_chunk(stream: AsyncByteStream) -> bytes:
    try:
        return await stream.readany()
    except Exception as exc:  # a transport failure mid-body, e.g. broken chunked encoding
        raise NoData("Invalid request: body cut short") from exc


async def _read_body(stream: AsyncByteStream, content_length: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size <= content_length and (chunk := await _read_chunk(stream)):
        chunks.append(chunk)
        size += len(chunk)
    if size < content_length:
        raise NoData("Invalid request: body shorter than its Content-Length")
    if size > content_length:
        raise NoData("Invalid request: body longer than its Content-Length")
    return b"".join(chunks)  # no copy when it came in one chunk


class _FileSink:
    """Hashes the file's bytes as they come; holds them in memory, past memory_limit on disk."""

    def __init__(self, part: _Part, lim: _Limits) -> None:
        _, self.filename, self.content_type = part
        self.lim = lim
        self.size = 0
        self.head = b""
        self.backlog = 0  # bytes in _batch, not yet written to the temp file
        self._hasher = xxhash.xxh3_128()
        self._mem: memoryview | bytearray | None = None
        self._batch = bytearray()
        self._path: str | None = None
        self._file: IO[bytes] | None = None

    def write(self, piece: memoryview) -> None:
        if not piece:
            return
        self.size += len(piece)
        if self.size > self.lim.max_file_bytes:
            raise FileTooLarge()
        self._hasher.update(piece)
        if len(self.head) < HEAD_BYTES:
            self.head += piece[: HEAD_BYTES - len(self.head)].tobytes()
        if self._path is None and self.size > self.lim.memory_limit:
            fd, self._path = tempfile.mkstemp(prefix="upload-", dir=self.lim.spool_dir)
            self._file = os.fdopen(fd, "wb")
            if self._mem is not None:
                self._batch += self._mem
                self._mem = None
        if self._path is not None:
            self._batch += piece
            self.backlog = len(self._batch)
        elif self._mem is None:
            self._mem = piece  # the whole file when the body was read whole: no copy
        else:
            if isinstance(self._mem, memoryview):
                self._mem = bytearray(self._mem)
            self._mem += piece

    async def drain(self) -> None:
        if self._file is not None and self._batch:
            batch, self._batch, self.backlog = self._batch, bytearray(), 0
            # Disk writes can stall under write-back pressure; keep them off the event loop.
            await asyncio.get_running_loop().run_in_executor(None, self._file.write, batch)

    def result(self) -> UploadedFile:
        if self._file is not None:
            self._file.close()
        mem = self._mem if self._mem is not None or self._path is not None else b""
        data = memoryview(mem) if isinstance(mem, bytearray) else mem
        return UploadedFile(
            self._hasher.hexdigest(),
            self.size,
            self.head,
            self.filename,
            self.content_type,
            data=data,
            path=self._path,
        )

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)


class _Parser:
    """What the multipart and the urlencoded parsers share: fields, the file, the limits."""

    def __init__(self, lim: _Limits) -> None:
        self.lim = lim
        self.fields: dict[str, str] = {}
        self.sink: _FileSink | None = None
        self.done = False
        self._count = 0  # parts or pairs but the file, duplicates and skipped ones included

    _TOO_MANY = "Invalid request: over {} fields"

    def _counted(self) -> None:
        self._count += 1
        if self._count > self.lim.max_fields:
            raise NoData(self._TOO_MANY.format(self.lim.max_fields))

    def _add_field(self, name: str, value: bytes | memoryview) -> None:
        self._counted()
        if len(value) > self.lim.max_field_bytes:
            raise NoData(f"Invalid request: a field over {self.lim.max_field_bytes} bytes")
        if name != "file" and name not in self.fields:
            self.fields[name] = str(value, "utf-8", "replace")

    def finish(self) -> Form:
        if not self.done or (self.sink is None and not self._count):
            raise NoData()  # nothing in it
        return Form(self.fields, self.sink.result() if self.sink is not None else None)


# Where the multipart parser is: what the bytes up to the next delimiter are.
_PREAMBLE, _HEAD, _FIELD, _FILE, _SKIP = range(5)


class _MultipartParser(_Parser):
    """Forward RFC 2046 parser, fed the whole body at once or chunk by chunk.

    In the scanning states (preamble, file, skipped part) nothing is held back but a tail that
    could begin a delimiter; a text field is held whole, at most max_field_bytes.
    """

    _TOO_MANY = "Invalid multipart body: over {} parts besides the file"

    def __init__(self, boundary: bytes, lim: _Limits) -> None:
        super().__init__(lim)
        self.delim = b"\r\n--" + boundary
        self._held = b"\r\n"  # so that a body opening with --boundary needs no special case
        self._state = _PREAMBLE
        self._scan = 0  # _FIELD: where in _held the delimiter search resumes
        self._names: set[str] = set()  # every part's name so far: the first of a name decides
        self._name = ""  # the text field being read

    def feed(self, data: bytes, eof: bool = False) -> None:
        delim = self.delim
        dl = len(delim)
        held, state = self._held, self._state
        pos, scan = 0, self._scan
        if held and state != _HEAD and state != _FIELD and len(data) >= dl:
            # `held` is a proper prefix of the delimiter: settle it without copying `data`.
            # Any delimiter in probe starts in `held` (probe is shorter than held + delim).
            j = (held + data[: dl - 1]).find(delim)
            self._content(state, memoryview(held)[: len(held) if j < 0 else j])
            if j >= 0:
                pos, state = j + dl - len(held), _HEAD
            buf = data
        else:
            buf = held + data if held else data
        fields, names, max_field = self.fields, self._names, self.lim.max_field_bytes
        while True:
            if state == _HEAD:
                if buf[pos : pos + 2] == b"--":  # the close delimiter: the rest is epilogue
                    self.done = True
                    break
                # The common case, one find and a memoised parse; else the general path.
                stop = buf.find(b"\r\n\r\n", pos, pos + _CACHED_HEAD + 4)
                if stop >= 0 and (part := _parse_small_block(buf[pos:stop])) is not None:
                    pos = stop + 4
                elif (head := _parse_head(buf, pos)) is not None:
                    pos, part = head
                else:
                    break
                name = part[0]
                if name == "file" and self.sink is None:
                    self.sink = _FileSink(part, self.lim)
                    state = _FILE
                    continue
                self._count += 1
                if self._count > self.lim.max_fields:
                    raise NoData(self._TOO_MANY.format(self.lim.max_fields))
                if name == "file" or name in names:
                    state = _SKIP  # the first of a name decides, the first "file" too
                else:
                    names.add(name)
                    self._name, state, scan = name, _FIELD, pos
            elif state == _FIELD:
                stop = pos + max_field + dl  # the delimiter must start by then
                i = buf.find(delim, scan, stop)
                if i >= 0:
                    fields[self._name] = buf[pos:i].decode("utf-8", "replace")
                    pos, state = i + dl, _HEAD
                    continue
                if len(buf) < stop:
                    scan = max(pos, len(buf) - dl + 1)
                    break
                if self._name in USED_FIELDS:
                    raise _invalid(f"field {self._name} over {max_field} bytes")
                pos, state = stop - dl + 1, _SKIP  # too long to keep and not needed: skip it
            else:  # _PREAMBLE, _FILE, _SKIP: all up to the next delimiter is content
                i = _find(buf, delim, pos)
                if i >= 0:
                    if state == _FILE:
                        self._content(state, memoryview(buf)[pos:i])
                    pos, state = i + dl, _HEAD
                    continue
                # Keep back a tail that could begin a delimiter. Boundaries hold no CR, so only
                # the last CR among the last dl - 1 bytes can start one.
                end = len(buf)
                k = buf.rfind(b"\r", max(pos, end - dl + 1))
                if k >= 0 and delim.startswith(buf[k:]):
                    end = k
                self._content(state, memoryview(buf)[pos:end])
                pos = end
                break
        self._held = b"" if self.done else buf[pos:]
        self._scan, self._state = scan - pos, state
        if eof and not self.done:
            if state == _PREAMBLE:
                raise _invalid("no boundary delimiter")
            raise _invalid("no close delimiter (cut short?)")

    def _content(self, state: int, piece: memoryview) -> None:
        if state == _FILE:
            assert self.sink is not None
            self.sink.write(piece)


def _parse_head(buf: bytes, pos: int) -> tuple[int, _Part] | None:
    """Parse the padding and part headers after a `--boundary` at `pos` (not the close one).

    Returns (content start, part), or None when buf does not hold all of it yet.
    """
    end = len(buf)
    if end - pos < 2:
        return None
    limit = min(end, pos + MAX_PART_HEAD)
    stop = buf.find(b"\r\n\r\n", pos, limit)
    if stop >= 0 and (part := _parse_block(buf[pos:stop])) is not None:
        return stop + 4, part
    m = _BLANK_LINE.search(buf, pos, limit)  # a head with bare LF line ends
    if m is None:
        if limit - pos >= MAX_PART_HEAD:
            raise _invalid(f"part headers over {MAX_PART_HEAD // 1024} KiB")
        return None
    part = _parse_block(buf[pos : m.start()])
    if part is None:
        raise _invalid("part without headers")
    return m.end(), part


def _parse_block(block: bytes) -> _Part | None:
    """Padding and header lines, up to the blank line; None if a blank line comes earlier."""
    if len(block) <= _CACHED_HEAD:
        return _parse_small_block(block)
    return _parse_any_block(block)


def _parse_any_block(block: bytes) -> _Part | None:
    if m := _SIMPLE_HEAD.fullmatch(block):  # what browsers and most clients send
        name, filename, content_type = m.groups()
        return (
            name.decode("utf-8", "replace"),
            None if filename is None else filename.decode("utf-8", "replace"),
            content_type.strip().decode("utf-8", "replace") or None if content_type else None,
        )
    padding, *lines = block.split(b"\n")
    if padding.strip(b" \t\r"):
        raise _invalid("text after a boundary delimiter")
    disposition = content_type = None
    for line in lines:
        line = line[:-1] if line.endswith(b"\r") else line
        if not line:
            return None
        key, colon, value = line.partition(b":")
        key = key.strip().lower()
        if not colon or not key:
            raise _invalid("a part header line without a colon")
        if key == b"content-disposition" and disposition is None:
            disposition = value.decode("utf-8", "replace")
        elif key == b"content-type" and content_type is None:
            content_type = value.strip().decode("utf-8", "replace") or None
    params = _params(disposition or "")
    name = params.get("name")
    if name is None:
        raise _invalid("a part without a Content-Disposition name")
    filename = params.get("filename")
    charset, _, rest = params.get("filename*", "").partition("'")
    if rest:  # RFC 5987: charset'language'percent-encoded
        encoded = rest.partition("'")[2]
        try:
            filename = unquote(encoded, encoding=charset or "utf-8", errors="replace")
        except (LookupError, ValueError):  # an unknown charset, or one without "replace"
            filename = unquote(encoded, errors="replace")
    return name, filename, content_type


# Heads repeat across requests (same names, same client); only small ones are kept.
_parse_small_block = functools.lru_cache(maxsize=512)(_parse_any_block)


def _unquote(raw: bytes) -> bytes:
    """Form-urlencoding: + is a space, %XX a byte; a % not starting %XX is refused."""
    if b"+" in raw:
        raw = raw.replace(b"+", b" ")
    if b"%" not in raw:
        return raw
    out = unquote_to_bytes(raw)
    if len(raw) - len(out) != 2 * raw.count(b"%"):
        raise NoData("Invalid request: a % not followed by two hex digits")
    return out


class _UrlencodedParser(_Parser):
    """Pairs split on "&", fed chunk by chunk, so that a percent-encoded file streams too."""

    def __init__(self, lim: _Limits) -> None:
        super().__init__(lim)
        self._buf = b""
        self._in_file = False  # between "file=" and the next "&"

    def feed(self, data: bytes, eof: bool = False) -> None:
        buf = self._buf + data if self._buf else data
        pos = 0
        while True:
            amp = buf.find(b"&", pos)
            end = amp if amp >= 0 else len(buf) if eof else -1  # the current pair's end
            if self._in_file:
                assert self.sink is not None
                stop = len(buf) if end < 0 else end
                if end < 0:  # an escape split across chunks waits for the next one
                    pct = buf.find(b"%", max(pos, stop - 2), stop)
                    stop = pct if pct >= 0 else stop
                self.sink.write(memoryview(_unquote(buf[pos:stop])))
                pos = stop
                if end < 0:
                    break
                self._in_file = False
            else:
                eq = buf.find(b"=", pos, len(buf) if end < 0 else end)
                if eq >= 0 and self.sink is None and _unquote(buf[pos:eq]) == b"file":
                    self.sink = _FileSink(("file", None, None), self.lim)
                    pos, self._in_file = eq + 1, True
                    continue
                if end < 0:
                    if len(buf) - pos > 3 * self.lim.max_field_bytes + 1024:
                        raise NoData(
                            f"Invalid request: a field over {self.lim.max_field_bytes} bytes"
                        )
                    break
                if end > pos:  # "a=1&&b=2" holds an empty pair
                    name, _, value = buf[pos:end].partition(b"=")
                    self._add_field(str(_unquote(name), "utf-8", "replace"), _unquote(value))
            if amp < 0:
                break
            pos = amp + 1
        self._buf = buf[pos:]
        self.done = eof
