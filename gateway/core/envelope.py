"""The success envelope, built by splicing stored bytes (no JSON re-encode on a hit).

A result is stored as its ``data`` object encoded so that it ends in ``"quota":``; the
answer appends the caller's remaining sub-quota and closes the braces.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# Browsers get text/plain: the seed's own jQuery example calls JSON.parse on what jQuery
# hands it, which breaks if jQuery has already parsed it because it was labelled JSON (so the
# upstream's answers cannot be). Programs get application/json, which strict clients (e.g.
# aiohttp's resp.json()) require. A browser is told apart by its Origin header, which every
# cross-origin request and every POST from a page carries; nosniff either way.
BROWSER_CONTENT_TYPE = "text/plain"
CONTENT_TYPE = "application/json"
HEADERS = {"X-Content-Type-Options": "nosniff"}


def content_type_for(headers: Mapping[str, str]) -> str:
    return BROWSER_CONTENT_TYPE if "Origin" in headers else CONTENT_TYPE


_HEAD = b'{"status":200,"message":"Success","data":'


def data_prefix(data: dict[str, Any]) -> bytes:
    body = {k: v for k, v in data.items() if k != "quota"}
    encoded = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    return encoded[:-1] + (b',"quota":' if body else b'"quota":')


def success_body(prefix: bytes, quota: int) -> bytes:
    return b"".join((_HEAD, prefix, str(quota).encode(), b"}}"))


def data_object(prefix: bytes) -> dict[str, Any]:
    """The stored data object without its ``quota`` (for ``type=cache`` listings)."""
    data: dict[str, Any] = json.loads(prefix + b"0}")
    data.pop("quota", None)
    return data


def success_json(data: dict[str, Any]) -> bytes:
    return json.dumps(
        {"status": 200, "message": "Success", "data": data},
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
