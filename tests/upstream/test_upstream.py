"""gateway.upstream against a hostile upstream on 127.0.0.1: what every failure costs (the
``billed`` contract), what leaves the gateway (the key, the multipart body) and what comes back
to a team (bounded, scrubbed, the API's envelope or a 502, never a 500)."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from gateway import upstream as upstream_module
from gateway.config import Secret, UpstreamConfig
from gateway.core.errors import BadGateway, GatewayError, GatewayTimeout, QuotaReached, Unavailable
from gateway.devtools.sample_images import make_png
from gateway.obs.metrics import Metrics
from gateway.upload import UploadedFile
from gateway.upstream import MAX_DEPTH, MAX_MESSAGE, UpstreamClient, UpstreamError
from gateway.upstream.breaker import CLOSED, HALF_OPEN, OPEN
from tests.support import free_port

KEY = "UPSTREAM-SECRET-k3y+0f/the=acc0unt"
PNG = make_png(1)
SUCCESS = {"error": 0, "type": "objects", "objects": [{"name": "Car", "confidence": 99.5}],
           "quota": 2999}
Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    path: str
    fields: dict[str, str]
    files: list[tuple[str | None, str, bytes]]  # filename, content type, content
    content_length: str | None
    accept_encoding: str | None


@dataclass
class Hostile:
    """An upstream that answers whatever ``answer`` says, and records what it received."""

    url: str
    answer: Answer
    seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)  # ends hanging answers
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # a request was received


def envelope(status: int, data: Any = None, *, http: int | None = None, **extra: Any) -> Answer:
    body = json.dumps({"status": status, **extra, "data": data}).encode()
    return raw(body, http if http is not None else status)


def raw(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body, headers=headers,
                            content_type="text/plain")
    return answer


@pytest.fixture
async def hostile() -> AsyncIterator[Hostile]:
    server = Hostile("", envelope(200, SUCCESS))

    async def handle(request: web.Request) -> web.StreamResponse:
        fields: dict[str, str] = {}
        files: list[tuple[str | None, str, bytes]] = []
        if request.content_type == "multipart/form-data":
            async for part in await request.multipart():
                content = await part.read()  # type: ignore[union-attr]
                if part.filename is not None or part.name == "file":  # type: ignore[union-attr]
                    files.append((part.filename,  # type: ignore[union-attr]
                                  part.headers.get("Content-Type", ""), bytes(content)))
                else:
                    fields[part.name or ""] = content.decode()  # type: ignore[union-attr]
        else:
            await request.read()
        server.seen.append(Seen(request.path, fields, files, request.headers.get("Content-Length"),
                                request.headers.get("Accept-Encoding")))
        server.arrived.set()
        return await server.answer(request)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}/api/v2/"
    yield server
    server.release.set()
    await runner.cleanup()


ClientFactory = Callable[..., Awaitable[UpstreamClient]]


@pytest.fixture
async def make_client(hostile: Hostile) -> AsyncIterator[ClientFactory]:
    clients: list[UpstreamClient] = []

    async def make(**overrides: Any) -> UpstreamClient:
        values: dict[str, Any] = {"url": hostile.url, "timeout_s": 5.0, "retries": 2,
                                  "breaker_failures": 100, "api_key": Secret(KEY)}
        values.update(overrides)
        client = UpstreamClient(UpstreamConfig(**values), Metrics(CollectorRegistry()))
        await client.start()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def in_memory(data: bytes = PNG, filename: str | None = "a.png",
              content_type: str | None = "image/png") -> UploadedFile:
    return UploadedFile("0" * 32, len(data), data[:16], filename, content_type, data=data)


def spooled(tmp_path: Path, data: bytes = PNG, filename: str | None = "a.png",
            content_type: str | None = "image/png") -> UploadedFile:
    path = tmp_path / "spooled-upload"
    path.write_bytes(data)
    return UploadedFile("0" * 32, len(data), data[:16], filename, content_type, path=str(path))


async def failure(client: UpstreamClient, file: UploadedFile | None = None,
                  **kwargs: Any) -> BaseException:
    with pytest.raises(BaseException) as caught:
        await client.recognize("objects", {"max_labels": 10, "min_confidence": 80},
                               file or in_memory(), **kwargs)
    return caught.value


def upstream_labels(client: UpstreamClient) -> dict[str, float]:
    return {s.labels["status"]: s.value for m in client.metrics.registry.collect()
            for s in m.samples if s.name == "gateway_upstream_requests_total" and s.value}


# -- the billing contract -------------------------------------------------------------------
async def test_the_answer_is_read_as_sent_never_inflated(
        hostile: Hostile, make_client: ClientFactory) -> None:
    client = await make_client()
    result = await client.recognize("objects", {"max_labels": 10}, in_memory())
    assert result.data == SUCCESS and result.account_quota == 2999
    assert hostile.seen[0].fields == {"apikey": KEY, "type": "objects", "max_labels": "10"}
    assert hostile.seen[0].files == [("a.png", "image/png", PNG)]
    assert hostile.seen[0].accept_encoding == "identity"
    # A compressed answer anyway (a 1 KB gzip can inflate to a GB) is not the envelope.
    body = gzip.compress(json.dumps({"status": 200, "data": SUCCESS}).encode())
    hostile.answer = raw(body, 200, {"Content-Encoding": "gzip"})
    exc = await failure(client)
    assert isinstance(exc, BadGateway) and exc.billed is True  # type: ignore[attr-defined]


async def test_a_connection_that_never_opens_is_retried_then_unbilled(
        make_client: ClientFactory) -> None:
    client = await make_client(url=f"http://127.0.0.1:{free_port()}/api/v2/")
    exc = await failure(client)
    assert isinstance(exc, BadGateway) and exc.billed is False  # type: ignore[attr-defined]
    assert upstream_labels(client) == {"error": 3}


NOT_BILLED = [
    pytest.param(raw(b"<h1>Service Unavailable</h1>", 503), BadGateway, 3, id="503-page"),
    pytest.param(raw(b"Too Many Requests", 429), BadGateway, 1, id="429-page"),
    pytest.param(envelope(300, status_message="Invalid request, no data received"),
                 BadGateway, 1, id="300"),
    pytest.param(envelope(400, status_message="APIkey missing"), BadGateway, 1, id="400"),
    pytest.param(envelope(401, status_message="APIkey invalid"), BadGateway, 1, id="401"),
    pytest.param(envelope(402, status_message="Quota limit reached"), QuotaReached, 1, id="402"),
    pytest.param(envelope(412, status_message="Invalid file"), UpstreamError, 1, id="412"),
    pytest.param(envelope(413, status_message="Image size too large"), UpstreamError, 1,
                 id="413"),
    pytest.param(envelope(415, status_message="Invalid file format"), UpstreamError, 1, id="415"),
    pytest.param(envelope(420, status_message="Invalid type"), UpstreamError, 1, id="420"),
    pytest.param(envelope(430, status_message="Invalid parameter max_labels"), UpstreamError, 1,
                 id="430"),
    pytest.param(envelope(412, http=200, status_message="Invalid file"), UpstreamError, 1,
                 id="412-over-http-200"),
]


@pytest.mark.parametrize(("answer", "kind", "attempts"), NOT_BILLED)
async def test_refusals_and_error_envelopes_are_unbilled(
        hostile: Hostile, make_client: ClientFactory, answer: Answer, kind: type[GatewayError],
        attempts: int) -> None:
    hostile.answer = answer
    exc = await failure(await make_client())
    assert type(exc) is kind and exc.billed is False  # type: ignore[attr-defined]
    assert len(hostile.seen) == attempts  # only a 503 page is retried


def never_answers(hostile: Hostile) -> Answer:
    async def answer(request: web.Request) -> web.StreamResponse:
        await hostile.release.wait()
        return web.Response()
    return answer


async def drops_the_connection(request: web.Request) -> web.StreamResponse:
    assert request.transport is not None
    request.transport.abort()
    return web.Response()


async def endless(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()  # chunked, no Content-Length
    await response.prepare(request)
    for _ in range(1000):  # 1000 MB, unless the client hangs up
        await response.write(bytes(1024 * 1024))
    return response


DEEP = b'{"status":200,"data":{"objects":' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
BILLED = [
    pytest.param(drops_the_connection, BadGateway, id="dropped-after-sending"),
    pytest.param(raw(b"<html>not json</html>"), BadGateway, id="garbage-over-200"),
    pytest.param(raw(b"Internal Server Error", 500), BadGateway, id="500-page"),
    pytest.param(raw(b"Bad Gateway", 502), BadGateway, id="502-page"),
    pytest.param(raw(b"x" * (2 * 1024 * 1024)), BadGateway, id="oversize-with-length"),
    pytest.param(endless, BadGateway, id="oversize-endless-chunked"),
    pytest.param(raw(DEEP), BadGateway, id="deeply-nested"),
    pytest.param(raw(b'{"status":200,"data":{"quota":NaN}}'), BadGateway, id="NaN"),
    pytest.param(raw(b'{"status":200,"data":{"quota":-Infinity}}'), BadGateway, id="Infinity"),
    pytest.param(raw(b'{"status":200,"data":{"confidence":1e999}}'), BadGateway,
                 id="overflows-to-infinity"),
    pytest.param(raw(b'{"status":200,"data":{"confidence":' + b"9" * 400 + b".5}}"),
                 BadGateway, id="400-digit-float"),
    pytest.param(raw(b'{"status":200,"data":{"name":"\\ud800"}}'), BadGateway,
                 id="lone-surrogate"),
    pytest.param(raw(b'{"status":200,"data":{"\\udfff":1}}'), BadGateway,
                 id="lone-surrogate-in-a-key"),
    pytest.param(raw(b'{"status":200,"data":{"name":"\xff\xfe"}}'), BadGateway,
                 id="invalid-utf8"),
    pytest.param(raw('{"status":200,"data":{}}'.encode("utf-16")), BadGateway, id="utf-16"),
    pytest.param(envelope(200, [1, 2]), BadGateway, id="data-a-list"),
    pytest.param(envelope(200, None), BadGateway, id="data-null"),
    pytest.param(envelope(200, "ok"), BadGateway, id="data-a-string"),
    pytest.param(envelope(200, SUCCESS, http=500), BadGateway, id="success-over-http-500"),
    pytest.param(envelope(200, SUCCESS, http=503), BadGateway, id="success-over-http-503"),
    pytest.param(envelope(200, SUCCESS, http=404), BadGateway, id="success-over-http-404"),
]


@pytest.mark.parametrize(("answer", "kind"), BILLED)
async def test_answers_that_are_not_the_envelope_are_502_and_billed(
        hostile: Hostile, make_client: ClientFactory, answer: Answer,
        kind: type[GatewayError]) -> None:
    hostile.answer = answer
    client = await make_client(max_answer_kb=1024)
    exc = await failure(client)
    assert type(exc) is kind and exc.status == 502  # type: ignore[attr-defined]
    assert exc.billed is True  # type: ignore[attr-defined]
    assert len(hostile.seen) == 1  # sent, maybe billed: never retried
    assert client.breaker.failures == 1


async def test_an_endless_answer_is_not_read_past_the_cap(
        hostile: Hostile, make_client: ClientFactory) -> None:
    written = 0

    async def answer(request: web.Request) -> web.StreamResponse:
        nonlocal written
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(1000):  # 1000 MB, unless the client hangs up
            await response.write(bytes(1024 * 1024))
            written += 1
        return response

    hostile.answer = answer
    exc = await failure(await make_client(max_answer_kb=1024))
    assert isinstance(exc, BadGateway) and exc.billed is True  # type: ignore[attr-defined]
    # Written blocks as far as flow control let the server go ahead: the cap plus buffers.
    assert written < 32, written


async def test_a_timeout_after_sending_is_504_and_billed(
        hostile: Hostile, make_client: ClientFactory) -> None:
    hostile.answer = never_answers(hostile)
    exc = await failure(await make_client(timeout_s=0.3))
    assert isinstance(exc, GatewayTimeout) and exc.billed is True  # type: ignore[attr-defined]
    assert len(hostile.seen) == 1


UNDEFINED = [0, 1, 100, 199, 201, 202, 204, 299, 301, 302, 304, 399, 403, 404, 405, 408, 409,
             410, 411, 414, 416, 418, 421, 422, 429, 431, 451, 499, 500, 501, 502, 503, 504,
             599, 600, 999, 1000, 2000, -1, -200, 10**30]


@pytest.mark.parametrize("http", [200, 500, 502, 503])
async def test_undefined_envelope_statuses_are_502_never_a_success(
        hostile: Hostile, make_client: ClientFactory, http: int) -> None:
    client = await make_client()
    for status in UNDEFINED:
        hostile.answer = envelope(status, SUCCESS, http=http, message="Success")
        exc = await failure(client)
        assert isinstance(exc, BadGateway), status
        assert exc.billed is False, status  # type: ignore[attr-defined]  # an error envelope
        assert exc.status == 502
    assert len(hostile.seen) == len(UNDEFINED)  # an envelope is an answer: never retried
    assert upstream_labels(client) == {"error": len(UNDEFINED)}  # labels stay bounded


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_never_followed_and_the_key_stays_home(
        hostile: Hostile, make_client: ClientFactory, status: int) -> None:
    target = hostile.url.replace("/api/v2/", "/elsewhere/")
    hostile.answer = raw(json.dumps({"status": 200, "data": SUCCESS}).encode(), status,
                         {"Location": target})
    exc = await failure(await make_client())
    assert isinstance(exc, BadGateway) and exc.billed is False  # type: ignore[attr-defined]
    assert [seen.path for seen in hostile.seen] == ["/api/v2/"]


async def test_on_send_runs_once_right_before_sending(
        hostile: Hostile, make_client: ClientFactory) -> None:
    calls: list[int] = []

    async def on_send() -> None:
        calls.append(len(hostile.seen))

    hostile.answer = raw(b"busy", 503)  # retried twice: on_send still runs once
    client = await make_client()
    await failure(client, on_send=on_send)
    assert calls == [0] and len(hostile.seen) == 3


async def test_on_send_raising_sends_nothing_and_is_unbilled(
        hostile: Hostile, make_client: ClientFactory) -> None:
    class StoreDown(Exception):
        pass

    async def on_send() -> None:
        raise StoreDown("store unreachable")

    client = await make_client(breaker_failures=1, breaker_cooldown_s=0.01)
    client.breaker.state, client.breaker.opened_at = OPEN, -1e9  # cooled down: next is a probe
    exc = await failure(client, on_send=on_send)
    assert isinstance(exc, StoreDown) and exc.billed is False  # type: ignore[attr-defined]
    assert hostile.seen == []
    assert not client.breaker.is_open()  # the probe was given back
    assert (await client.recognize("objects", {}, in_memory())).data == SUCCESS
    assert client.breaker.state == CLOSED


async def test_refusals_before_sending_are_unbilled(
        hostile: Hostile, make_client: ClientFactory) -> None:
    client = await make_client(breaker_failures=1, breaker_cooldown_s=60)
    client.breaker.failure()
    exc = await failure(client)
    assert isinstance(exc, Unavailable) and exc.billed is False  # type: ignore[attr-defined]
    stopped = UpstreamClient(client.config, client.metrics)
    exc = await failure(stopped)
    assert isinstance(exc, BadGateway) and exc.billed is False  # type: ignore[attr-defined]
    assert hostile.seen == []


async def test_a_bug_before_sending_is_an_unbilled_502(
        hostile: Hostile, make_client: ClientFactory, tmp_path: Path) -> None:
    file = spooled(tmp_path)
    await asyncio.to_thread(Path(file.path or "").unlink)  # gone: the body cannot be built
    exc = await failure(await make_client(), file)
    assert isinstance(exc, BadGateway) and exc.billed is False  # type: ignore[attr-defined]
    assert hostile.seen == []


async def test_a_bug_after_sending_is_a_billed_502(
        hostile: Hostile, make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(raw: bytes) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(upstream_module, "_parse_envelope", broken)
    exc = await failure(await make_client())
    assert isinstance(exc, BadGateway) and exc.billed is True  # type: ignore[attr-defined]


# -- the breaker's probe --------------------------------------------------------------------
async def cooled_down(client: UpstreamClient) -> None:
    client.breaker.opened_at = -1e9


@pytest.mark.parametrize("where", ["memory", "spooled"])
async def test_a_probe_with_a_hostile_filename_is_sent_and_closes_the_breaker(
        hostile: Hostile, make_client: ClientFactory, tmp_path: Path, where: str) -> None:
    client = await make_client(breaker_failures=1, breaker_cooldown_s=60)
    hostile.answer = raw(b"down", 500)
    await failure(client)
    assert client.breaker.state == OPEN
    await cooled_down(client)
    hostile.answer = envelope(200, SUCCESS)
    evil_name = 'x"\r\nContent-Type: text/html\r\n\r\n\\evil\x00.png'
    evil_type = "image/png\r\nX-Injected: 1"
    data = PNG + bytes(2 * 1024 * 1024)  # spooled uploads are the large ones
    file = in_memory(data, evil_name, evil_type) if where == "memory" else spooled(
        tmp_path, data, evil_name, evil_type)
    result = await client.recognize("objects", {}, file)
    assert result.data == SUCCESS and client.breaker.state == CLOSED
    [(filename, content_type, content)] = hostile.seen[-1].files
    assert content == data and content_type == "application/octet-stream"
    assert filename is not None and "\r" not in filename and "\n" not in filename
    assert hostile.seen[-1].fields == {"apikey": KEY, "type": "objects"}


async def test_both_upload_paths_send_the_same_body(
        hostile: Hostile, make_client: ClientFactory, tmp_path: Path) -> None:
    client = await make_client()
    names = ["plain.png", "ça été.png", 'quo"te.png', "back\\slash.png", "tab\there.png", None]
    for name in names:
        for data in (PNG, PNG + bytes(200_000)):
            await client.recognize("nsfw", {"nsfw_min_confidence": 5}, in_memory(data, name))
            await client.recognize("nsfw", {"nsfw_min_confidence": 5},
                                   spooled(tmp_path, data, name))
            memory, disk = hostile.seen[-2:]
            assert memory.files == disk.files and memory.files[0][2] == data
            assert memory.fields == disk.fields == {"apikey": KEY, "type": "nsfw",
                                                    "nsfw_min_confidence": "5"}
            assert memory.content_length == disk.content_length is not None


async def test_a_probe_answered_with_deep_json_reopens_then_a_good_one_closes(
        hostile: Hostile, make_client: ClientFactory) -> None:
    client = await make_client(breaker_failures=1, breaker_cooldown_s=60)
    client.breaker.failure()
    await cooled_down(client)
    hostile.answer = raw(DEEP)
    exc = await failure(client)
    assert isinstance(exc, BadGateway) and client.breaker.state == OPEN
    await cooled_down(client)
    hostile.answer = envelope(200, SUCCESS)
    assert (await client.recognize("objects", {}, in_memory())).data == SUCCESS
    assert client.breaker.state == CLOSED


async def test_a_cancelled_probe_gives_the_probe_back(
        hostile: Hostile, make_client: ClientFactory) -> None:
    client = await make_client(breaker_failures=1, breaker_cooldown_s=60)
    client.breaker.failure()
    await cooled_down(client)
    hostile.answer = never_answers(hostile)
    probe = asyncio.create_task(client.recognize("objects", {}, in_memory()))
    await hostile.arrived.wait()
    assert client.breaker.is_open()  # one probe at a time
    probe.cancel()
    with pytest.raises(asyncio.CancelledError) as caught:
        await probe
    assert caught.value.billed is True  # type: ignore[attr-defined]  # it had been sent
    assert client.breaker.state == HALF_OPEN and not client.breaker.is_open()
    hostile.answer = envelope(200, SUCCESS)
    assert (await client.recognize("objects", {}, in_memory())).data == SUCCESS
    assert client.breaker.state == CLOSED


async def test_every_breaker_state_change_is_logged_once(
        hostile: Hostile, make_client: ClientFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    client = await make_client(breaker_failures=2, breaker_cooldown_s=60)
    hostile.answer = raw(b"down", 500)
    with caplog.at_level(logging.INFO, logger="gateway.breaker"):
        for _ in range(2):
            await failure(client)
        await failure(client)  # refused while open: no change, no line
        await cooled_down(client)
        await failure(client)  # the probe fails: half-open, then open again
        await cooled_down(client)
        hostile.answer = envelope(200, SUCCESS)
        await client.recognize("objects", {}, in_memory())
        await client.recognize("objects", {}, in_memory())
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.breaker"]
    assert len(lines) == 5, lines
    assert "closed -> open after 2 consecutive failures" in lines[0]
    assert "open -> half-open" in lines[1] and "half-open -> open" in lines[2]
    assert "open -> half-open" in lines[3] and "half-open -> closed" in lines[4]


# -- relayed messages -----------------------------------------------------------------------
def key_runs(text: str, n: int = 8) -> list[str]:
    """Every n-character piece of the key (any case) found in ``text``."""
    folded = text.lower()
    return [KEY[i:i + n] for i in range(len(KEY) - n + 1) if KEY[i:i + n].lower() in folded]


ECHOES = [
    pytest.param(f"Invalid parameter apikey={KEY}", id="whole"),
    pytest.param(f"bad request: {KEY.upper()}", id="upper-cased"),
    pytest.param(f"got key {KEY[:14]}...", id="truncated"),
    pytest.param("apikey=UPSTREAM-SECRET-k3y%2B0f%2Fthe%3Dacc0unt&type=objects",
                 id="percent-encoded"),
    pytest.param("apikey=UPSTREAM-SECRET-k3y%2b0f%2fthe%3dacc0unt", id="percent-lowercase"),
    pytest.param(f"k{KEY[:12]}\x00\u200b{KEY[12:]}", id="split-by-invisibles"),
    pytest.param("\r\n".join([KEY] * 500), id="long-and-multiline"),
    pytest.param("x" * 795 + KEY, id="at-the-scan-window"),
]


@pytest.mark.parametrize("message", ECHOES)
async def test_a_relayed_message_never_carries_the_key(
        hostile: Hostile, make_client: ClientFactory, message: str) -> None:
    hostile.answer = envelope(430, status_message=message)
    exc = await failure(await make_client())
    assert isinstance(exc, UpstreamError) and exc.status == 430
    assert key_runs(exc.message) == [], exc.message
    assert len(exc.message) <= MAX_MESSAGE
    assert not re.search("[\x00-\x1f\x7f-\x9f\u200b]", exc.message)


async def test_an_ordinary_message_is_relayed_tidied_and_bounded(
        hostile: Hostile, make_client: ClientFactory) -> None:
    client = await make_client()
    message = "Invalid parameter max_labels: must be an integer > 0"
    for sent, relayed in [
        (message, message),
        ("Invalid parameter max_labels:\r\n\tmust be an\x00 integer\u200b > 0", message),
        ("Invalid file " + "x" * 1000, "Invalid file " + "x" * (MAX_MESSAGE - 16) + "..."),
    ]:
        hostile.answer = envelope(430, status_message=sent)
        exc = await failure(client)
        assert isinstance(exc, UpstreamError) and exc.message == relayed
    hostile.answer = envelope(415, status_message=["not", "a", "string"])
    exc = await failure(client)
    assert isinstance(exc, UpstreamError) and exc.message == "Invalid file format"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.text(max_size=12), st.sampled_from([KEY, KEY.upper(), KEY[:9],
                                                                   KEY[-9:], "\x00", "\n"])),
                max_size=30))
def test_scrubbing_leaves_no_piece_of_the_key(pieces: list[str]) -> None:
    out = upstream_module._scrubbed("".join(pieces), KEY)
    assert key_runs(out) == [] and len(out) <= MAX_MESSAGE
    assert not re.search("[\x00-\x1f]", out)


# -- the answer's parser --------------------------------------------------------------------
any_text = st.text(st.characters(exclude_categories=()), max_size=4)  # surrogates included
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=20)


def servable(value: Any) -> bool:
    """The reference: what the gateway does with an answer later (it re-encodes it)."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode()
    except (ValueError, UnicodeEncodeError):
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(json_values, st.integers(0, 3))
def test_the_parser_accepts_exactly_what_can_be_served(value: Any, nesting: int) -> None:
    data = {"v": value}
    for _ in range(nesting):
        data = {"v": [data]}
    text = json.dumps({"status": 200, "data": data})  # NaN, Infinity, \ud800 escapes as given
    parsed = upstream_module._parse_envelope(text.encode())
    assert (parsed is not None) == servable(data)


