"""Derived answers: a stricter request answered from a looser stored result.

The upstream's document defines ``min_confidence`` (``nsfw_min_confidence`` for ``nsfw``) as
a lower threshold and ``max_labels`` as a maximum count. The model the gateway relies on
(docs/observability.md, "Derived hits"): an answer is the objects with confidence >= the
threshold, highest first, at most ``max_labels``. Under it a stored answer for (c0, m0)
answers (c, m) exactly when c >= c0 and (m <= m0, or the stored answer held fewer than m0
objects, or its last object is below c): keep confidence >= c, then the first m.

Pure functions, no I/O: the service asks ``usable`` and ``derive``; the audit checks the
model against the upstream itself.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway import analysis
from gateway.core.cache_key import Params
from gateway.core.envelope import data_prefix

# type -> (its threshold parameter, its label cap parameter or None): gateway.analysis
DERIVABLE = analysis.DERIVABLE
# Meta row name (+ type) holding why the audit switched derived hits off for that type: written
# by gateway.core.service, read by every replica and by `gateway cache stats`.
DERIVE_OFF_META = "derive_off:"


def parse_params(text: str) -> dict[str, int]:
    """``max_labels=10&min_confidence=80`` -> {"max_labels": 10, "min_confidence": 80}."""
    out: dict[str, int] = {}
    for part in text.split("&"):
        if part:
            name, _, value = part.partition("=")
            out[name] = int(value)
    return out


@dataclass(frozen=True, slots=True)
class Stored:
    """A stored answer, parsed: its parameters, its data object (no quota), its objects."""

    params: dict[str, int]
    data: dict[str, Any]
    objects: list[dict[str, Any]]
    confidences: list[float]

    @classmethod
    def parse(cls, params_text: str, prefix: bytes) -> Stored | None:
        """None when the stored data does not look like the model's answer (then it is
        never used to derive): objects a list of objects with numeric confidences, highest
        first."""
        try:
            data = json.loads(prefix + b"0}")
            params = parse_params(params_text)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        data.pop("quota", None)
        objects = data.get("objects")
        if not isinstance(objects, list):
            return None
        confidences: list[float] = []
        for item in objects:
            if not isinstance(item, dict):
                return None
            value = item.get("confidence")
            if isinstance(value, bool) or not isinstance(value, int | float):
                return None
            confidences.append(float(value))
        if any(a < b for a, b in itertools.pairwise(confidences)):
            return None  # not highest first: the model does not hold for this answer
        return cls(params, data, objects, confidences)


def usable(type_: str, stored: Stored, asked: Mapping[str, int]) -> bool:
    """Whether ``stored`` answers ``asked`` exactly under the model."""
    rule = DERIVABLE.get(type_)
    if rule is None:
        return False
    threshold, cap = rule
    c0, c = stored.params.get(threshold), asked.get(threshold)
    if c0 is None or c is None or c < c0:
        return False
    if any(conf < c0 for conf in stored.confidences):
        return False  # an object below its own threshold: not the model's answer
    if cap is None:
        return True
    m0, m = stored.params.get(cap), asked.get(cap)
    if m0 is None or m is None or len(stored.objects) > m0:
        return False
    return (
        m <= m0
        or len(stored.objects) < m0
        or (bool(stored.confidences) and stored.confidences[-1] < c)
    )


def derive(type_: str, stored: Stored, asked: Mapping[str, int]) -> bytes:
    """The data prefix (``gateway.core.envelope``) of the answer to ``asked``; ``usable`` first."""
    threshold, cap = DERIVABLE[type_]
    c = asked[threshold]
    kept = [o for o, conf in zip(stored.objects, stored.confidences, strict=True) if conf >= c]
    if cap is not None:
        kept = kept[: asked[cap]]
    return data_prefix({k: (kept if k == "objects" else v) for k, v in stored.data.items()})


def looseness(type_: str, params: Mapping[str, int]) -> tuple[int, int]:
    """Sort key: the loosest stored answer first (lowest threshold, then largest cap)."""
    threshold, cap = DERIVABLE[type_]
    return (params.get(threshold, 0), -params.get(cap, 0) if cap else 0)


def best(
    type_: str, candidates: Iterable[tuple[str, bytes]], asked: Mapping[str, int]
) -> tuple[int, Stored] | None:
    """Of ``(params_text, data_prefix)`` candidates, the index and parse of the loosest
    one that answers ``asked``."""
    found: list[tuple[tuple[int, int], int, Stored]] = []
    for n, (text, prefix) in enumerate(candidates):
        stored = Stored.parse(text, prefix)
        if stored is not None and usable(type_, stored, asked):
            found.append((looseness(type_, stored.params), n, stored))
    if not found:
        return None
    _, n, stored = min(found, key=lambda f: (f[0], f[1]))
    return n, stored


def widened(type_: str, asked: Mapping[str, int], widen_max_labels: int) -> Params:
    """The parameters a widened miss is forwarded with: threshold 0, a wide label cap."""
    threshold, cap = DERIVABLE[type_]
    values = dict(asked)
    values[threshold] = 0
    if cap is not None:
        values[cap] = max(widen_max_labels, asked[cap])
    return Params(values)
