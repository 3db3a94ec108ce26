"""gateway.http.form against python-multipart: for every valid body, the same file bytes and fields.

Bodies are generated (part count, order and sizes up to past memory_limit, boundaries of 1-70
characters, quoted or not, transport padding, preambles, epilogues holding delimiters, bytes in
the file that almost make a delimiter) and read by read_form three ways: whole (Content-Length
within memory_limit), streamed and spooled (Content-Length over it), chunked (no length), each
fed in random chunks, with each delimiter search of gateway.http.form.SCANS (StringZilla's and
bytes.find). python-multipart, fed the same way, says what the parts are; the
gateway's rules (the first ``file`` part is the file, the first part of a name decides, a text
part over max_field_bytes is dropped, or refused if the gateway uses it) say what it keeps.
The end-to-end tests send such bodies through a real gateway and check what reached upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import random
import string
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import xxhash
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from gateway.core.errors import NoData
from gateway.devtools.sample_images import make_jpeg, make_png, make_png_of_size
from gateway.http import form as form_module
from gateway.http.form import SCANS, USED_FIELDS, Form, read_form
from tests.support import TEAM_KEYS, Gateway, Sim
from tests.support.form import FakeStream

MEMORY_LIMIT = 1024 * 1024  # read_form's default
DEFAULT_SCAN = next(iter(SCANS))  # the delimiter search the gateway uses here
MAX_FIELD = 8 * 1024  # read_form's default max_field_bytes
BCHARS = string.ascii_letters + string.digits + "'()+_,-./:=? "  # RFC 2046 bchars


# --- the reference: python-multipart's MultipartParser, and the gateway's rules on top -----


@dataclass
class RefPart:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)


def reference_parts(boundary: bytes, body: bytes, cuts: list[int]) -> list[RefPart]:
    parts: list[RefPart] = []
    name, value = bytearray(), bytearray()
    ended = []

    def on_header_end() -> None:
        parts[-1].headers.setdefault(bytes(name).lower(), bytes(value))
        name.clear()
        value.clear()

    parser = MultipartParser(boundary, {
        "on_part_begin": lambda: parts.append(RefPart()),
        "on_header_field": lambda d, a, b: name.extend(d[a:b]),
        "on_header_value": lambda d, a, b: value.extend(d[a:b]),
        "on_header_end": on_header_end,
        "on_part_data": lambda d, a, b: parts[-1].data.extend(d[a:b]),
        "on_end": lambda: ended.append(True),
    })
    points = [0, *sorted(c for c in set(cuts) if 0 < c < len(body)), len(body)]
    for a, b in itertools.pairwise(points):
        parser.write(body[a:b])
    parser.finalize()
    assert ended, "python-multipart did not reach the close delimiter: not a valid body"
    return parts


@dataclass
class Expected:
    fields: dict[str, str]
    file: bytes | None
    filename: str | None
    content_type: str | None


def expected_form(parts: list[RefPart]) -> Expected | None:
    """What read_form must return for these parts; None: it must refuse the body (300)."""
    out = Expected({}, None, None, None)
    seen: set[str] = set()
    have_file = False
    for part in parts:
        _, params = parse_options_header(part.headers[b"content-disposition"])
        name = params[b"name"].decode("latin-1").encode("latin-1").decode("utf-8", "replace")
        if name == "file" and not have_file:
            have_file = True
            out.file = bytes(part.data)
            filename = params.get(b"filename")
            out.filename = None if filename is None else filename.decode("utf-8", "replace")
            ctype = part.headers.get(b"content-type", b"").strip()
            out.content_type = ctype.decode("utf-8", "replace") or None
            continue
        if name == "file" or name in seen:
            continue  # the first of a name decides; a later "file" part is never the file
        seen.add(name)
        if len(part.data) <= MAX_FIELD:
            out.fields[name] = bytes(part.data).decode("utf-8", "replace")
        elif name in USED_FIELDS:
            return None
    return out


# --- generated bodies ------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    content_type: str
    boundary: bytes
    body: bytes
    preamble: int  # its length: python-multipart reads no preamble, so it is given the rest

    def __repr__(self) -> str:  # bodies run past 1 MB: show their shape
        return (f"Case({self.content_type!r}, preamble={self.preamble}, {len(self.body)} bytes: "
                f"{self.body[:400]!r}...{self.body[-200:]!r})")


TEXT_NAMES = st.sampled_from([*sorted(USED_FIELDS), "note", "thumbnail", "x", "Caf\u00e9", "a b"])
TEXT_SIZES = st.sampled_from([0, 1, 8191, 8192, 8193, 11_000, 20_000]) | st.integers(0, 300)
FILE_SIZES = (st.sampled_from([0, 1, 15, 16, 17, 852, 65535, 65536, 65537, 200_000,
                               MEMORY_LIMIT - 1, MEMORY_LIMIT, MEMORY_LIMIT + 1])
              | st.integers(0, 3000))
FILENAMES = st.none() | st.text(string.ascii_letters + string.digits + '._-() ;"\u00e9',
                                max_size=20) | st.integers(1, 2100).map(lambda n: "f" * n)
HEAD_STYLES = st.sampled_from(["browser", "lower", "token", "spaced", "extra-header", "type-first"])


def head(name: str, filename: str | None, ctype: str | None, style: str) -> bytes:
    token = style == "token" and name.isalnum()
    disposition = f"form-data; name={name}" if token else f'form-data; name="{name}"'
    if style == "spaced":
        disposition = f'form-data ;  name = "{name}"'
    if filename is not None:
        disposition += '; filename="{}"'.format(filename.replace("\\", "\\\\").replace('"', '\\"'))
    key = "content-disposition" if style == "lower" else "Content-Disposition"
    lines = [f"{key}: {disposition}"]
    if ctype is not None:
        lines.insert(0 if style == "type-first" else 1, f"Content-Type: {ctype}")
    if style == "extra-header":
        lines.append("X-Extra: 1; name=\"nope\"")
    return "\r\n".join(lines).encode()


def near_delimiters(boundary: bytes) -> list[bytes]:
    delim = b"\r\n--" + boundary
    return [delim[:k] for k in range(1, len(delim))] + [b"\n--" + boundary, b"\r\r\n--"]


@st.composite
def multipart_bodies(draw: st.DrawFn, *, big: bool = True) -> Case:
    boundary = draw(st.text(BCHARS, min_size=1, max_size=70) | st.text(BCHARS, max_size=7))
    boundary = boundary.rstrip() or "b"  # a boundary does not end in a space
    quoted = draw(st.booleans()) or not all(c.isalnum() or c in "-_." for c in boundary)
    delim = b"\r\n--" + boundary.encode()
    rnd = random.Random(draw(st.integers(0, 2**32)))
    parts: list[tuple[bytes, bytes]] = []  # (header block, content)
    for _ in range(draw(st.integers(0, 7))):
        size = draw(TEXT_SIZES)
        value = bytes(rnd.choice(b"abc \xc3\xa9\r\n-") for _ in range(min(size, 40)))
        value = (value * (size // max(len(value), 1) + 1))[:size]
        parts.append((head(draw(TEXT_NAMES), draw(st.none() | FILENAMES), None,
                           draw(HEAD_STYLES)), value))
    files = draw(st.sampled_from([0, 1, 1, 1, 2]))
    for k in range(files):
        size = draw(FILE_SIZES if big and k == 0 else st.integers(0, 3000))
        content = bytearray(rnd.randbytes(size))
        for tricky in draw(st.lists(st.sampled_from(near_delimiters(boundary.encode())),
                                    max_size=4)):
            at = draw(st.integers(0, len(content)))
            content[at:at] = tricky
        ctype = draw(st.sampled_from([None, "image/png", "application/octet-stream"]))
        at = draw(st.integers(0, len(parts)))
        parts.insert(at, (head("file", draw(FILENAMES), ctype, draw(HEAD_STYLES)), bytes(content)))
    assume(parts)  # a multipart body has at least one part
    for _, content in parts:  # a valid body: the delimiter is in no part's content
        assume(delim not in content and not content.startswith(delim[2:]))
    preamble = draw(st.sampled_from([b"", b"\r\n", b"preamble\r\n", b"p" * 17_000 + b"\r\n",
                                     delim[2:-1] + b"\r\n", b"\r\n--\r\n\r\n"]))
    assume(delim not in preamble and not preamble.startswith(delim[2:]))
    epilogue = draw(st.sampled_from([b"", b"\r\n", b"\r\nepilogue\r\n" + delim + b"\r\n",
                                     b"\r\n" + delim[2:] + b"--\r\n" + delim + b"\r\nX: y\r\n"]))
    out = [preamble]
    for i, (block, content) in enumerate(parts):
        # Transport padding: python-multipart reads it after every delimiter but the first.
        padding = draw(st.sampled_from([b"", b"", b" ", b"\t \t"])) if i else b""
        out += [delim[2:] if i == 0 else delim, padding, b"\r\n", block, b"\r\n\r\n", content]
    out += [delim, b"--", epilogue]
    param = f'"{boundary}"' if quoted else boundary
    ct = draw(st.sampled_from([f"multipart/form-data; boundary={param}",
                               f"Multipart/Form-Data; charset=utf-8; BOUNDARY={param}"]))
    return Case(ct, boundary.encode(), b"".join(out), len(preamble))


# --- the differential test -------------------------------------------------------------------

WAYS = ["whole", "streamed", "spooled", "chunked"]


async def gateway_read(case: Case, way: str, cuts: list[int], spool: Path) -> Form:
    length = None if way == "chunked" else len(case.body)
    memory_limit = MEMORY_LIMIT
    if way == "whole":
        memory_limit = max(memory_limit, len(case.body))
    elif way in ("streamed", "spooled"):
        memory_limit = min(len(case.body) - 1, 0 if way == "spooled" else MEMORY_LIMIT)
    return await read_form(case.content_type, length, FakeStream(case.body, cuts),
                           memory_limit=memory_limit, spool_dir=str(spool))


def compare(form: Form, want: Expected) -> None:
    assert form.fields == want.fields
    if want.file is None:
        assert form.file is None
        return
    assert form.file is not None
    assert form.file.size == len(want.file)
    assert form.file.content_hash == xxhash.xxh3_128_hexdigest(want.file)
    assert form.file.read_all() == want.file
    assert form.file.head == want.file[:16]
    assert (form.file.filename, form.file.content_type) == (want.filename, want.content_type)


def issue_case(parts: list[tuple[bytes, bytes]], preamble: bytes = b"") -> Case:
    """A body the outside tester sent (boundary "b"): header blocks and contents."""
    out = [preamble]
    for block, content in parts:
        out += [b"--b\r\n", block, b"\r\n\r\n", content, b"\r\n"]
    out.append(b"--b--\r\n")
    return Case("multipart/form-data; boundary=b", b"b", b"".join(out), len(preamble))


IMAGE = make_png(1)  # 852 B
FILE_HEAD = head("file", "cat.png", "image/png", "browser")
KEY_HEAD = head("apikey", None, None, "browser")


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(case=multipart_bodies(), way=st.sampled_from(WAYS), scan=st.sampled_from(sorted(SCANS)),
       cuts=st.lists(st.floats(0, 1), max_size=8), small_chunks=st.integers(1, 97))
@example(case=issue_case([(KEY_HEAD, b"k"), (FILE_HEAD, IMAGE),
                          (head("note", None, None, "browser"), b"n" * 11_000)]),
         way="whole", cuts=[], small_chunks=50,
         scan=DEFAULT_SCAN).via("11 KB text field after the file")
@example(case=issue_case([(FILE_HEAD, IMAGE),
                          (head("thumb", "t.jpg", "image/jpeg", "browser"), b"\xff" * 20_000)]),
         way="whole", cuts=[], small_chunks=50,
         scan=DEFAULT_SCAN).via("20 KB thumbnail after the file")
@example(case=issue_case([(FILE_HEAD, IMAGE), (head("file", "2.png", None, "browser"),
                                               IMAGE * 9)]),
         way="whole", cuts=[], small_chunks=50,
         scan=DEFAULT_SCAN).via("a second file after the file")
@example(case=issue_case([(KEY_HEAD, b"k"), (FILE_HEAD, IMAGE),
                          (head("note", None, None, "browser"), b"n" * 11_000)]),
         way="chunked", cuts=[0.3], small_chunks=50,
         scan=DEFAULT_SCAN).via("the same, chunked")
@example(case=issue_case([(head("note", None, None, "browser"), b"x" * 9000),
                          (head("file", "f" * 2048, None, "browser"), IMAGE)],
                         preamble=b"p" * 17_000 + b"\r\n"),
         way="whole", cuts=[], small_chunks=50,
         scan=DEFAULT_SCAN).via("9 KB part, 2 KB filename, 17 KB preamble")
def test_reads_what_python_multipart_reads(case: Case, way: str, cuts: list[float],
                                           small_chunks: int, scan: str, tmp_path: Path) -> None:
    body = case.body
    points = [int(c * len(body)) for c in cuts]
    if len(body) < 30_000 and small_chunks < 10:  # tiny chunks too, where they stay cheap
        points += range(small_chunks, len(body), small_chunks)
    rest = [p - case.preamble for p in points]
    want = expected_form(reference_parts(case.boundary, body[case.preamble :], rest))
    size = -1 if want is None or want.file is None else len(want.file)
    event(f"{way}, file " + ("refused" if want is None else "none" if size < 0 else
                             ">1 MiB" if size > MEMORY_LIMIT else ">64 KiB" if size > 65536
                             else "<=64 KiB"))

    async def check() -> None:
        if want is None:
            with pytest.raises(NoData):
                await gateway_read(case, way, points, tmp_path)
            return
        form = await gateway_read(case, way, points, tmp_path)
        try:
            compare(form, want)
        finally:
            form.close()

    used = form_module._find
    form_module._find = SCANS[scan]
    try:
        asyncio.run(check())
    finally:
        form_module._find = used
    assert list(tmp_path.iterdir()) == []


# --- end to end: what reaches the upstream ----------------------------------------------------

SEARCH = TEAM_KEYS["search"]
FIELDS = [("apikey", SEARCH), ("type", "objects"), ("max_labels", "10"), ("min_confidence", "80")]


def body_of(parts: list[tuple[str, bytes, str | None]], boundary: str = "e2eBoundary",
            preamble: bytes = b"") -> bytes:
    out = [preamble]
    for name, content, filename in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
                   + content + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


def text_parts() -> list[tuple[str, bytes, str | None]]:
    return [(name, value.encode(), None) for name, value in FIELDS]


END_TO_END = [
    pytest.param(lambda img: body_of([*text_parts(), ("file", img, "cat.png"),
                                      ("note", b"n" * 11_000, None)]), id="11KB-field-after"),
    pytest.param(lambda img: body_of([("file", img, "cat.png"),
                                      ("thumbnail", make_jpeg(9) * 130, "thumb.jpg"),
                                      *text_parts()]), id="20KB-thumbnail-after"),
    pytest.param(lambda img: body_of([*text_parts(), ("file", img, "cat.png"),
                                      ("file", make_png(77, size=64), "second.png")]),
                 id="second-file-after"),
    pytest.param(lambda img: body_of([("note", b"x" * 9000, None), ("file", img, "f" * 2048),
                                      *text_parts()], preamble=b"p" * 17_000 + b"\r\n"),
                 id="9KB-part-2KB-filename-17KB-preamble"),
]


async def chunked(body: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(body), 4000):
        yield body[i : i + 4000]


@pytest.mark.parametrize("length_known", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("make_body", END_TO_END)
async def test_upstream_gets_exactly_the_image(gateway: Gateway, sim: Sim,
                                                client: aiohttp.ClientSession,
                                                make_body: Callable[[bytes], bytes],
                                                length_known: bool) -> None:
    image = make_png(1) if length_known else make_png(2)  # 852 B: the tester's image
    body = make_body(image)
    headers = {"Content-Type": "multipart/form-data; boundary=e2eBoundary"}
    data: bytes | AsyncIterator[bytes] = body if length_known else chunked(body)
    async with client.post(gateway.url, data=data, headers=headers) as r:
        answer = await r.json(content_type=None)
        assert r.status == 200, answer
        assert r.headers["X-Content-Hash"] == xxhash.xxh3_128_hexdigest(image)
    forwarded = sim.state.history[-1]
    assert forwarded["file_size"] == len(image)
    assert forwarded["file_sha256"] == hashlib.sha256(image).hexdigest()
    assert sim.state.calls == 1 and answer["data"]["quota"] == 999


@pytest.mark.parametrize("length_known", [True, False], ids=["content-length", "chunked"])
async def test_a_photo_sized_upload_is_forwarded_exactly_and_its_memory_given_back(
        gateway: Gateway, sim: Sim, client: aiohttp.ClientSession, length_known: bool) -> None:
    # 3 MB: past read_form's memory_limit, within UploadMemory.largest: read whole in memory
    # when its length is known, streamed and spooled when chunked. Either way, exact bytes.
    image = make_png_of_size(3 * 1024 * 1024, 5 if length_known else 6)
    body = body_of([*text_parts(), ("file", image, "photo.png")])
    headers = {"Content-Type": "multipart/form-data; boundary=e2eBoundary"}
    for expected in ("fwd=miss", "; hit;"):
        data: io.BytesIO | AsyncIterator[bytes] = (
            io.BytesIO(body) if length_known else chunked(body))
        if length_known:
            headers["Content-Length"] = str(len(body))
        async with client.post(gateway.url, data=data, headers=headers) as r:
            answer = await r.json(content_type=None)
            assert r.status == 200, answer
            assert expected in r.headers["Cache-Status"]
            assert r.headers["X-Content-Hash"] == xxhash.xxh3_128_hexdigest(image)
        assert gateway.state.upload_memory.held == 0
    forwarded = sim.state.history[-1]
    assert forwarded["file_size"] == len(image)
    assert forwarded["file_sha256"] == hashlib.sha256(image).hexdigest()
    assert sim.state.calls == 1


async def test_a_refused_body_is_answered_300_naming_why(gateway: Gateway, sim: Sim,
                                                         client: aiohttp.ClientSession) -> None:
    body = body_of([*text_parts(), ("file", make_png(3), "x.png")]).replace(
        b'name="file"', b'name="file"; X-Pad: ' + b"p" * 9000, 1)
    async with client.post(gateway.url, data=body, headers={
            "Content-Type": "multipart/form-data; boundary=e2eBoundary"}) as r:
        answer = await r.json(content_type=None)
    assert (r.status, answer) == (300, {
        "status": 300, "status_message": "Invalid multipart body: part headers over 8 KiB",
        "data": None})
    assert sim.state.calls == 0