def test_nesting_is_accepted_up_to_max_depth_however_wide() -> None:
    for depth in (MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 600, 5000):
        inner = "[" * (depth - 2) + "]" * (depth - 2)  # envelope and data are two levels
        text = f'{{"status":200,"data":{{"x":{inner}}}}}'
        assert (upstream_module._parse_envelope(text.encode()) is not None) == (
            depth <= MAX_DEPTH), depth
    # More brackets than MAX_DEPTH, 5 deep: walked, and accepted.
    objects = [{"name": "Car", "coordinates": [{"x": 0.5}]} for _ in range(400)]
    text = json.dumps({"status": 200, "data": {"objects": objects, "name": "\U0001f600"}})
    assert upstream_module._parse_envelope(text.encode()) == json.loads(text)


# -- every classification, as the team and the operator see it -------------------------------
NO_ENVELOPE = upstream_module.NOT_THE_ENVELOPE


def undefined(status: int, shown: object) -> Any:
    return pytest.param(
        envelope(status, SUCCESS, http=200), BadGateway, f"Upstream answered status {shown}",
        False, [("WARNING", f"upstream answered envelope status {shown}, not one the API defines")],
        id=f"undefined-{status}")


def credentials(status: int) -> Any:
    return pytest.param(
        envelope(status, status_message="APIkey invalid"), BadGateway,
        "Upstream refused the gateway's credentials", False,
        [("ERROR", f"upstream refused the gateway's API key (upstream status {status}): "
                   "check the variable named by upstream.api_key_env")], id=f"credentials-{status}")


