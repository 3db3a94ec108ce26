"""The upstream's error envelope, as exceptions that carry their status.

Every error the gateway answers uses the upstream's envelope:
``{"status": N, "status_message": "...", "data": null}``, and the HTTP status equals ``N``.
One middleware (``gateway.http.app``) renders them; nothing else formats an error.
"""

from __future__ import annotations

import json


class GatewayError(Exception):
    status: int = 502
    message: str = "Bad gateway"

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None):
        if message is not None:
            self.message = message
        self.headers = headers or {}
        super().__init__(self.message)

    def envelope(self) -> bytes:
        return error_envelope(self.status, self.message)


def error_envelope(status: int, message: str) -> bytes:
    return json.dumps(
        {"status": status, "status_message": message, "data": None}, separators=(",", ":")
    ).encode()


# The upstream's own codes (seed document, chapter 2).
class NoData(GatewayError):
    status, message = 300, "Invalid request, no data received"


class KeyMissing(GatewayError):
    status, message = 400, "APIkey missing"


class KeyInvalid(GatewayError):
    status, message = 401, "APIkey invalid"


class QuotaReached(GatewayError):
    status, message = 402, "Quota limit reached"


class InvalidFile(GatewayError):
    status, message = 412, "Invalid file"


class FileTooLarge(GatewayError):
    status, message = 413, "Image size too large"


class InvalidFormat(GatewayError):
    status, message = 415, "Invalid file format"


class InvalidType(GatewayError):
    status, message = 420, "Invalid type"


class InvalidParameter(GatewayError):
    """430: the message names the parameter, as upstream does."""

    status = 430

    def __init__(self, name: str, problem: str = "missing or invalid"):
        self.parameter = name
        super().__init__(f"Invalid parameter {name}: {problem}")


# Codes only the gateway can have.
class RequestTimeout(GatewayError):
    status, message = 408, "Request body not received in time"


class RateLimited(GatewayError):
    status, message = 429, "Rate limit exceeded"


class BadGateway(GatewayError):
    status, message = 502, "Upstream unreachable or invalid answer"


class Unavailable(GatewayError):
    status, message = 503, "Gateway unavailable"


class GatewayTimeout(GatewayError):
    status, message = 504, "Upstream timed out"


class ServerError(GatewayError):
    status, message = 500, "Internal gateway error"
