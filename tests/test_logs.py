"""The access log's direct writer makes exactly the line the logging formatters make."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest

from gateway.logs import AccessLog, JsonFormatter, TextFormatter

FIELDS = {"team": "search", "type": "objects", "status": 200, "cache": "hit",
          "hash": "abcdef012345", "bytes": 100000, "gateway_ms": 0.31, "upstream_ms": None}
STAMP = re.compile(r"^\S+ \S+ |^\{\"time\":\"[^\"]+\",")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_access_line_matches_the_formatter(fmt: str) -> None:
    out = io.StringIO()
    AccessLog(fmt, out).write(FIELDS)
    direct = out.getvalue()
    record = logging.LogRecord("gateway.access", logging.INFO, "", 0, "request", (), None)
    record.__dict__.update(FIELDS)
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    via_logging = formatter.format(record) + "\n"
    assert direct.endswith("\n") and direct.count("\n") == 1
    assert STAMP.sub("", direct) == STAMP.sub("", via_logging)
    if fmt == "json":
        assert json.loads(direct)["time"].endswith("Z")
    else:
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO gateway\.access: request "
                        r"team=search ", direct)