CLASSIFIED = [
    pytest.param(raw(b"Internal Server Error", 500), BadGateway, NO_ENVELOPE, True,
                 [("WARNING", "upstream answered HTTP 500 with no envelope")], id="500-page"),
    pytest.param(raw(b"busy", 503), BadGateway, NO_ENVELOPE, False,
                 [("WARNING", "upstream answered HTTP 503 with no envelope")], id="503-page"),
    pytest.param(raw(b'{"status":200}'), BadGateway, NO_ENVELOPE, True,
                 [("WARNING", "upstream answered HTTP 200 with no envelope")], id="no-data"),
    pytest.param(raw(b'{"status":412,"status_message":"Invalid file"}'), BadGateway, NO_ENVELOPE,
                 True, [("WARNING", "upstream answered HTTP 200 with no envelope")],
                 id="error-without-data"),
    pytest.param(raw(b'{"status":"200","data":{}}'), BadGateway, NO_ENVELOPE, True,
                 [("WARNING", "upstream answered HTTP 200 with no envelope")],
                 id="status-a-string"),
    pytest.param(raw(b'{"status":true,"data":{}}'), BadGateway, NO_ENVELOPE, True,
                 [("WARNING", "upstream answered HTTP 200 with no envelope")], id="status-a-bool"),
    pytest.param(envelope(200, SUCCESS, http=500), BadGateway, NO_ENVELOPE, True,
                 [("WARNING", "upstream answered a success envelope over HTTP 500")],
                 id="success-over-500"),
    pytest.param(envelope(200, [1, 2]), BadGateway, NO_ENVELOPE, True,
                 [("WARNING", "upstream answered a success envelope over HTTP 200")],
                 id="data-a-list"),
    pytest.param(envelope(402, status_message="Quota limit reached"), QuotaReached,
                 "Quota limit reached", False,
                 [("ERROR", "upstream account quota exhausted (upstream answered 402)")], id="402"),
    credentials(400),
    credentials(401),
    undefined(300, 300),  # the API's own "no data" status: the gateway never sends such a call
    undefined(0, 0),
    undefined(500, 500),
    undefined(999, 999),
    undefined(1000, "out of range"),
    undefined(-1, "out of range"),
]


