"""Requests aiohttp cannot parse: answered in the upstream's envelope, logged without their bytes.

aiohttp answers a request it cannot parse (a request line longer than ``max_line_size``, a
header longer than ``max_field_size``, broken chunked framing) from
``RequestHandler.handle_error`` with a text/plain 400 that quotes the offending bytes, and logs
them at ERROR with a traceback. Those bytes are the URL or the body: they carry the team's
``apikey``. Two layers keep them out of answers and logs:

- ``EnvelopeRequestHandler`` answers 414, 431 or 300 in the envelope, never echoing the
  request, and logs one line naming only the kind of error. ``envelope_server`` installs it in
  the ``web.Server`` a runner made; that reads two private attributes of aiohttp's ``Server``
  (``_loop``, ``_kwargs``), so where they are missing the runner keeps aiohttp's handler;
- ``RedactMalformed``, a ``logging.Filter`` on aiohttp's loggers, turns any record that carries
  an ``HttpProcessingError`` into one line without the error's message, whichever handler
  logged it.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    HttpProcessingError,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway.core.envelope import CONTENT_TYPE, HEADERS
from gateway.core.errors import NoData, ServerError, error_envelope
from gateway.http.response import SERVER_NAME

AIOHTTP_LOGGERS = ("aiohttp.server", "aiohttp.web", "aiohttp.access")

URI_TOO_LONG = (414, "Request-URI too long")
HEADERS_TOO_LARGE = (431, "Request header fields too large")
MALFORMED = (NoData.status, NoData.message)  # the upstream's answer to a request it can't read


def classify(exc: BaseException | None, handler: RequestHandler) -> tuple[int, str]:
    """The envelope for a request the parser refused; nothing in it comes from the request."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == handler.max_line_size and limit != handler.max_field_size:
            return URI_TOO_LONG
        return HEADERS_TOO_LARGE
    if isinstance(exc, HttpProcessingError) and exc.message.startswith("Too many headers"):
        return HEADERS_TOO_LARGE
    return MALFORMED


class EnvelopeRequestHandler(RequestHandler):
    def data_received(self, data: bytes) -> None:
        queued = len(getattr(self, "_messages", ()))
        super().data_received(data)
        self._fail_body_in_progress(queued)

    def _fail_body_in_progress(self, queued: int) -> None:
        """Broken framing in a body whose head was already handed to a handler: aiohttp queues
        an error for after that request and leaves its body waiting (the handler would answer
        408 at server.body_timeout_s, then the connection lingers). Fail the body now: the
        form reader answers 300 at once, and nothing is forwarded or charged. Private parts
        (``_messages``, ``_current_request``); without them, the 408 it was."""
        messages = getattr(self, "_messages", None)
        request = getattr(self, "_current_request", None)
        if not messages or request is None or len(messages) <= queued:
            return
        if isinstance(getattr(messages[-1][0], "exc", None), HttpProcessingError):
            body = request.content
            if not body.is_eof() and body.exception() is None:
                body.set_exception(BadHttpMessage("malformed framing in the request body"))

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: the answer has begun, cannot replace it
            raise ConnectionError("response already sent, cannot send the error")
        if isinstance(exc, HttpProcessingError):
            status, text = classify(exc, self)
            first_probe = self._request_count == 1 and isinstance(exc, BadHttpMethod)
            (self.logger.debug if first_probe else self.logger.warning)(
                "malformed request from %s (%s): answered %d; its bytes are not logged",
                request.remote,
                type(exc).__name__,
                status,
            )
        else:
            if status == 500:
                self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
                text = ServerError.message
            else:
                try:
                    text = HTTPStatus(status).phrase
                except ValueError:
                    text = "Error"
        resp = web.Response(
            status=status,
            body=error_envelope(status, text),
            content_type=CONTENT_TYPE,
            headers={**HEADERS, "Server": SERVER_NAME},  # no app here: its signal never runs
        )
        resp.force_close()
        return resp


class _EnvelopeServer(web.Server):
    def __call__(self) -> RequestHandler:
        return EnvelopeRequestHandler(self, loop=self._loop, **self._kwargs)


def envelope_server(server: web.Server) -> web.Server:
    """The same server, building ``EnvelopeRequestHandler`` connections (before it has any)."""
    try:
        loop, kwargs = server._loop, server._kwargs
    except AttributeError:  # a future aiohttp: its own handler, and RedactMalformed, remain
        logging.getLogger("gateway").warning(
            "aiohttp %s: malformed requests get aiohttp's own 400 (no envelope)",
            getattr(web, "__version__", "?"),
        )
        return server
    return _EnvelopeServer(
        server.request_handler,
        request_factory=server.request_factory,
        handler_cancellation=server.handler_cancellation,
        loop=loop,
        **kwargs,
    )


class EnvelopeAppRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer unparseable requests in the envelope."""

    async def _make_server(self) -> web.Server:
        return envelope_server(await super()._make_server())


class RedactMalformed(logging.Filter):
    """A record carrying an HttpProcessingError keeps its logger and level but loses the error's
    message (it quotes request bytes) and its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        args = record.args if isinstance(record.args, tuple) else ()
        quoted = [a for a in args if isinstance(a, HttpProcessingError)]
        if isinstance(exc, HttpProcessingError) or quoted:
            kind = type(exc if isinstance(exc, HttpProcessingError) else quoted[0]).__name__
            record.msg = "malformed request (%s); its bytes are not logged"
            record.args = (kind,)
            record.exc_info = None
            record.exc_text = None
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_FILTER = RedactMalformed()


def redact_aiohttp_logs() -> None:
    for name in AIOHTTP_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
