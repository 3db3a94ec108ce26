"""The uploaded image as every layer sees it: what the form parser (``gateway.http.form``)
produces, the service (``gateway.core``) keys and checks, and the upstream client forwards.
A value type at the floor of the layers: it imports nothing of the gateway."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

HEAD_BYTES = 16  # kept from the file's start for the magic-byte check


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