@pytest.mark.parametrize(("answer", "kind", "message", "billed", "logged"), CLASSIFIED)
async def test_each_failure_has_its_message_its_bill_and_one_log_line(
        hostile: Hostile, make_client: ClientFactory, caplog: pytest.LogCaptureFixture,
        answer: Answer, kind: type[GatewayError], message: str, billed: bool,
        logged: list[tuple[str, str]]) -> None:
    """What the team reads, whether it pays, and the one line that tells the operator why:
    never the 'failed unexpectedly' of a bug, whose 502 hides which of these it was."""
    hostile.answer = answer
    client = await make_client(retries=0)
    with caplog.at_level(logging.INFO, logger="gateway.upstream"):
        exc = await failure(client)
    assert type(exc) is kind and exc.message == message  # type: ignore[attr-defined]
    assert exc.billed is billed  # type: ignore[attr-defined]
    assert [(r.levelname, r.getMessage()) for r in caplog.records
            if r.name == "gateway.upstream"] == logged


def quota_gauge(client: UpstreamClient) -> float | None:
    return client.metrics.registry.get_sample_value("gateway_upstream_quota_remaining")


async def test_the_account_quota_is_read_only_from_an_integer(
        hostile: Hostile, make_client: ClientFactory) -> None:
    client = await make_client()
    assert (await client.recognize("objects", {}, in_memory())).account_quota == 2999
    assert quota_gauge(client) == 2999
    for odd in (True, "lots", 12.5, None):
        hostile.answer = envelope(200, {**SUCCESS, "quota": odd})
        result = await client.recognize("objects", {}, in_memory())
        assert result.account_quota is None and result.data["quota"] == odd, odd
        assert quota_gauge(client) == 2999, odd  # the last one known stays
    hostile.answer = envelope(402, status_message="Quota limit reached")
    await failure(client)
    assert quota_gauge(client) == 0


