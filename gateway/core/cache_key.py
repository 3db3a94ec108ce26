"""What identifies a result: the image bytes, the type, and only the parameters that type uses.

Boundary, field order, filename, team and key never change the key. Parameters are parsed
and validated here (430 names the bad one), so the request path calls ``analysis_params``
once and gets both the validated values and the canonical key text.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from gateway.analysis import TYPES
from gateway.core.errors import InvalidParameter

# (name, minimum, maximum) per type, in canonical order (gateway.analysis, the one table).
TYPE_PARAMS: dict[str, tuple[tuple[str, int, int], ...]] = {
    t.name: tuple((p.name, p.low, p.high) for p in t.params) for t in TYPES.values()
}


class Params(dict[str, int]):
    """One type's validated, normalised parameters, in canonical order, with their text."""

    __slots__ = ("text",)

    def __init__(self, values: dict[str, int]) -> None:
        super().__init__(values)
        self.text = "&".join(f"{k}={v}" for k, v in values.items())


def analysis_params(type_: str, fields: Mapping[str, str]) -> Params:
    """The validated, normalised parameters ``type_`` uses; raises ``InvalidParameter``.

    The answer is shared between requests that send the same values: do not change it."""
    return _parse(type_, tuple([fields.get(name) for name, _, _ in TYPE_PARAMS[type_]]))


@functools.lru_cache(maxsize=1024)  # clients send the same few parameter values
def _parse(type_: str, raw_values: tuple[str | None, ...]) -> Params:
    params: dict[str, int] = {}
    for (name, low, high), raw in zip(TYPE_PARAMS[type_], raw_values, strict=True):
        text = (raw or "").strip()
        if not text.isascii() or not text.isdigit():
            raise InvalidParameter(name, _range_text(low, high))
        digits = text.lstrip("0") or "0"
        # int() refuses past 4,300 digits; more digits than the maximum has is out of range.
        value = int(digits) if len(digits) <= len(str(high)) else high + 1
        if not low <= value <= high:
            raise InvalidParameter(name, _range_text(low, high))
        params[name] = value
    return Params(params)


def _range_text(low: int, high: int) -> str:
    # The simulator's wording (gateway/devtools/sim.py), after the seed's table: "int > 0",
    # "0 <= int <= 100". A missing parameter gets the same message, as upstream.
    if high == 2**31 - 1:
        return f"must be an integer > {low - 1}"
    return f"must be an integer between {low} and {high}"


def params_text(params: Mapping[str, int]) -> str:
    """Canonical text of normalised params: ``max_labels=10&min_confidence=80``."""
    if isinstance(params, Params):
        return params.text
    return "&".join(f"{k}={params[k]}" for k in params)


def cache_key(content_hash: str, type_: str, params: Mapping[str, int], scope: str = "") -> str:
    """``scope`` is empty when results are shared across teams, else the team name."""
    text = params_text(params)
    key = f"{content_hash}/{type_}?{text}" if text else f"{content_hash}/{type_}"
    return f"{scope}|{key}" if scope else key
