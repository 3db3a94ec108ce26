"""gateway.http.form: multipart and urlencoded upload parsing, against aiohttp's reader as
reference."""

from __future__ import annotations

import asyncio
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import requests
import xxhash
from aiohttp import BodyPartReader, MultipartReader, StreamReader
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.core.errors import FileTooLarge, NoData
from gateway.devtools.sample_images import make_png
from gateway.http import form as form_module
from gateway.http.form import (
    LENGTH_SLACK,
    MAX_PART_HEAD,
    Form,
    UploadMemory,
    parse_query,
    read_form,
)
from tests.support.form import FakeStream

JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01" + bytes(range(256)) * 40
PNG = b"\x89PNG\r\n\x1a\n" + random.Random(1).randbytes(3000)
SEED_FIELDS = {"apikey": "YOUR-API-KEY", "type": "objects", "max_labels": "10",
               "min_confidence": "80"}
MODES = ["whole", "whole-chunks", "stream", "spool"]


async def parse(content_type: str | None, body: bytes, mode: str = "whole",
                spool_dir: Path | None = None, cuts: Sequence[int] | int | None = None,
                **limits: Any) -> Form:
    """read_form through one of its paths: body read whole, or streamed (kept, or spooled)."""
    length: int | None = len(body)
    if mode == "whole":
        cuts = cuts if cuts is not None else 65536
    elif mode == "whole-chunks":
        cuts = cuts if cuts is not None else 7
    elif mode == "stream":
        length, cuts = None, cuts if cuts is not None else 5
    else:  # spool: known length over memory_limit
        limits.setdefault("memory_limit", 0)
        cuts = cuts if cuts is not None else 1000
    return await read_form(content_type, length, FakeStream(body, cuts),
                           spool_dir=str(spool_dir) if spool_dir else None, **limits)


def encode(data: dict[str, Any], files: dict[str, Any]) -> tuple[str, bytes]:
    """A body exactly as the `requests` library sends it (the seed's Python example)."""
    prepared = requests.Request("POST", "http://x/", data=data, files=files).prepare()
    assert isinstance(prepared.body, bytes)
    return prepared.headers["Content-Type"], prepared.body


def build(parts: Sequence[tuple[str, bytes | str, str | None, str | None]], boundary: str,
          *, preamble: bytes = b"", epilogue: bytes = b"\r\n", eol: bytes = b"\r\n") -> bytes:
    """parts: (name, content, filename, content type)."""
    out = [preamble]
    for name, content, filename, ctype in parts:
        head = f'Content-Disposition: form-data; name="{name}"'
        head += f'; filename="{filename}"' if filename is not None else ""
        head += f"{eol.decode()}Content-Type: {ctype}" if ctype else ""
        data = content.encode() if isinstance(content, str) else content
        out.append(b"--%s%s%s%s%s%s\r\n" % (boundary.encode(), eol, head.encode(), eol, eol, data))
    out.append(b"--%s--%s" % (boundary.encode(), epilogue))
    return b"".join(out)


def browser_body(order: Sequence[str], boundary: str = "----WebKitFormBoundary7MA4YWxkTrZu0gW"
                 ) -> tuple[str, bytes]:
    """Like Chrome's FormData upload: the seed's JavaScript example with an image/png file."""
    values = {"type": "objects", "apikey": "YOUR-API-KEY", "min_confidence": "80",
              "max_labels": "10"}
    parts = [("file", PNG, "cat.png", "image/png") if n == "file" else (n, values[n], None, None)
             for n in order]
    return f"multipart/form-data; boundary={boundary}", build(parts, boundary, epilogue=b"\r\n")


def assert_no_temp_files(spool_dir: Path) -> None:
    assert list(spool_dir.iterdir()) == []


def check_file(form: Form, content: bytes, filename: str | None = None,
               content_type: str | None = None) -> None:
    assert form.file is not None
    assert form.file.read_all() == content
    assert form.file.size == len(content)
    assert form.file.head == content[:16]
    assert form.file.content_hash == xxhash.xxh3_128_hexdigest(content)
    assert (form.file.filename, form.file.content_type) == (filename, content_type)


# --- valid bodies, every path -------------------------------------------------------------