@pytest.mark.parametrize("number", [b"1e+999", b"-1E+400", b"2e+0309"])
async def test_a_number_with_a_plus_exponent_that_overflows_is_refused(
        hostile: Hostile, make_client: ClientFactory, number: bytes) -> None:
    hostile.answer = raw(b'{"status":200,"data":{"confidence":' + number + b"}}")
    exc = await failure(await make_client())
    assert isinstance(exc, BadGateway) and exc.billed is True  # type: ignore[attr-defined]


def test_depth_is_checked_exactly_when_there_are_many_brackets() -> None:
    wide = "[" + ",".join(["[]"] * (MAX_DEPTH + 1)) + "]"  # more brackets than MAX_DEPTH
    for depth in (MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1):
        inner = "[" * (depth - 2) + "]" * (depth - 2)  # envelope and data are two levels
        text = f'{{"status":200,"data":{{"w":{wide},"x":{inner}}}}}'
        assert (upstream_module._parse_envelope(text.encode()) is not None) == (
            depth <= MAX_DEPTH), depth


def test_an_exception_without_a_verdict_counts_as_billed() -> None:
    assert upstream_module.was_billed(RuntimeError("no verdict")) is True
    assert upstream_module.was_billed(upstream_module.mark_billed(RuntimeError(), False)) is False


