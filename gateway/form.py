"""Upload parsing: multipart/form-data and urlencoded bodies, with limits, at close to read cost.

aiohttp's ``request.post()`` costs about ten times reading the body, so the upload path uses this.
Two ways through a multipart body:

* Bodies of known length up to ``memory_limit`` are read whole. The parts before the file are
  parsed forward; the file part's *end* is found by walking back from the body's end over the
  small parts after it. The delimiter cannot occur inside a part's content (RFC 2046 §5.1.1),
  so the file's bytes are hashed (a memoryview, no copy) but never scanned. When anything back
  there is not as expected, the same bytes go through the forward parser instead.
* Larger or chunked bodies go through the forward parser chunk by chunk: the file's bytes are
  hashed as they arrive and spooled to a temp file past ``memory_limit``, so memory stays at
  about one chunk plus the text fields.

Every malformed or over-limit input ends in ``NoData`` (300) or ``FileTooLarge`` (413).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import tempfile
from dataclasses import dataclass
from typing import IO, NamedTuple, Protocol
from urllib.parse import parse_qsl, unquote, unquote_to_bytes

import xxhash

from gateway.errors import FileTooLarge, NoData

HEAD_BYTES = 16  # kept from the file's start for the magic-byte check
MAX_PART_HEAD = 2048  # the rest of a boundary line plus one part's headers
MAX_PREAMBLE = 16 * 1024
LENGTH_SLACK = 64 * 1024  # what the fields around a max-size file may add to Content-Length
SPOOL_BATCH = 1024 * 1024  # spooled bytes are written off the event loop in batches this big

_Part = tuple[str, str | None, str | None]  # name, filename, content type
_CLOSE: tuple[int, _Part] = (-1, ("", None, None))  # _parse_head's answer for `--boundary--`
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
_BLANK_LINE = re.compile(rb"\n\r?\n")
# A shortcut for the common shape; anything else takes the general path, with the same result.
_SIMPLE_HEAD = re.compile(
    rb'\r?\ncontent-disposition: form-data; name="([^"\\\r\n]*)"'
    rb'(?:; filename="([^"\\\r\n]*)")?(?:\r?\ncontent-type:([^\r\n]*))?',
    re.I,
)


class AsyncByteStream(Protocol):
    async def readany(self) -> bytes: ...


@dataclass(slots=True)
class UploadedFile:
    content_hash: str  # xxh3-128 hex of exactly the content bytes
    size: int
    head: bytes  # the first HEAD_BYTES bytes of the content
    filename: str | None
    content_type: str | None
    data: bytes | memoryview | None = None  # small uploads: the content, possibly a view
    path: str | None = None  # large uploads: a temp file holding the content

    def read_all(self) -> bytes:
        if self.data is not None:
            return bytes(self.data)
        if self.path is not None:
            with open(self.path, "rb") as f:
                return f.read()
        return b""

    def close(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


@dataclass(slots=True)
class Form:
    fields: dict[str, str]  # every part or pair but the file; first occurrence wins
    file: UploadedFile | None  # the first part or pair named "file"

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


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
) -> Form:
    """Read a POST body into text fields and the ``file`` upload. The caller closes the Form.

    Deliberate trade-off of the in-memory path: the file's bytes are trusted not to hold the
    delimiter (RFC 2046 §5.1.1) and are not scanned beyond one text part's length from the end
    of the file. A body that hides a delimiter further in (a text field after the file longer
    than ``max_field_bytes``, or a close delimiter followed by more parts) is read as if those
    bytes belonged to the file, where the streamed path refuses it or stops earlier.
    """
    boundary = _boundary(content_type)
    if content_length is not None:
        if content_length <= 0:
            raise NoData()
        # Percent-encoding takes up to three bytes per content byte.
        if content_length > max_file_bytes * (1 if boundary else 3) + LENGTH_SLACK:
            raise FileTooLarge()
    if boundary is not None and content_length is not None and content_length <= memory_limit:
        body = await _read_body(stream, content_length)
        try:
            if form := _parse_whole(body, boundary, max_file_bytes, max_field_bytes, max_fields):
                return form
        except NoData:
            pass  # the forward parser will say what is wrong, and it might be nothing
    lim = _Limits(max_file_bytes, max_field_bytes, max_fields, memory_limit, spool_dir)
    if boundary is None:
        return await _read_streamed(_UrlencodedParser(lim), stream, content_length)
    parser = _MultipartParser(boundary, lim)
    if content_length is None or content_length > memory_limit:
        return await _read_streamed(parser, stream, content_length)
    parser.feed(body)  # the fast path declined: the same bytes, forward
    return parser.finish()  # no temp file to clean up: the file is at most the body


async def _read_streamed(
    parser: _MultipartParser | _UrlencodedParser,
    stream: AsyncByteStream,
    content_length: int | None,
) -> Form:
    received = 0
    try:
        while not parser.done:
            chunk = await _read_chunk(stream)
            received += len(chunk)
            if content_length is not None and received > content_length:
                raise NoData()
            if not chunk:
                if not received or (content_length is not None and received != content_length):
                    raise NoData()  # empty or truncated
                parser.feed(b"", eof=True)
                break
            parser.feed(chunk)
            if parser.sink is not None and parser.sink.backlog >= SPOOL_BATCH:
                await parser.sink.drain()
        # A multipart epilogue is not parsed, but the message must still arrive whole
        # (RFC 9112 6.3): cut short of its Content-Length, or chunked without its last chunk,
        # it is an aborted upload, not a request to forward and charge.
        epilogue = 0
        while chunk := await _read_chunk(stream):
            received += len(chunk)
            epilogue += len(chunk)
            if (content_length is None and epilogue > LENGTH_SLACK) or (
                content_length is not None and received > content_length
            ):
                raise NoData()
        if content_length is not None and received != content_length:
            raise NoData()
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
        raise NoData()
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
        raise NoData() from exc


async def _read_body(stream: AsyncByteStream, content_length: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        while size <= content_length and (chunk := await stream.readany()):
            chunks.append(chunk)
            size += len(chunk)
    except Exception as exc:  # see _read_chunk
        raise NoData() from exc
    if size != content_length:
        raise NoData()  # truncated, or longer than announced
    return b"".join(chunks)  # no copy when it came in one chunk


def _parse_whole(
    body: bytes, boundary: bytes, max_file: int, max_field: int, max_fields: int
) -> Form | None:
    """The fast path for a body read whole (see the module doc). None: not the simple case."""
    delim = b"\r\n--" + boundary
    dl = len(delim)
    if not body.startswith(delim[2:]):
        return None  # a preamble
    fields: dict[str, str] = {}
    pos = dl - 2
    count = 0
    while True:  # the small parts before the file, forward
        stop = body.find(b"\r\n\r\n", pos, pos + MAX_PART_HEAD)
        if stop < 0 or (part := _parse_block(body[pos:stop])) is None:
            return None  # also the close delimiter of a body without a file
        start = stop + 4
        if part[0] == "file":
            break
        end = body.find(delim, start, start + max_field + dl)
        count += 1
        if end < 0 or count > max_fields:
            return None
        if part[0] not in fields:
            fields[part[0]] = body[start:end].decode("utf-8", "replace")
        pos = end + dl
    # The file's end: walk back from the body's end over the small parts after it.
    window = dl + MAX_PART_HEAD + max_field  # one whole text part
    end = body.rfind(delim, max(start, len(body) - window))
    if end < 0 or not body.startswith(b"--", end + dl):
        return None  # no close delimiter near the end: a long epilogue, or broken
    trailing: list[tuple[str, int, int]] = []
    while (i := body.rfind(delim, max(start, end - window), end)) >= 0:
        # A delimiter after the file's content opens a text part that ends at `end`.
        stop = body.find(b"\r\n\r\n", i + dl, min(end, i + dl + MAX_PART_HEAD))
        count += 1
        if stop < 0 or count > max_fields or end - stop - 4 > max_field:
            return None
        if body.startswith(b"--", i + dl) or (tpart := _parse_block(body[i + dl : stop])) is None:
            return None
        trailing.append((tpart[0], stop + 4, end))
        end = i
    # No delimiter in the window before `end`, so it ends the file (see read_form).
    if end - start > max_file:
        raise FileTooLarge()
    for name, a, b in reversed(trailing):
        if name != "file" and name not in fields:
            fields[name] = body[a:b].decode("utf-8", "replace")
    content = memoryview(body)[start:end]
    return Form(
        fields,
        UploadedFile(
            xxhash.xxh3_128_hexdigest(content),
            end - start,
            body[start : min(end, start + HEAD_BYTES)],
            part[1],
            part[2],
            content,
        ),
    )


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
        self._count = 0  # text fields, duplicates and ignored "file"s included

    def _add_field(self, name: str, value: bytes | memoryview) -> None:
        self._count += 1
        if self._count > self.lim.max_fields or len(value) > self.lim.max_field_bytes:
            raise NoData()
        if name != "file" and name not in self.fields:
            self.fields[name] = str(value, "utf-8", "replace")

    def finish(self) -> Form:
        if not self.done or (self.sink is None and not self._count):
            raise NoData()  # truncated, no closing delimiter, or nothing in it
        return Form(self.fields, self.sink.result() if self.sink is not None else None)


_PREAMBLE, _HEAD, _FIELD, _FILE = range(4)


class _MultipartParser(_Parser):
    """Forward RFC 2046 parser, fed the whole body at once or chunk by chunk."""

    def __init__(self, boundary: bytes, lim: _Limits) -> None:
        super().__init__(lim)
        self.delim = b"\r\n--" + boundary
        self._buf = b"\r\n"  # so that a body opening with --boundary needs no special case
        self._state = _PREAMBLE
        self._scan = 0  # where the next delimiter search in _buf starts
        self._offset = -2  # body offset of _buf[0], for the preamble limit
        self._name = ""  # the text field being read

    def feed(self, data: bytes, eof: bool = False) -> None:
        delim = self.delim
        dl = len(delim)
        buf, state = self._buf, self._state
        if state == _FILE and len(buf) < dl <= len(data) and delim not in buf + data[: dl - 1]:
            # Mid-file: no delimiter starts in the held-back tail, so skip copying the chunk.
            assert self.sink is not None
            self.sink.write(memoryview(buf))
            buf, self._scan = b"", 0
        buf = buf + data if buf else data
        pos, scan = 0, self._scan
        while not self.done:
            if state == _PREAMBLE:
                stop = MAX_PREAMBLE + dl - self._offset
                i = buf.find(delim, scan, stop)
                if i < 0:
                    if len(buf) >= stop:
                        raise NoData()
                    pos = scan = max(pos, len(buf) - dl + 1)
                    break
                pos, state = i + dl, _HEAD
            elif state == _HEAD:
                head = _parse_head(buf, pos, len(buf))
                if head is None:
                    break
                start, part = head
                if start < 0:
                    self.done = True
                    break
                pos = scan = start
                if part[0] == "file" and self.sink is None:
                    self.sink = _FileSink(part, self.lim)
                    state = _FILE
                else:
                    self._name, state = part[0], _FIELD
            elif state == _FIELD:
                stop = pos + self.lim.max_field_bytes + dl
                i = buf.find(delim, scan, stop)
                if i < 0:
                    if len(buf) >= stop:
                        raise NoData()  # the field is too long
                    scan = max(pos, len(buf) - dl + 1)
                    break
                self._add_field(self._name, memoryview(buf)[pos:i])
                pos, state = i + dl, _HEAD
            else:  # _FILE
                assert self.sink is not None
                i = buf.find(delim, scan)
                if i < 0:  # all but what could be the start of a delimiter is content
                    keep = len(buf) - dl + 1
                    if keep > pos:
                        self.sink.write(memoryview(buf)[pos:keep])
                        pos = keep
                    scan = pos
                    break
                self.sink.write(memoryview(buf)[pos:i])
                pos, state = i + dl, _HEAD
        self._buf = b"" if self.done else buf[pos:]
        self._offset += pos
        self._scan, self._state = scan - pos, state


def _parse_head(buf: bytes, pos: int, end: int) -> tuple[int, _Part] | None:
    """Parse what follows a `--boundary` at `pos`: the close marker, or padding and part headers.

    Returns (content start, part), _CLOSE, or None when buf[:end] does not hold all of it yet.
    """
    if end - pos < 2:
        return None
    if buf.startswith(b"--", pos):
        return _CLOSE
    limit = min(end, pos + MAX_PART_HEAD)
    stop = buf.find(b"\r\n\r\n", pos, limit)
    if stop >= 0 and (part := _parse_block(buf[pos:stop])) is not None:
        return stop + 4, part
    m = _BLANK_LINE.search(buf, pos, limit)  # a head with bare LF line ends
    if m is None:
        if limit - pos >= MAX_PART_HEAD:
            raise NoData()
        return None
    part = _parse_block(buf[pos : m.start()])
    if part is None:
        raise NoData()
    return m.end(), part


@functools.lru_cache(maxsize=512)  # heads repeat across requests: same names, same client
def _parse_block(block: bytes) -> _Part | None:
    """Padding and header lines, up to the blank line; None if a blank line comes earlier."""
    if m := _SIMPLE_HEAD.fullmatch(block):  # what browsers and most clients send
        name, filename, content_type = m.groups()
        return (
            name.decode("utf-8", "replace"),
            None if filename is None else filename.decode("utf-8", "replace"),
            content_type.strip().decode("utf-8", "replace") or None if content_type else None,
        )
    padding, *lines = block.split(b"\n")
    if padding.strip(b" \t\r"):
        raise NoData()  # text after the boundary
    disposition = content_type = None
    for line in lines:
        line = line[:-1] if line.endswith(b"\r") else line
        if not line:
            return None
        key, colon, value = line.partition(b":")
        key = key.strip().lower()
        if not colon or not key:
            raise NoData()
        if key == b"content-disposition" and disposition is None:
            disposition = value.decode("utf-8", "replace")
        elif key == b"content-type" and content_type is None:
            content_type = value.strip().decode("utf-8", "replace") or None
    params = _params(disposition or "")
    name = params.get("name")
    if name is None:
        raise NoData()
    filename = params.get("filename")
    charset, _, rest = params.get("filename*", "").partition("'")
    if rest:  # RFC 5987: charset'language'percent-encoded
        encoded = rest.partition("'")[2]
        try:
            filename = unquote(encoded, encoding=charset or "utf-8", errors="replace")
        except (LookupError, ValueError):  # an unknown charset, or one without "replace"
            filename = unquote(encoded, errors="replace")
    return name, filename, content_type


def _unquote(raw: bytes) -> bytes:
    """Form-urlencoding: + is a space, %XX a byte; a % not starting %XX is refused."""
    if b"+" in raw:
        raw = raw.replace(b"+", b" ")
    if b"%" not in raw:
        return raw
    out = unquote_to_bytes(raw)
    if len(raw) - len(out) != 2 * raw.count(b"%"):
        raise NoData()
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
                        raise NoData()  # a pair too long even percent-encoded
                    break
                if end > pos:  # "a=1&&b=2" holds an empty pair
                    name, _, value = buf[pos:end].partition(b"=")
                    self._add_field(str(_unquote(name), "utf-8", "replace"), _unquote(value))
            if amp < 0:
                break
            pos = amp + 1
        self._buf = buf[pos:]
        self.done = eof
