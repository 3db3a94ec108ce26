"""What a cached result is keyed on, through a real gateway with the simulator as upstream.

A parameter left out of the key serves one caller's answer to another who asked something else
(a mutation run dropped ``min_confidence`` from the key and the rest of the suite still passed);
a parameter a type does not use, kept in the key, pays the upstream again for the same answer.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core import cache_key as cache_key_module
from gateway.core.cache_key import TYPE_PARAMS, analysis_params, cache_key
from gateway.core.errors import InvalidParameter
from gateway.devtools.sample_images import make_png
from tests.support import TEAM_KEYS, Gateway, GatewayFactory, Sim, post_requests

KEY = TEAM_KEYS["search"]
MISS = "imagerecognize-gateway; fwd=miss; stored"
# Values every parameter accepts, and a second value that changes the simulator's answer for
# every image: a higher threshold drops candidates (its confidences are 30.00-99.99), one label
# instead of several cuts the list (it sees at least three).
BASE = {"max_labels": "10", "min_confidence": "0", "nsfw_min_confidence": "0"}
OTHER = {"max_labels": "1", "min_confidence": "100", "nsfw_min_confidence": "100"}
ALL_PARAMS = sorted(BASE)

EVERY_PARAMETER = [
    pytest.param(type_, name, id=f"{type_}-{name}")
    for type_, params in TYPE_PARAMS.items() for name, _, _ in params
]


@pytest.fixture(autouse=True)
def parse_afresh() -> None:
    # Parsed values are cached process-wide; mutmut forks each mutant's run from a process whose
    # cache is already full, so without this the mutated parsing code would never run.
    cache_key_module._parse.cache_clear()


def form(type_: str, **values: str) -> dict[str, str]:
    used = {name: BASE[name] for name, _, _ in TYPE_PARAMS[type_]}
    return {"apikey": KEY, "type": type_, **used, **values}


async def send(gw: Gateway, fields: dict[str, str], image: bytes) -> tuple[str, Any]:
    r = await post_requests(gw.url, fields, {"file": image})
    assert r.status_code == 200, r.text
    return r.headers["Cache-Status"], r.json()["data"]["objects"]


def test_every_parameter_is_in_the_table_below() -> None:
    # The tables here cover every parameter the gateway knows; a new one needs values here.
    assert {name for params in TYPE_PARAMS.values() for name, _, _ in params} == set(ALL_PARAMS)


@pytest.mark.parametrize(("type_", "name"), EVERY_PARAMETER)
async def test_each_parameter_a_type_uses_is_part_of_the_key(
        gateway_factory: GatewayFactory, sim: Sim, type_: str, name: str) -> None:
    # Exact keys only: with derivation on, the stricter second request would be answered
    # from the first (tests/core/test_derive.py).
    gateway = await gateway_factory(cache={"derive": False})
    image = make_png(4100 + ALL_PARAMS.index(name))
    first_status, first = await send(gateway, form(type_), image)
    second_status, second = await send(gateway, form(type_, **{name: OTHER[name]}), image)
    # Both paid for: the second asked something else and the upstream was asked it.
    assert (first_status, second_status) == (MISS, MISS)
    assert sim.state.calls == 2
    assert sim.state.history[-1]["fields"][name] == OTHER[name]
    assert first != second, "the two values must give different answers"
    # Each is now stored under its own key: asked again, each gets its own answer, free.
    again_first = await send(gateway, form(type_), image)
    again_second = await send(gateway, form(type_, **{name: OTHER[name]}), image)
    assert again_first[1] == first and again_second[1] == second
    assert again_first[0].startswith("imagerecognize-gateway; hit; ttl=")
    assert again_second[0].startswith("imagerecognize-gateway; hit; ttl=")
    assert sim.state.calls == 2


@pytest.mark.parametrize("type_", list(TYPE_PARAMS))
async def test_parameters_a_type_does_not_use_leave_the_key_alone(
        gateway: Gateway, sim: Sim, type_: str) -> None:
    image = make_png(4200 + list(TYPE_PARAMS).index(type_))
    _, paid = await send(gateway, form(type_), image)
    used = {name for name, _, _ in TYPE_PARAMS[type_]}
    unused = [name for name in ALL_PARAMS if name not in used]
    for values in ({n: OTHER[n] for n in unused}, {n: "bogus" for n in unused}):
        status, answer = await send(gateway, form(type_, **values), image)
        assert status.startswith("imagerecognize-gateway; hit; ttl="), (values, status)
        assert answer == paid
    assert sim.state.calls == 1


async def test_the_same_image_under_each_type_is_its_own_result(
        gateway: Gateway, sim: Sim) -> None:
    image = make_png(4300)
    answers = {}
    for type_ in TYPE_PARAMS:
        status, answers[type_] = await send(gateway, form(type_), image)
        assert status == MISS, type_
    assert sim.state.calls == len(TYPE_PARAMS)
    for type_ in TYPE_PARAMS:
        status, answer = await send(gateway, form(type_), image)
        assert status.startswith("imagerecognize-gateway; hit; ttl=") and answer == answers[type_]
    assert sim.state.calls == len(TYPE_PARAMS)


# -- the key text itself: what a stored entry is found by -------------------------------------
H = "0" * 32


@pytest.mark.parametrize(("type_", "fields", "key"), [
    pytest.param("objects", {"max_labels": "10", "min_confidence": "80"},
                 f"{H}/objects?max_labels=10&min_confidence=80", id="objects"),
    pytest.param("objects", {"min_confidence": " 080 ", "max_labels": "010"},
                 f"{H}/objects?max_labels=10&min_confidence=80", id="objects-normalised"),
    pytest.param("objects", {"max_labels": "1", "min_confidence": "0"},
                 f"{H}/objects?max_labels=1&min_confidence=0", id="objects-lowest"),
    pytest.param("objects", {"max_labels": "2147483647", "min_confidence": "100"},
                 f"{H}/objects?max_labels=2147483647&min_confidence=100", id="objects-highest"),
    pytest.param("objects", {"max_labels": "0" * 5000 + "5", "min_confidence": "5"},
                 f"{H}/objects?max_labels=5&min_confidence=5", id="objects-5000-leading-zeros"),
    pytest.param("objects", {"max_labels": "00000", "min_confidence": "5"}, None,
                 id="objects-zeros-are-zero"),
    pytest.param("nsfw", {"nsfw_min_confidence": "0", "max_labels": "3"},
                 f"{H}/nsfw?nsfw_min_confidence=0", id="nsfw"),
    pytest.param("celebrities", {"max_labels": "3", "min_confidence": "1"},
                 f"{H}/celebrities", id="celebrities"),
])
def test_key_text(type_: str, fields: dict[str, str], key: str | None) -> None:
    # Stored entries are found by this text: changing it strands every stored result.
    if key is None:
        with pytest.raises(InvalidParameter):
            analysis_params(type_, fields)
        return
    params = analysis_params(type_, fields)
    assert cache_key(H, type_, params) == key
    assert cache_key(H, type_, dict(params)) == key  # a plain mapping gives the same text
    assert cache_key(H, type_, params, "ads") == f"ads|{key}"


@pytest.mark.parametrize(("type_", "fields", "name", "message"), [
    pytest.param("objects", {"max_labels": "0", "min_confidence": "5"}, "max_labels",
                 "must be an integer > 0", id="max-labels-0"),
    pytest.param("objects", {"max_labels": "2147483648", "min_confidence": "5"}, "max_labels",
                 "must be an integer > 0", id="max-labels-past-int32"),
    pytest.param("objects", {"max_labels": "9" * 5000, "min_confidence": "5"}, "max_labels",
                 "must be an integer > 0", id="max-labels-5000-digits"),
    pytest.param("objects", {"max_labels": "+5", "min_confidence": "5"}, "max_labels",
                 "must be an integer > 0", id="max-labels-plus"),
    pytest.param("objects", {"max_labels": "\u0665", "min_confidence": "5"}, "max_labels",
                 "must be an integer > 0", id="max-labels-arabic-digit"),
    pytest.param("objects", {"max_labels": "5"}, "min_confidence",
                 "must be an integer between 0 and 100", id="confidence-missing"),
    pytest.param("objects", {"max_labels": "5", "min_confidence": "101"}, "min_confidence",
                 "must be an integer between 0 and 100", id="confidence-101"),
    pytest.param("nsfw", {"nsfw_min_confidence": ""}, "nsfw_min_confidence",
                 "must be an integer between 0 and 100", id="nsfw-empty"),
])
def test_out_of_range_is_refused_naming_the_parameter(
        type_: str, fields: dict[str, str], name: str, message: str) -> None:
    with pytest.raises(InvalidParameter) as caught:
        analysis_params(type_, fields)
    assert (caught.value.status, caught.value.parameter) == (430, name)
    assert caught.value.message == f"Invalid parameter {name}: {message}"


def test_the_one_table_of_types_agrees_with_the_independent_simulator() -> None:
    """gateway.analysis is the table every module reads; the simulator keeps its own reading of
    the seed on purpose. They must agree on the types, each type's parameters and their lower
    bounds (the simulator has no upper bound on max_labels; the gateway caps it at int32)."""
    from gateway import analysis
    from gateway.devtools import sim as simulator

    assert simulator.TYPES == (*analysis.ANALYSIS_TYPES, "cache")
    for t in analysis.TYPES.values():
        at_low = {p.name: str(p.low) for p in t.params}
        assert simulator._check_params(t.name, at_low) == {p.name: p.low for p in t.params}
        for p in t.params:
            with pytest.raises(simulator._Rejected):
                simulator._check_params(t.name, {**at_low, p.name: str(p.low - 1)})
    assert set(analysis.DERIVABLE) == {"objects", "nsfw"}