def test_an_overflow_is_found_beside_a_long_number_too() -> None:
    """The cheap pre-check looks for either shape of an overflowing number; an answer holding
    both (a 200-digit integer and 1e999) is walked, and refused, as one holding either."""
    long_int = b"9" * 200
    for data in (b'{"a":1e999,"b":' + long_int + b"}", b'{"a":1e999}', b'{"b":1e999,"c":2}'):
        raw_answer = b'{"status":200,"data":' + data + b"}"
        assert upstream_module._parse_envelope(raw_answer) is None, data
    assert upstream_module._parse_envelope(b'{"status":200,"data":{"b":' + long_int + b"}}")


async def test_an_unreachable_upstream_is_one_warning_after_its_retries(
        make_client: ClientFactory, caplog: pytest.LogCaptureFixture) -> None:
    client = await make_client(url=f"http://127.0.0.1:{free_port()}/api/v2/")
    with caplog.at_level(logging.INFO, logger="gateway.upstream"):
        exc = await failure(client)
    assert type(exc) is BadGateway and exc.billed is False  # type: ignore[attr-defined]
    assert exc.message == BadGateway().message
    assert [(r.levelname, r.getMessage()) for r in caplog.records
            if r.name == "gateway.upstream"] == [
        ("WARNING", "upstream unreachable: ClientConnectorError")]
    assert upstream_labels(client) == {"error": 3}


