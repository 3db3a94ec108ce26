"""The envelope answer written to the socket in one piece: status line, headers and body.

``web.Response`` builds every answer's head through several layers (content type and
length, connection, the payload writer, a header multidict and its serialisation): ~7 us an
answer against ~3 us here (``python bench/hot_path_bench.py``, socket write not counted), a
large share of a cache hit. So the API's answers are written here instead: the fixed lines
are built once, the rest is joined per answer, and the whole answer goes to the transport in
one ``write``. What aiohttp would send is kept (Date, Server, Content-Length, Connection for
HTTP/1.0 and for a closing connection), and so is the ``headers`` multidict: it is made only
when something asks for it (the CORS middleware), and then it is what gets written.

Every answer names the server ``SERVER_NAME``, without versions (aiohttp's default,
``Python/3.11 aiohttp/3.x``, tells a scanner which known bugs to try): the envelope here,
every other answer through ``name_the_server`` (an ``on_response_prepare`` signal).

Private aiohttp internals this module uses, all of them for that one saving (BENCHMARKS.md,
"Cache hits ... how", row "the answer: ``web.Response`` prepared and written", 7.00 -> 2.88
us): ``StreamResponse.__init__`` is skipped, so the class-level defaults of ``_eof_sent``,
``_payload_writer``, ``_keep_alive``, ``_req`` and ``_body_length`` must exist (aiohttp 3.11.8
and later; before, every answer fails with ``AttributeError: '_eof_sent'``); it sets
``_state`` and calls ``_set_status``, and overrides ``_headers``; of the request it takes
``request._payload_writer`` and awaits ``request._prepare_hook``. ``tests/http/test_response.py``
reads the bytes on the wire, through this writer and through the ``web.Response`` fallback
(``FAST``, below) that is used where one of those parts is missing; pyproject.toml's aiohttp
floor is a version it passes on.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterable, Sequence

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11
from multidict import CIMultiDict

from gateway.core.envelope import BROWSER_CONTENT_TYPE, CONTENT_TYPE, HEADERS

SERVER_NAME = "imagerecognize-gateway"

# Per content type (envelope.content_type_for chooses it): the headers every answer carries.
_FIXED = {
    content_type: [("Content-Type", f"{content_type}; charset=utf-8"), *HEADERS.items()]
    for content_type in (CONTENT_TYPE, BROWSER_CONTENT_TYPE)
}
_FIXED_LINES = {
    content_type: "".join(f"{k}: {v}\r\n" for k, v in pairs) + f"Server: {SERVER_NAME}\r\n"
    for content_type, pairs in _FIXED.items()
}
_SERVER_LINE = f"Server: {SERVER_NAME}\r\n"
_status_lines: dict[tuple[HttpVersion, int], str] = {}
_date_second = -1
_date_line = ""


def _date() -> str:
    """The Date line, formatted once a second."""
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_line = f"Date: {email.utils.formatdate(now, usegmt=True)}\r\n"
        _date_second = now
    return _date_line


class EnvelopeResponse(web.StreamResponse):
    """A complete answer; ``headers`` are the ones beyond the fixed envelope headers, and
    ``content_type`` one of envelope's two (``content_type_for``)."""

    def __init__(
        self, body: bytes, status: int, headers: dict[str, str], *, content_type: str
    ) -> None:
        # Not StreamResponse.__init__: its header multidict is made only if asked for.
        self._state = {}
        self._set_status(status, None)
        self._payload = body
        self._extra = headers
        self._envelope_type = content_type
        self._multi: CIMultiDict[str] | None = None

    @property
    def headers(self) -> CIMultiDict[str]:
        if self._multi is None:
            self._multi = CIMultiDict(_FIXED[self._envelope_type])
            self._multi.extend(self._extra)
        return self._multi

    @property
    def _headers(self) -> CIMultiDict[str]:  # type: ignore[override]
        return self.headers  # what StreamResponse's own methods read

    @property  # type: ignore[misc]
    def content_length(self) -> int:
        return len(self._payload)

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent:
            return None
        if self._payload_writer is not None:
            return self._payload_writer
        self._req = request
        writer = self._payload_writer = request._payload_writer
        app = request.app if isinstance(request, web.Request) else None
        if app is None or _other_signals(app.on_response_prepare):  # they still see the answer
            await request._prepare_hook(self)
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = self._keep_alive = request.keep_alive
        version = request.version
        pairs: Iterable[tuple[str, str]]
        if self._multi is None:
            fixed, pairs = _FIXED_LINES[self._envelope_type], self._extra.items()
        else:
            fixed, pairs = _SERVER_LINE, self._multi.items()
        lines = [f"{k}: {v}\r\n" for k, v in pairs]
        extra = "".join(lines)
        if extra.count("\n") != len(lines) or extra.count("\r") != len(lines):
            raise ValueError("Newline or carriage return in a response header")
        status_line = _status_lines.get((version, self.status))
        if status_line is None:
            status_line = f"HTTP/{version[0]}.{version[1]} {self.status} {self.reason}\r\n"
            _status_lines[(version, self.status)] = status_line
        if keep_alive:
            connection = "Connection: keep-alive\r\n" if version == HttpVersion10 else ""
        else:
            connection = "Connection: close\r\n" if version == HttpVersion11 else ""
        head = (
            f"{status_line}{fixed}{extra}Content-Length: {len(self._payload)}\r\n"
            f"{_date()}{connection}\r\n"
        )
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")
        transport.write(head.encode() + self._payload)
        return writer

    async def write_eof(self, data: bytes = b"") -> None:
        if self._eof_sent:
            return
        self._eof_sent = True
        self._req = None
        self._body_length = len(self._payload)
        self._payload_writer = None



# The private parts used above, checked once at import. Where one is missing (an aiohttp
# outside the tested range), every answer goes through the public ``web.Response`` instead:
# the same status, headers and body (tests/http/test_response.py runs on both), a few us slower.
_PRIVATE_RESPONSE = ("_eof_sent", "_payload_writer", "_keep_alive", "_req", "_body_length")
FAST = all(hasattr(web.StreamResponse, name) for name in (*_PRIVATE_RESPONSE, "_set_status")) and (
    hasattr(web.BaseRequest, "_prepare_hook")
)


def envelope_answer(
    body: bytes, status: int, headers: dict[str, str], *, content_type: str
) -> web.StreamResponse:
    """An envelope answer: written here where aiohttp's internals allow, else ``web.Response``."""
    if FAST:
        return EnvelopeResponse(body, status, headers, content_type=content_type)
    return web.Response(body=body, status=status, headers={**dict(_FIXED[content_type]), **headers})


async def name_the_server(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: aiohttp fills in ``Server`` only where it is missing."""
    if not isinstance(response, EnvelopeResponse):  # it writes its own, from the fixed lines
        response.headers["Server"] = SERVER_NAME


def _other_signals(signals: Sequence[object]) -> bool:
    """Handlers besides ``name_the_server``, which has nothing to do for an envelope: awaiting
    it anyway would cost ~0.8 us an answer, a quarter of what this module saves."""
    return len(signals) > 1 or (len(signals) == 1 and signals[0] is not name_the_server)
