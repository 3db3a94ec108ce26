"""The analysis types of the ImageRecognize v2 API and their parameters (docs/upstream-api-v2.txt:
its params and type tables): the one table that the config, the cache key, derivation, the
metrics and the form parser read. A value leaf at the floor of the layers: it imports nothing of
the gateway.

The simulator (``gateway.devtools.sim``) keeps its own copy on purpose, as an independent
reference of the seed document; ``tests/core/test_cache_key.py`` checks the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

INT_MAX = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    low: int
    high: int


@dataclass(frozen=True, slots=True)
class AnalysisType:
    name: str
    params: tuple[Param, ...] = ()  # every one required, in canonical (key) order
    threshold: str | None = None  # a lower confidence bound: answers keep objects >= it
    cap: str | None = None  # a maximum count of objects, highest confidence first


TYPES: dict[str, AnalysisType] = {
    t.name: t
    for t in (
        AnalysisType(
            "objects",
            (Param("max_labels", 1, INT_MAX), Param("min_confidence", 0, 100)),
            threshold="min_confidence",
            cap="max_labels",
        ),
        AnalysisType("celebrities"),
        AnalysisType("detect_faces"),
        AnalysisType("detect_text"),
        AnalysisType("nsfw", (Param("nsfw_min_confidence", 0, 100),),
                     threshold="nsfw_min_confidence"),
    )
}
ANALYSIS_TYPES = tuple(TYPES)
# The types a stricter request can be derived for: (threshold, cap or None).
DERIVABLE: dict[str, tuple[str, str | None]] = {
    t.name: (t.threshold, t.cap) for t in TYPES.values() if t.threshold is not None
}