async def test_a_redirect_is_counted_as_an_error_and_logged(
        hostile: Hostile, make_client: ClientFactory, caplog: pytest.LogCaptureFixture) -> None:
    hostile.answer = raw(b"moved", 302, {"Location": hostile.url + "elsewhere"})
    client = await make_client()
    with caplog.at_level(logging.INFO, logger="gateway.upstream"):
        await failure(client)
    assert [(r.levelname, r.getMessage()) for r in caplog.records
            if r.name == "gateway.upstream"] == [
        ("WARNING", "upstream answered HTTP 302, a redirect: not followed")]
    assert upstream_labels(client) == {"error": 1}


@pytest.mark.parametrize(("http", "label"), [(400, "400"), (404, "404"), (500, "500"),
                                             (200, "error"), (204, "error")])
async def test_a_page_that_is_not_the_envelope_is_counted_by_its_http_status(
        hostile: Hostile, make_client: ClientFactory, http: int, label: str) -> None:
    hostile.answer = raw(b"" if http == 204 else b"<html>no</html>", http)
    client = await make_client()
    await failure(client)
    assert upstream_labels(client) == {label: 1}


async def test_retries_stop_at_the_deadline_with_a_timeout(
        hostile: Hostile, make_client: ClientFactory) -> None:
    """503 pages (refused before processing) are retried with backoff only while time is
    left: past timeout_s, a 504, counted as a timeout."""
    hostile.answer = raw(b"busy", 503)
    client = await make_client(timeout_s=0.3, retries=1000)
    exc = await failure(client)
    assert type(exc) is GatewayTimeout
    assert 2 <= len(hostile.seen) < 1000
    labels = upstream_labels(client)
    # (The last attempt may be one started with a sliver of time left, and cut by it.)
    assert labels["timeout"] == 1 and labels["503"] in (len(hostile.seen), len(hostile.seen) - 1)