BROWSER_ORDER = ["type", "file", "apikey", "min_confidence", "max_labels"]
VALID = [
    pytest.param(*encode(SEED_FIELDS, {"file": JPEG}), SEED_FIELDS, JPEG, "file", None,
                 id="seed-python-requests"),
    pytest.param(*encode(SEED_FIELDS, {"file": ("photo.jpg", JPEG, "image/jpeg")}), SEED_FIELDS,
                 JPEG, "photo.jpg", "image/jpeg", id="requests-filename-type"),
    pytest.param(*browser_body(BROWSER_ORDER), SEED_FIELDS, PNG, "cat.png", "image/png",
                 id="browser-webkit"),
    pytest.param(*browser_body(["file", *SEED_FIELDS]), SEED_FIELDS, PNG, "cat.png",
                 "image/png", id="file-first"),
    pytest.param(*browser_body(["apikey", "type", "file", "max_labels", "min_confidence"]),
                 SEED_FIELDS, PNG, "cat.png", "image/png", id="file-middle"),
    pytest.param(*browser_body([*SEED_FIELDS, "file"]), SEED_FIELDS, PNG, "cat.png", "image/png",
                 id="file-last"),
    pytest.param('multipart/form-data; charset=utf-8; BOUNDARY="simple boundary"',
                 build([("apikey", "k", None, None), ("file", JPEG, "a.jpg", None)],
                       "simple boundary"), {"apikey": "k"}, JPEG, "a.jpg", None,
                 id="quoted-boundary-param-case"),
    pytest.param("Multipart/Form-Data;boundary=xyz",
                 build([("file", JPEG, None, None), ("type", "nsfw", None, None)], "xyz",
                       preamble=b"This is the preamble.\r\nIt is ignored.\r\n",
                       epilogue=b"\r\nThis is the epilogue.\r\n--xyz\r\n"),
                 {"type": "nsfw"}, JPEG, None, None, id="preamble-epilogue"),
    pytest.param("multipart/form-data; boundary=lf",
                 build([("type", "objects", None, None), ("file", PNG, "p.png", "image/png"),
                        ("apikey", "k", None, None)], "lf", eol=b"\n"),
                 {"type": "objects", "apikey": "k"}, PNG, "p.png", "image/png",
                 id="bare-lf-header-lines"),
    pytest.param("multipart/form-data; boundary=b",
                 b"--b \t\r\ncontent-disposition: form-data; name=apikey\r\n"
                 b"X-Other: 1\r\n\r\nk\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; "
                 b"filename=\"x.jpg\"; filename*=UTF-8''%E2%82%AC.jpg\r\nContent-Type: image/jpeg"
                 b"\r\n\r\n" + JPEG + b"\r\n--b--",
                 {"apikey": "k"}, JPEG, "\u20ac.jpg", "image/jpeg", id="padding-token-filename*"),
    pytest.param("multipart/form-data; boundary=dup",
                 build([("type", "cache", None, None), ("type", "objects", None, None),
                        ("file", PNG, None, None), ("file", JPEG[:100], None, None),
                        ("note", b"caf\xe9 \xff", None, None)], "dup"),
                 {"type": "cache", "note": "caf\ufffd \ufffd"}, PNG, None, None,
                 id="first-wins-bad-utf8"),
    pytest.param("multipart/form-data; boundary=e",
                 build([("apikey", "", None, None), ("file", b"", "", None)], "e"),
                 {"apikey": ""}, b"", "", None, id="empty-values"),
    pytest.param("multipart/form-data; boundary=m",
                 b"--m\r\nContent-Disposition: form-data; name=a\n\nx\r\n\r\ny\r\n--m\r\n"
                 b"Content-Disposition: form-data; name=file; filename*=nope''%41.png\r\n\r\n"
                 + PNG + b"\r\n--m--",
                 {"a": "x\r\n\r\ny"}, PNG, "A.png", None, id="lf-head-crlf-content-bad-charset"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("content_type", "body", "fields", "content", "filename", "ctype"), VALID)
async def test_valid_bodies(content_type: str, body: bytes, fields: dict[str, str],
                            content: bytes, filename: str | None, ctype: str | None, mode: str,
                            tmp_path: Path) -> None:
    form = await parse(content_type, body, mode, tmp_path)
    assert form.fields == fields
    check_file(form, content, filename, ctype)
    form.close()
    assert_no_temp_files(tmp_path)


@pytest.mark.parametrize("mode", MODES)
async def test_no_file_part(mode: str, tmp_path: Path) -> None:
    fields = {"apikey": "k", "type": "cache", "hash": "ab" * 16}
    body = build([(n, v, None, None) for n, v in fields.items()], "nf")
    form = await parse("multipart/form-data; boundary=nf", body, mode, tmp_path)
    assert form.fields == fields and form.file is None


async def test_memory_and_spool(tmp_path: Path) -> None:
    ct, body = encode(SEED_FIELDS, {"file": JPEG})
    small = await parse(ct, body, "whole")
    assert small.file is not None and small.file.path is None
    assert isinstance(small.file.data, memoryview)  # a view of the body: no copy
    kept = await parse(ct, body, "stream")
    assert kept.file is not None and kept.file.path is None and kept.file.data is not None
    big = await parse(ct, body, "spool", tmp_path)
    assert big.file is not None and big.file.data is None and big.file.path is not None
    assert Path(big.file.path).parent == tmp_path and big.file.read_all() == JPEG
    big.close()
    big.close()  # idempotent
    assert_no_temp_files(tmp_path)


async def test_a_body_past_memory_limit_is_read_whole_while_the_upload_memory_has_room(
        tmp_path: Path) -> None:
    ct, body = encode(SEED_FIELDS, {"file": JPEG})
    memory = UploadMemory(limit=4 * len(body) + 10, largest=len(body))  # two bodies, twice
    first = await parse(ct, body, "spool", tmp_path, memory=memory)
    second = await parse(ct, body, "spool", tmp_path, memory=memory)
    for form in (first, second):  # in memory although over memory_limit (0 here)
        assert form.file is not None and form.file.path is None
        assert isinstance(form.file.data, memoryview)
        check_file(form, JPEG, "file")
    assert memory.held == 4 * len(body)
    third = await parse(ct, body, "spool", tmp_path, memory=memory)  # no room left: spooled
    assert third.file is not None and third.file.path is not None
    check_file(third, JPEG, "file")
    assert memory.held == 4 * len(body)
    first.close()
    first.close()  # gives its share back once
    assert memory.held == 2 * len(body)
    fourth = await parse(ct, body, "spool", tmp_path, memory=memory)  # room again
    assert fourth.file is not None and fourth.file.path is None
    for form in (second, third, fourth):
        form.close()
    assert memory.held == 0
    assert_no_temp_files(tmp_path)


async def test_the_upload_memory_takes_no_body_over_its_largest_nor_one_of_unknown_length(
        tmp_path: Path) -> None:
    ct, body = encode(SEED_FIELDS, {"file": JPEG})
    memory = UploadMemory(limit=20 * len(body), largest=len(body) - 1)
    over = await parse(ct, body, "spool", tmp_path, memory=memory)
    assert over.file is not None and over.file.path is not None
    memory.largest = len(body)
    chunked = await parse(ct, body, "stream", memory=memory, memory_limit=0, spool_dir=tmp_path)
    assert chunked.file is not None and chunked.file.path is not None
    assert memory.held == 0
    over.close()
    chunked.close()
    assert_no_temp_files(tmp_path)


@pytest.mark.parametrize("bad", ["cut-short", "no-close-delimiter", "too-long"])
async def test_a_refused_body_gives_its_upload_memory_back(bad: str, tmp_path: Path) -> None:
    ct, body = encode(SEED_FIELDS, {"file": JPEG})
    memory = UploadMemory()
    length = len(body)
    if bad == "cut-short":
        length += 5
    elif bad == "no-close-delimiter":
        body = body[: body.rindex(b"--")]
        length = len(body)
    stream = FakeStream(body + (b"x" * 9 if bad == "too-long" else b""), 1000)
    with pytest.raises(NoData):
        await read_form(ct, length, stream, memory_limit=0, spool_dir=str(tmp_path),
                        memory=memory)
    assert memory.held == 0
    assert_no_temp_files(tmp_path)


async def test_spooled_in_batches(tmp_path: Path) -> None:
    content = random.Random(3).randbytes(3 * 1024 * 1024 + 5)
    ct, body = encode(SEED_FIELDS, {"file": content})
    form = await read_form(ct, len(body), FakeStream(body, 65536), spool_dir=str(tmp_path))
    assert form.fields == SEED_FIELDS
    check_file(form, content, "file")
    assert form.file is not None and form.file.path is not None
    form.close()
    assert_no_temp_files(tmp_path)


async def test_hash_ignores_boundary_order_and_filename() -> None:
    bodies = [encode(SEED_FIELDS, {"file": JPEG}), encode({}, {"file": ("x.jpg", JPEG)}),
              encode({"type": "nsfw"}, {"file": ("other.png", JPEG, "image/png")}),
              ("multipart/form-data; boundary=q", build(
                  [("file", JPEG, "a", None), ("apikey", "k", None, None)], "q"))]
    hashes = set()
    for ct, body in bodies:
        for mode in ("whole", "stream"):
            form = await parse(ct, body, mode)
            assert form.file is not None
            hashes.add(form.file.content_hash)
    assert hashes == {xxhash.xxh3_128_hexdigest(JPEG)}


# --- the in-memory path and the streamed one read every body alike -------------------------

def around(file: bytes, after: Sequence[tuple[str, str]], epilogue: bytes = b"\r\n") -> bytes:
    return build([("apikey", "k", None, None), ("file", file, "f", None),
                  *((n, v, None, None) for n, v in after)], "bnd", epilogue=epilogue)


FALLBACK = [
    pytest.param(around(JPEG, [("type", "objects")], epilogue=b"\r\n" + b"e" * 20000),
                 id="long-epilogue"),
    pytest.param(around(JPEG, [("type", "objects")], epilogue=b"\r\n--bnd--\r\n--bnd\r\n"),
                 id="delimiters-in-epilogue"),
    pytest.param(around(JPEG[:50], [("type", "x" * 8192), ("max_labels", "5")]),
                 id="small-file-max-field"),
    pytest.param(around(b"\r\n--bn" + JPEG + b"--bnd\r\n--bn", [("type", "objects")]),
                 id="near-delimiters-in-file"),
    pytest.param(around(JPEG, [("type", "objects")]).replace(b'"type"\r\n', b'"type"\n'),
                 id="bare-lf-trailing-head"),
    pytest.param(around(JPEG, [(f"f{i}", "v") for i in range(60)]), id="many-trailing"),
]


@pytest.mark.parametrize("body", FALLBACK)
async def test_in_memory_path_agrees_with_stream(body: bytes) -> None:
    ct = "multipart/form-data; boundary=bnd"
    whole, streamed = await parse(ct, body, "whole"), await parse(ct, body, "stream")
    assert whole.fields == streamed.fields and whole.fields["apikey"] == "k"
    assert whole.file is not None and streamed.file is not None
    assert whole.file.read_all() == streamed.file.read_all()
    assert whole.file.content_hash == streamed.file.content_hash


# --- bodies the gateway once misread or refused (issue 10) ---------------------------------

IMAGE = make_png(1)  # 852 bytes: the outside tester's image
THUMBNAIL = b"\xff\xd8\xff\xe0" + random.Random(5).randbytes(20_000)
MB_CT = "multipart/form-data; boundary=bnd"


def after_file(*parts: tuple[str, bytes | str, str | None, str | None],
               epilogue: bytes = b"\r\n") -> bytes:
    return build([("apikey", "k", None, None), ("file", IMAGE, "cat.png", "image/png"), *parts],
                 "bnd", epilogue=epilogue)


FILE_THEN_MORE = [
    pytest.param(after_file(("note", "n" * 11_000, None, None)), {"apikey": "k"},
                 id="11KB-text-field-after"),
    pytest.param(after_file(("thumbnail", THUMBNAIL, "thumb.jpg", "image/jpeg"),
                            ("type", "objects", None, None)),
                 {"apikey": "k", "type": "objects"}, id="20KB-thumbnail-after"),
    pytest.param(after_file(("file", JPEG * 3, "second.jpg", "image/jpeg"),
                            ("type", "objects", None, None)),
                 {"apikey": "k", "type": "objects"}, id="second-file-after"),
    pytest.param(build([("apikey", "k", None, None),
                        ("file", IMAGE + b"\r\n--bnd--\r\n" + b"e" * 11_000, "cat.png",
                         "image/png"), ("type", "objects", None, None)], "bnd"),
                 {"apikey": "k"}, id="parts-after-the-close-are-epilogue"),
    pytest.param(after_file(("note", "n" * 9000, None, None), ("note", "small", None, None),
                            ("type", "objects", None, None)),
                 {"apikey": "k", "type": "objects"}, id="first-of-a-name-decides"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("body", "fields"), FILE_THEN_MORE)
async def test_the_file_is_exactly_its_own_bytes_whatever_follows(
        body: bytes, fields: dict[str, str], mode: str, tmp_path: Path) -> None:
    # The file part followed by a part larger than any window: 852 B in, 852 B out.
    form = await parse(MB_CT, body, mode, tmp_path)
    assert form.fields == fields
    check_file(form, IMAGE, "cat.png", "image/png")
    form.close()
    assert_no_temp_files(tmp_path)


FILENAME_2K = "f" * 2048 + ".png"
LONG_BEFORE = [
    pytest.param(build([("note", "x" * 9000, None, None), ("apikey", "k", None, None),
                        ("file", IMAGE, "cat.png", None)], "bnd"), "cat.png",
                 id="9KB-part-before-the-file"),
    pytest.param(build([("apikey", "k", None, None), ("file", IMAGE, FILENAME_2K, None)], "bnd"),
                 FILENAME_2K, id="2KB-filename"),
    pytest.param(build([("apikey", "k", None, None), ("file", IMAGE, "cat.png", None)], "bnd",
                       preamble=b"p" * 17_000 + b"\r\n--bn\r\n\r\n"), "cat.png",
                 id="17KB-preamble"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("body", "filename"), LONG_BEFORE)
async def test_long_parts_heads_and_preambles_before_the_file(
        body: bytes, filename: str, mode: str, tmp_path: Path) -> None:
    form = await parse(MB_CT, body, mode, tmp_path)
    assert form.fields == {"apikey": "k"}
    check_file(form, IMAGE, filename)
    form.close()


def with_header_block(size: int) -> bytes:
    """A body whose file part's header block (delimiter's end to blank line) is `size` bytes."""
    head = b'\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\nX-Pad: '
    pad = size - len(head) - 4
    return (b"--bnd\r\nContent-Disposition: form-data; name=apikey\r\n\r\nk\r\n--bnd"
            + head + b"p" * pad + b"\r\n\r\n" + IMAGE + b"\r\n--bnd--\r\n")


@pytest.mark.parametrize("mode", MODES)
async def test_part_headers_up_to_the_limit(mode: str, tmp_path: Path) -> None:
    form = await parse(MB_CT, with_header_block(MAX_PART_HEAD), mode, tmp_path)
    check_file(form, IMAGE, "a.png")
    with pytest.raises(NoData, match="part headers over 8 KiB"):
        await parse(MB_CT, with_header_block(MAX_PART_HEAD + 1), mode, tmp_path)


REFUSED = [
    pytest.param(MB_CT, build([("type", "objects", None, None), ("apikey", "k" * 8193, None, None),
                               ("file", IMAGE, None, None)], "bnd"),
                 "field apikey over 8192 bytes", id="used-field-over-the-limit"),
    pytest.param(MB_CT, with_header_block(MAX_PART_HEAD + 100), "part headers over 8 KiB",
                 id="head-over-the-limit"),
    pytest.param(MB_CT, after_file(*((f"f{i}", "v", None, None) for i in range(64))),
                 "over 64 parts", id="too-many-parts"),
    pytest.param(MB_CT, after_file()[:-9], "no close delimiter", id="cut-short"),
    pytest.param("multipart/form-data; boundary=other", after_file(), "no boundary delimiter",
                 id="wrong-boundary"),
    pytest.param(MB_CT, after_file().replace(b"--bnd\r\n", b"--bndx\r\n", 1),
                 "text after a boundary delimiter", id="text-after-boundary"),
    pytest.param(MB_CT, after_file(("file", JPEG, "b", None)).replace(
        b"\r\n--bnd\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b\"",
        b"\r\n--bnd\r\nContent-Disposition: form-data\r\n"), "without a Content-Disposition name",
                 id="second-file-without-name"),
    pytest.param("multipart/form-data; boundary=", after_file(), "no usable boundary",
                 id="empty-boundary"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("content_type", "body", "why"), REFUSED)
async def test_refusals_say_why(content_type: str, body: bytes, why: str, mode: str,
                                tmp_path: Path) -> None:
    with pytest.raises(NoData) as refused:
        await parse(content_type, body, mode, tmp_path)
    assert refused.value.status == 300
    assert str(refused.value).startswith("Invalid multipart body: ") and why in str(refused.value)
    assert_no_temp_files(tmp_path)


MEMORY_LIMIT = 1024 * 1024
THRESHOLDS = [0, 1, 15, 16, 17, 65535, 65536, 65537, MEMORY_LIMIT - 1, MEMORY_LIMIT,
              MEMORY_LIMIT + 1, 3 * MEMORY_LIMIT + 7]


@pytest.mark.parametrize("size", THRESHOLDS)
async def test_whole_file_hash_across_every_size_threshold(size: int, tmp_path: Path) -> None:
    content = random.Random(size).randbytes(size)
    ct, body = encode(SEED_FIELDS, {"file": ("x.png", content, "image/png")})
    ways: list[dict[str, Any]] = [
        {"mode": "stream", "cuts": 65536}, {"mode": "spool", "cuts": 65536},
        {"mode": "whole", "memory_limit": len(body)},  # read whole: exactly at the limit
        {"mode": "whole", "memory_limit": len(body) - 1},  # one byte over: streamed
        {"mode": "whole"},  # the default memory_limit (MEMORY_LIMIT)
    ]
    if size < 100_000:
        ways.append({"mode": "stream", "cuts": 7})
    for way in ways:
        form = await parse(ct, body, spool_dir=tmp_path, **way)
        assert form.fields == SEED_FIELDS, way
        check_file(form, content, "x.png", "image/png")
        form.close()
    assert_no_temp_files(tmp_path)

# --- malformed bodies --------------------------------------------------------------------

OK_BODY = build([("apikey", "k", None, None), ("file", JPEG, "a.jpg", None)], "b")
CT = "multipart/form-data; boundary=b"
MALFORMED = [
    pytest.param(None, OK_BODY, id="no-content-type"),
    pytest.param("text/plain", OK_BODY, id="unsupported-type"),
    pytest.param("multipart/form-data", OK_BODY, id="no-boundary"),
    pytest.param('multipart/form-data; boundary=""', OK_BODY, id="empty-boundary"),
    pytest.param("multipart/form-data; boundary=" + "b" * 201, OK_BODY, id="long-boundary"),
    pytest.param("multipart/form-data; boundary=other", OK_BODY, id="wrong-boundary"),
    pytest.param(CT, b"", id="empty-body"),
    pytest.param(CT, b"--b--", id="only-close"),
    pytest.param(CT, OK_BODY[:-9], id="truncated"),
    pytest.param(CT, OK_BODY.replace(b"--b--", b"--b\r\n"), id="no-close-delimiter"),
    pytest.param(CT, OK_BODY.replace(b"Content-Disposition", b"X-Disposition"),
                 id="no-disposition"),
    pytest.param(CT, OK_BODY.replace(b'name="apikey"', b'nam="apikey"'), id="no-name"),
    pytest.param(CT, OK_BODY.replace(b"--b\r\nContent", b"--b\r\nbroken\r\nContent", 1),
                 id="header-without-colon"),
    pytest.param(CT, OK_BODY.replace(b"--b\r\n", b"--bx\r\n", 1), id="text-after-boundary"),
    pytest.param(CT, OK_BODY.replace(b"--b\r\n", b"--b\r\n\r\n", 1), id="no-headers"),
    pytest.param(CT, OK_BODY.replace(b"--b\r\n", b"--b\r\nX: " + b"y" * MAX_PART_HEAD + b"\r\n"),
                 id="head-too-long"),
    pytest.param(CT, build([("apikey", "x" * 8193, None, None), ("file", JPEG, None, None)], "b"),
                 id="used-field-too-long"),
    pytest.param(CT, build([(f"f{i}", "v", None, None) for i in range(65)], "b"),
                 id="too-many-fields"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("content_type", "body"), MALFORMED)
async def test_malformed(content_type: str | None, body: bytes, mode: str,
                         tmp_path: Path) -> None:
    with pytest.raises(NoData):
        await parse(content_type, body, mode, tmp_path)
    assert_no_temp_files(tmp_path)


@pytest.mark.parametrize("declared", [len(OK_BODY) - 1, len(OK_BODY) + 1])
async def test_content_length_mismatch(declared: int) -> None:
    with pytest.raises(NoData):
        await read_form(CT, declared, FakeStream(OK_BODY))


async def test_transport_error_is_no_data() -> None:
    class Broken:
        async def readany(self) -> bytes:
            raise ConnectionResetError

    for length in (len(OK_BODY), None):
        with pytest.raises(NoData):
            await read_form(CT, length, Broken())


# --- 413 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
async def test_file_too_large(mode: str, tmp_path: Path) -> None:
    ct, body = encode(SEED_FIELDS, {"file": JPEG})
    with pytest.raises(FileTooLarge):
        await parse(ct, body, mode, tmp_path, max_file_bytes=len(JPEG) - 1)
    form = await parse(ct, body, mode, tmp_path, max_file_bytes=len(JPEG))
    check_file(form, JPEG, "file")
    form.close()
    assert_no_temp_files(tmp_path)


@pytest.mark.parametrize("length_known", [True, False])
async def test_file_too_large_stops_reading(length_known: bool, tmp_path: Path) -> None:
    limit = 1024 * 1024
    # Known length: within limit + 64 KiB, so it must be counted. Chunked: 4 MiB on the wire.
    size = limit + 60_000 if length_known else 4 * limit
    ct, body = encode(SEED_FIELDS, {"file": random.Random(2).randbytes(size)})
    stream = FakeStream(body, 8192)
    with pytest.raises(FileTooLarge):
        await read_form(ct, len(body) if length_known else None, stream, max_file_bytes=limit,
                        memory_limit=64 * 1024, spool_dir=str(tmp_path))
    assert stream.consumed <= limit + 2 * 8192 < len(body)
    assert_no_temp_files(tmp_path)


async def test_file_too_large_by_content_length() -> None:
    stream = FakeStream(b"x" * 100)
    with pytest.raises(FileTooLarge):
        await read_form(CT, 50 * 1024 * 1024 + LENGTH_SLACK + 1, stream)
    assert stream.consumed == 0


# --- urlencoded and query strings ----------------------------------------------------------

@pytest.mark.parametrize("cuts", [65536, 1, 2, 3, 5])
async def test_urlencoded(cuts: int, tmp_path: Path) -> None:
    prepared = requests.Request("POST", "http://x/", data={**SEED_FIELDS, "file": JPEG}).prepare()
    assert isinstance(prepared.body, str)
    body = (prepared.body + "&type=again&note=a+b%20c&flag&&").encode()
    ct = prepared.headers["Content-Type"]
    for memory_limit in (1 << 20, 0):
        form = await read_form(ct, len(body), FakeStream(body, cuts), memory_limit=memory_limit,
                               spool_dir=str(tmp_path))
        assert form.fields == {**SEED_FIELDS, "note": "a b c", "flag": ""}
        check_file(form, JPEG)
        form.close()
    assert_no_temp_files(tmp_path)


URLENCODED_BAD = [
    pytest.param(b"", id="empty"),
    pytest.param(b"apikey=k&type=%zz", id="bad-escape"),
    pytest.param(b"apikey=k&file=%4", id="truncated-escape"),
    pytest.param(b"a=" + b"x" * 8193, id="field-too-long"),
    pytest.param(b"a=" + b"x" * 26000, id="pending-pair-too-long"),
    pytest.param(b"&".join(b"f%d=1" % i for i in range(65)), id="too-many-fields"),
]


@pytest.mark.parametrize("body", URLENCODED_BAD)
@pytest.mark.parametrize("cuts", [65536, 1])
async def test_urlencoded_malformed(body: bytes, cuts: int) -> None:
    with pytest.raises(NoData):
        await read_form("application/x-www-form-urlencoded", len(body) or None,
                        FakeStream(body, cuts))


async def test_urlencoded_file_too_large() -> None:
    body = b"apikey=k&file=" + b"%FF" * 2000
    stream = FakeStream(body, 600)
    with pytest.raises(FileTooLarge):
        await read_form("application/x-www-form-urlencoded", None, stream, max_file_bytes=1000)
    assert stream.consumed < len(body)


def test_parse_query() -> None:
    assert parse_query("apikey=k%2B1&type=cache&hash=AB&type=x&empty=&bad=%zz+y") == {
        "apikey": "k+1", "type": "cache", "hash": "AB", "empty": "", "bad": "%zz y"}
    assert parse_query("") == {}


@given(st.text())
def test_parse_query_never_raises(qs: str) -> None:
    parse_query(qs)


# --- properties: against aiohttp's reader, and fuzz --------------------------------------

BCHARS = string.ascii_letters + string.digits + "'()+_,-./:=?"
NAMES = st.text("abcdeil_", min_size=1, max_size=6)  # never "file": see the file parts


@dataclass(frozen=True)
class Case:
    content_type: str
    body: bytes

    def __repr__(self) -> str:  # bodies run to 70 kB: show their ends
        return f"Case({self.content_type!r}, {self.body[:300]!r}...{self.body[-100:]!r})"


@st.composite
def multipart_bodies(draw: st.DrawFn) -> Case:
    boundary = draw(st.text(BCHARS, min_size=1, max_size=70))
    quoted = draw(st.booleans()) or not boundary.isalnum()
    parts: list[tuple[str, bytes | str, str | None, str | None]] = [
        (name, value, None, None)
        for name, value in draw(st.lists(st.tuples(NAMES, st.text(max_size=30)), max_size=6))]
    first = 0
    for k in range(draw(st.sampled_from([0, 1, 1, 1, 2]))):
        # A second "file" part is ignored, but bounded like a text field.
        sizes = st.sampled_from([0, 1, 16, 17, 700, 9000, 20000, 70000]) if k == 0 else st.nothing()
        size = draw(sizes | st.integers(0, 3000))
        content = bytearray(random.Random(draw(st.integers())).randbytes(size))
        near = [b"\r\n--" + boundary.encode()[:-1], b"\r\n-", b"\r\n\r\n", b"\r",
                b"--" + boundary.encode(), b"\n--" + boundary.encode()]
        for tricky in draw(st.lists(st.sampled_from(near), max_size=4)):
            at = draw(st.integers(0, len(content)))
            content[at:at] = tricky
        filename = draw(st.none() | st.text(string.ascii_letters + "._- ", max_size=12))
        ctype = draw(st.sampled_from([None, "image/png", "application/octet-stream"]))
        at = draw(st.integers(first, len(parts)))
        parts.insert(at, ("file", bytes(content), filename, ctype))
        first = at + 1
    assume(parts)  # a multipart body has at least one part
    body = build(parts, boundary,
                 preamble=draw(st.sampled_from([b"", b"\r\n", b"preamble\r\n"])),
                 epilogue=draw(st.sampled_from([b"", b"\r\n", b"\r\nepilogue\r\n"])))
    delim = b"\r\n--" + boundary.encode()
    for _, content, _, _ in parts:
        data = content.encode() if isinstance(content, str) else content
        assume(delim not in data and not data.startswith(delim[2:]))
    param = f'"{boundary}"' if quoted else boundary
    return Case(f"multipart/form-data; boundary={param}", body)


async def reference(content_type: str, body: bytes) -> tuple[dict[str, str], bytes | None]:
    stream = StreamReader(mock.Mock(), 2**16, loop=asyncio.get_running_loop())
    stream.feed_data(body)
    stream.feed_eof()
    reader = MultipartReader({"Content-Type": content_type}, stream)
    fields: dict[str, str] = {}
    file = None
    while (part := await reader.next()) is not None:
        assert isinstance(part, BodyPartReader) and part.name is not None
        data = await part.read()
        if part.name == "file" and file is None:
            file = data
        elif part.name != "file":
            fields.setdefault(part.name, data.decode("utf-8", "replace"))
    return fields, file


PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@PROPERTY
@given(case=multipart_bodies(), mode=st.sampled_from(MODES),
       cuts=st.lists(st.floats(0, 1), max_size=8))
def test_matches_aiohttp(case: Case, mode: str, cuts: list[float], tmp_path: Path) -> None:
    content_type, body = case.content_type, case.body

    async def check() -> None:
        fields, file = await reference(content_type, body)
        form = await parse(content_type, body, mode, tmp_path,
                           cuts=[int(c * len(body)) for c in cuts] or None)
        assert form.fields == fields
        if file is None:
            assert form.file is None
        else:
            assert form.file is not None and form.file.read_all() == file
            assert form.file.content_hash == xxhash.xxh3_128_hexdigest(file)
            assert form.file.size == len(file) and form.file.head == file[:16]
        form.close()

    asyncio.run(check())
    assert_no_temp_files(tmp_path)


def mutate(body: bytes, rnd: random.Random) -> bytes:
    data = bytearray(body)
    for _ in range(rnd.randint(1, 4)):
        at = rnd.randint(0, len(data))
        what = rnd.randrange(5)
        if what == 0:
            del data[at:]
        elif what == 1 and at < len(data):
            data[at] = rnd.randrange(256)
        elif what == 2:
            data[at:at] = rnd.choice([b"\r\n", b"--", b"\r\n\r\n", b'"', b";", b"%", b"\n",
                                      rnd.randbytes(rnd.randint(1, 8))])
        elif what == 3:
            del data[at : at + rnd.randint(1, 40)]
        else:
            data[at:at] = bytes(data[rnd.randint(0, len(data)) :][:200])
    return bytes(data)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=multipart_bodies(), seed=st.integers(), shift=st.sampled_from([None, 0, 1]),
       other_type=st.sampled_from(["", "application/x-www-form-urlencoded"]))
def test_fuzz_only_gateway_errors(case: Case, seed: int, shift: int | None, other_type: str,
                                  tmp_path: Path) -> None:
    content_type, body = case.content_type, case.body
    rnd = random.Random(seed)
    body = mutate(body, rnd)
    if other_type:
        content_type = other_type
    elif rnd.random() < 0.2:
        content_type = mutate(content_type.encode(), rnd).decode("utf-8", "replace")
    length = None if shift is None else len(body) + shift * rnd.choice([0, 0, 1, -1])

    async def attempt(memory_limit: int, cuts: int) -> Form | Exception:
        try:
            return await read_form(content_type, length, FakeStream(body, cuts),
                                   max_file_bytes=50_000, max_field_bytes=64, max_fields=6,
                                   memory_limit=memory_limit, spool_dir=str(tmp_path))
        except (NoData, FileTooLarge) as exc:
            return exc

    def read(form: Form) -> tuple[dict[str, str], bytes | None, str | None]:
        file = form.file
        return form.fields, file and file.read_all(), file and file.content_hash

    async def check() -> None:
        whole, streamed = await attempt(1 << 20, 65536), await attempt(0, rnd.randint(1, 99))
        try:
            # One parser, fed whole or in pieces: it reads every body alike.
            assert isinstance(whole, Form) == isinstance(streamed, Form), (whole, streamed)
            if isinstance(whole, Form) and isinstance(streamed, Form):
                assert read(whole) == read(streamed)
        finally:
            for result in (whole, streamed):
                if isinstance(result, Form):
                    result.close()

    asyncio.run(check())
    assert_no_temp_files(tmp_path)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.text(max_size=60), st.sampled_from([None, 0, 300]))
def test_garbage_only_gateway_errors(body: bytes, content_type: str, length: int | None) -> None:
    async def check() -> None:
        for ct in (content_type, "multipart/form-data; boundary=" + content_type[:5],
                   "application/x-www-form-urlencoded"):
            try:
                (await read_form(ct, length if length != 300 else len(body),
                                 FakeStream(body, 7), memory_limit=length or 0)).close()
            except (NoData, FileTooLarge):
                pass

    asyncio.run(check())


@pytest.fixture(autouse=True)
def _fresh_head_memo() -> None:
    """Part headers are memoised process-wide; a mutation run forks every mutant's tests from
    a process whose memo is already full, so the header parser would never run (docs/testing.md)."""
    form_module._parse_small_block.cache_clear()


# --- what a refused upload tells the team (the 300 envelope's status_message) ---------------

class CutStream(FakeStream):
    """The body's first chunks, then the transport fails (e.g. broken chunked encoding)."""

    async def readany(self) -> bytes:
        if not self.chunks:
            raise ConnectionResetError("peer gone")
        return await super().readany()


ONE_FILE = build([("type", "objects", None, None), ("file", JPEG, "a.jpg", "image/jpeg")], "b")
URLENCODED = "application/x-www-form-urlencoded"
REFUSALS = [
    pytest.param(CT, ONE_FILE[:-40], len(ONE_FILE), {},
                 "Invalid request: body shorter than its Content-Length", id="shorter"),
    pytest.param(CT, ONE_FILE + b"extra", len(ONE_FILE), {},
                 "Invalid request: body longer than its Content-Length", id="longer"),
    pytest.param(URLENCODED, b"apikey=k&type=%zz", None, {},
                 "Invalid request: a % not followed by two hex digits", id="bad-escape"),
    pytest.param(URLENCODED, b"apikey=k&file=ab%4", None, {},
                 "Invalid request: a % not followed by two hex digits", id="file-bad-escape"),
    pytest.param(URLENCODED, b"a=" + b"x" * 101, None, {"max_field_bytes": 100},
                 "Invalid request: a field over 100 bytes", id="field-too-long"),
    pytest.param(URLENCODED, b"&".join(b"f%d=1" % i for i in range(4)), None, {"max_fields": 3},
                 "Invalid request: over 3 fields", id="too-many-fields"),
    pytest.param(CT, ONE_FILE[:-5], None, {}, "Invalid multipart body: no close delimiter "
                 "(cut short?)", id="no-close"),
    pytest.param(CT, b"no delimiter at all", None, {},
                 "Invalid multipart body: no boundary delimiter", id="no-delimiter"),
    pytest.param(CT, build([("type", "x" * 101, None, None)], "b"), None,
                 {"max_field_bytes": 100}, "Invalid multipart body: field type over 100 bytes",
                 id="used-field-too-long"),
    pytest.param(CT, build([(f"f{i}", "1", None, None) for i in range(4)], "b"), None,
                 {"max_fields": 3}, "Invalid multipart body: over 3 parts besides the file",
                 id="too-many-parts"),
]


@pytest.mark.parametrize(("content_type", "body", "length", "limits", "message"), REFUSALS)
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
async def test_a_refused_upload_says_why(
        content_type: str, body: bytes, length: int | None, limits: dict[str, int],
        message: str, streamed: bool) -> None:
    """Read whole (known length under memory_limit) or streamed in small chunks, the refusal
    is the same NoData and names the same reason."""
    with pytest.raises(NoData) as caught:
        (await read_form(content_type, length, FakeStream(body, 7 if streamed else 1 << 20),
                         memory_limit=0 if streamed else 1 << 20, **limits)).close()
    assert caught.value.status == 300 and caught.value.message == message


@pytest.mark.parametrize("length", [None, len(ONE_FILE)], ids=["chunked", "with-length"])
async def test_a_transport_failure_mid_body_is_a_cut_short_body(length: int | None) -> None:
    for memory_limit in (0, 1 << 20):
        with pytest.raises(NoData) as caught:
            await read_form(CT, length, CutStream(ONE_FILE[:1000], 100),
                            memory_limit=memory_limit)
        assert caught.value.message == "Invalid request: body cut short"


@pytest.mark.parametrize("memory_limit", [0, 1 << 20], ids=["streamed", "whole"])
async def test_bytes_past_the_content_length_are_refused_even_in_a_later_chunk(
        memory_limit: int) -> None:
    stream = FakeStream(ONE_FILE + b"smuggled", [len(ONE_FILE)])  # exactly the length, then more
    with pytest.raises(NoData) as caught:
        await read_form(CT, len(ONE_FILE), stream, memory_limit=memory_limit)
    assert caught.value.message == "Invalid request: body longer than its Content-Length"


async def test_a_percent_encoded_file_of_nearly_the_maximum_size_is_read(tmp_path: Path) -> None:
    """An urlencoded file takes up to three bytes a byte: its body may be three times
    max_file_bytes (and the slack) before its Content-Length is refused."""
    content = b"\xff" * 900_000
    body = b"type=objects&file=" + b"%FF" * len(content)
    form = await read_form(URLENCODED, len(body), FakeStream(body), max_file_bytes=1_000_000,
                           spool_dir=str(tmp_path))
    check_file(form, content)
    form.close()
    assert_no_temp_files(tmp_path)


@pytest.mark.parametrize("cuts", [700, 1000])
async def test_a_file_that_crosses_memory_limit_in_a_later_chunk_is_spooled_whole(
        cuts: int, tmp_path: Path) -> None:
    """The first chunk's bytes are held as they came (a view), the next ones pass
    memory_limit: all of them go to the temp file, in order."""
    ct, body = browser_body(BROWSER_ORDER)
    form = await read_form(ct, None, FakeStream(body, cuts), memory_limit=1500,
                           spool_dir=str(tmp_path))
    assert form.file is not None and form.file.path is not None
    check_file(form, PNG, "cat.png", "image/png")
    form.close()
    assert_no_temp_files(tmp_path)


@pytest.mark.parametrize("extra", [0, 1], ids=["at-the-limit", "one-past"])
async def test_a_pending_pair_is_bounded_by_an_encoded_field_and_one_kib(extra: int) -> None:
    """Streamed, a pair not yet ended may hold what a max_field_bytes value takes encoded
    (three bytes a byte) plus 1 KiB for its name; one byte more is refused."""
    limit = 3 * 100 + 1024
    pair = b"n" * (limit - 301 + extra) + b"=" + b"%41" * 100  # a 100-byte value
    assert len(pair) == limit + extra
    body = pair + b"&type=objects&file=abc"
    read = read_form(URLENCODED, None, FakeStream(body, 1), max_field_bytes=100)
    if extra:
        with pytest.raises(NoData) as caught:
            await read
        assert caught.value.message == "Invalid request: a field over 100 bytes"
        return
    form = await read
    assert form.fields == {"n" * (limit - 301): "A" * 100, "type": "objects"}
    check_file(form, b"abc")
    form.close()
