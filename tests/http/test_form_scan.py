"""The multipart parser's delimiter search: StringZilla's SIMD ``find`` against ``bytes.find``.

Where a part ends decides which bytes are hashed, billed and forwarded, so the fast search must
give ``bytes.find``'s answer for every haystack, needle and start the parser can pass: needles
of 5-204 bytes (CRLF, ``--`` and a 1-200 character boundary), haystacks around the SIMD block
widths (16-64 bytes) and their multiples, near-misses (every proper prefix of the needle, the
needle with one byte changed) at every alignment, starts anywhere up to past the end.
"""

from __future__ import annotations

import platform

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.http.form import SCANS

NEEDLE_BYTES = st.binary(min_size=1, max_size=200)


def test_a_plain_install_searches_with_stringzilla() -> None:
    # A dependency on CPython (pyproject.toml): the speed the bench reports is measured with it.
    assert platform.python_implementation() == "CPython"
    assert next(iter(SCANS)) == "stringzilla"


@st.composite
def searches(draw: st.DrawFn) -> tuple[bytes, bytes, int]:
    needle = b"\r\n--" + draw(NEEDLE_BYTES)
    alphabet = draw(st.sampled_from([b"\r\n-", b"\r\n-" + needle[4:6], bytes(range(256))]))
    pieces: list[bytes] = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["noise", "prefix", "needle", "changed"]))
        if kind == "noise":
            size = draw(st.sampled_from([0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 255]))
            pieces.append(bytes(draw(st.sampled_from(list(alphabet))) for _ in range(size)))
        elif kind == "prefix":
            pieces.append(needle[: draw(st.integers(1, len(needle) - 1))])
        elif kind == "needle":
            pieces.append(needle)
        else:
            at = draw(st.integers(0, len(needle) - 1))
            other = (needle[at] + draw(st.integers(1, 255))) % 256
            pieces.append(needle[:at] + bytes([other]) + needle[at + 1 :])
    haystack = b"".join(pieces)
    start = draw(st.integers(0, len(haystack) + 3))
    return haystack, needle, start


@settings(max_examples=1500, deadline=None)
@given(search=searches())
def test_stringzilla_finds_what_bytes_find_finds(search: tuple[bytes, bytes, int]) -> None:
    haystack, needle, start = search
    assert SCANS["stringzilla"](haystack, needle, start) == haystack.find(needle, start)


@pytest.mark.parametrize("size", [100 * 1024, 5 * 1024 * 1024 + 3])
def test_a_delimiter_deep_in_a_large_upload_is_found_where_it_is(size: int) -> None:
    # The sizes of the bench's uploads: past every block and page boundary of the search.
    needle = b"\r\n--" + b"gatewaybench7MA4YWxkTrZu0gW"
    noise = bytes(range(256)) * (size // 256 + 1)
    for at in (0, 1, size // 2 - 7, size - len(needle) - 1, size - len(needle)):
        haystack = noise[:at] + needle + noise[at : size - len(needle)]
        assert SCANS["stringzilla"](haystack, needle, 0) == haystack.find(needle) == at
        assert SCANS["stringzilla"](haystack, needle, at + 1) == -1