async def test_a_connection_dropped_after_sending_is_one_warning_naming_the_failure(
        hostile: Hostile, make_client: ClientFactory, caplog: pytest.LogCaptureFixture) -> None:
    hostile.answer = drops_the_connection
    with caplog.at_level(logging.INFO, logger="gateway.upstream"):
        exc = await failure(await make_client())
    assert type(exc) is BadGateway and exc.billed is True  # type: ignore[attr-defined]
    logged = [(r.levelname, r.getMessage()) for r in caplog.records
              if r.name == "gateway.upstream"]
    assert logged in ([("WARNING", "upstream connection failed: ServerDisconnectedError")],
                      [("WARNING", "upstream connection failed: ClientOSError")]), logged


async def test_a_bug_is_logged_with_its_exception_type(
        hostile: Hostile, make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def broken(raw: bytes) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(upstream_module, "_parse_envelope", broken)
    with caplog.at_level(logging.INFO, logger="gateway.upstream"):
        exc = await failure(await make_client())
    assert type(exc) is BadGateway and exc.billed is True  # type: ignore[attr-defined]
    [record] = [r for r in caplog.records if r.name == "gateway.upstream"]
    assert (record.levelname, record.getMessage()) == (
        "ERROR", "upstream call failed unexpectedly (KeyError)")
    assert record.exc_info is not None  # the traceback, for whoever fixes it
