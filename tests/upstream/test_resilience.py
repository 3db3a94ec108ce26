"""Upstream faults through the simulator: retries only where nothing was billed, the circuit
breaker, load shedding, stale-if-error, and exact refunds."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import requests

from gateway.devtools.sample_images import make_png, make_png_of_size
from tests.support import (
    TEAM_KEYS,
    UPSTREAM_KEY,
    Gateway,
    GatewayFactory,
    Sim,
    free_port,
    objects_form,
    post_requests,
)
from tests.support.prometheus import ALERTS, rules_without_annotations, run, tool

SEARCH = TEAM_KEYS["search"]


async def charged(gw: Gateway) -> int:
    return await gw.state.store.used("search", gw.state.ledger.period())


async def undelivered(gw: Gateway) -> int:
    rows = await gw.state.store.usage(gw.state.ledger.period())
    return sum(u.undelivered for u in rows if u.team == "search")


def upstream_counts(gw: Gateway) -> dict[str, float]:
    """gateway_upstream_requests_total by status, the objects type, nonzero only."""
    out: dict[str, float] = {}
    for metric in gw.state.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "gateway_upstream_requests_total" and sample.value:
                if sample.labels["type"] == "objects":
                    out[sample.labels["status"]] = sample.value
    return out


async def test_a_503_before_processing_is_retried_once_and_charged_once(
        gateway: Gateway, sim: Sim) -> None:
    sim.state.fault, sim.state.fault_count = "503", 1
    r = await post_requests(gateway.url, *objects_form(SEARCH, make_png(1)))
    assert r.status_code == 200
    assert sim.state.calls == 2 and await charged(gateway) == 1
    assert upstream_counts(gateway) == {"503": 1, "200": 1}  # every attempt counted


async def test_a_persistent_503_gives_502_after_bounded_retries(gateway: Gateway,
                                                                sim: Sim) -> None:
    sim.state.fault = "503"
    r = await post_requests(gateway.url, *objects_form(SEARCH, make_png(2)))
    assert r.status_code == 502
    assert sim.state.calls == 3 and await charged(gateway) == 0
    assert upstream_counts(gateway) == {"503": 3}


async def test_a_sent_request_that_fails_is_never_retried(gateway: Gateway, sim: Sim) -> None:
    for fault in ("500", "reset", "garbage"):
        sim.state.fault, sim.state.fault_count = fault, 1
        calls = sim.state.calls
        r = await post_requests(gateway.url, *objects_form(SEARCH, make_png(3)))
        assert r.status_code == 502
        assert sim.state.calls == calls + 1, fault
    # Each reached the upstream, which may have billed it: charged, counted undelivered.
    assert await charged(gateway) == 3 and await undelivered(gateway) == 3
    # A non-envelope 200 (garbage) is an error, not a success; a reset is an error.
    assert upstream_counts(gateway) == {"500": 1, "error": 2}


async def test_unreachable_upstream_is_retried_then_502_and_not_charged(
        gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(upstream={"url": f"http://127.0.0.1:{free_port()}/api/v2/"})
    r = await post_requests(gw.url, *objects_form(SEARCH, make_png(4)))
    assert r.status_code == 502 and r.json()["data"] is None
    assert await charged(gw) == 0


async def test_breaker_opens_answers_503_at_once_then_probes_and_closes(
        gateway_factory: GatewayFactory, sim: Sim) -> None:
    gw = await gateway_factory(upstream={"breaker_failures": 3, "breaker_cooldown_s": 0.5})
    sim.state.fault = "500"
    codes = [(await post_requests(gw.url, *objects_form(SEARCH, make_png(10 + i)))).status_code
             for i in range(3)]
    assert codes == [502, 502, 502] and sim.state.calls == 3
    started = time.monotonic()
    refused = await post_requests(gw.url, *objects_form(SEARCH, make_png(20)))
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
    assert time.monotonic() - started < 0.5 and sim.state.calls == 3  # no upstream call
    assert gw.state.metrics.upstream_breaker_state._value.get() == 1
    await asyncio.sleep(0.6)
    sim.state.fault = "none"
    probe = await post_requests(gw.url, *objects_form(SEARCH, make_png(21)))
    assert probe.status_code == 200
    assert gw.state.metrics.upstream_breaker_state._value.get() == 0
    after = await post_requests(gw.url, *objects_form(SEARCH, make_png(22)))
    assert after.status_code == 200
    assert await charged(gw) == 5 and await undelivered(gw) == 3  # the 500s reached upstream


async def test_cache_hits_are_served_while_the_breaker_is_open(
        gateway_factory: GatewayFactory, sim: Sim) -> None:
    gw = await gateway_factory(upstream={"breaker_failures": 1, "breaker_cooldown_s": 30})
    image = make_png(30)
    assert (await post_requests(gw.url, *objects_form(SEARCH, image))).status_code == 200
    sim.state.fault = "500"
    assert (await post_requests(gw.url, *objects_form(SEARCH, make_png(31)))).status_code == 502
    hit = await post_requests(gw.url, *objects_form(SEARCH, image))
    assert hit.status_code == 200 and "; hit;" in hit.headers["Cache-Status"]


async def test_upstream_queue_overflow_is_shed_with_503(gateway_factory: GatewayFactory,
                                                        sim: Sim) -> None:
    gw = await gateway_factory(upstream={"max_concurrency": 1, "max_queue": 1})
    sim.state.latency_ms = 400
    results = await asyncio.gather(*(post_requests(gw.url, *objects_form(SEARCH, make_png(40 + i)))
                                     for i in range(4)))
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 200, 503, 503]
    assert await charged(gw) == 2 and sim.state.calls == 2


async def test_slow_trickle_past_the_timeout_is_504_and_stays_charged(
        gateway_factory: GatewayFactory, sim: Sim) -> None:
    gw = await gateway_factory(upstream={"timeout_s": 1})
    sim.state.fault, sim.state.fault_count = "trickle", 1
    r = await post_requests(gw.url, *objects_form(SEARCH, make_png(50)))
    assert r.status_code == 504
    # The upstream had the request and was answering: it may bill it.
    assert await charged(gw) == 1 and await undelivered(gw) == 1


async def test_flapping_upstream_charges_every_sent_call_and_counts_the_undelivered(
        gateway_factory: GatewayFactory, sim: Sim) -> None:
    gw = await gateway_factory(upstream={"breaker_failures": 100})
    ok = 0
    for i in range(12):
        sim.state.fault = ("500", "none", "reset", "none", "garbage", "none")[i % 6]
        r = await post_requests(gw.url, *objects_form(SEARCH, make_png(60 + i)))
        ok += r.status_code == 200
    assert ok == 6 and await charged(gw) == 12 and await undelivered(gw) == 6


async def test_stale_if_error_serves_an_expired_entry_marked_stale(
        gateway_factory: GatewayFactory, sim: Sim) -> None:
    now = [1_800_000_000.0]
    gw = await gateway_factory(cache={"ttl_days": 1, "stale_if_error_days": 1},
                               clock=lambda: now[0])
    image = make_png(70)
    fresh = await post_requests(gw.url, *objects_form(SEARCH, image))
    assert fresh.status_code == 200
    now[0] += 86400 + 3600  # an hour past the TTL
    sim.state.fault = "500"
    stale = await post_requests(gw.url, *objects_form(SEARCH, image))
    assert stale.status_code == 200
    # An hour past a day's freshness: ttl -3600 (RFC 9211), said to be stale both ways.
    assert stale.headers["Cache-Status"] == (
        "imagerecognize-gateway; hit; ttl=-3600; detail=stale-if-error")
    assert stale.headers["Warning"] == '110 imagerecognize-gateway "Response is Stale"'
    assert stale.json()["data"]["objects"] == fresh.json()["data"]["objects"]
    assert await charged(gw) == 2  # the failed refresh reached the upstream: kept charged
    assert await undelivered(gw) == 1
    # The good entry was not overwritten: once the upstream is back it is refreshed.
    sim.state.fault = "none"
    refreshed = await post_requests(gw.url, *objects_form(SEARCH, image))
    assert refreshed.headers["Cache-Status"] == "imagerecognize-gateway; fwd=stale; stored"
    # Past the grace an error is an error.
    now[0] += 3 * 86400
    sim.state.fault = "500"
    late = await post_requests(gw.url, *objects_form(SEARCH, image))
    assert late.status_code == 502


def hostile_upload(key: str, image: bytes) -> tuple[bytes, dict[str, str]]:
    """A multipart body whose file part names itself with CR/LF (RFC 5987 ``filename*``)."""
    boundary = "hostile-boundary-7f3a"
    fields = {"apikey": key, "type": "objects", "max_labels": "10", "min_confidence": "80"}
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items())
    body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
             f"filename*=UTF-8''evil%0D%0AX-Injected%3A%201%0D%0A.png\r\n"
             f"Content-Type: image/png\r\n\r\n").encode()
    body += image + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


async def test_a_probe_with_a_large_hostile_upload_closes_the_breaker(
        gateway_factory: GatewayFactory, sim: Sim) -> None:
    """Once a 500 and a breaker stuck probing for ever; now the upload is sent, sanitized."""
    gw = await gateway_factory(upstream={"breaker_failures": 1, "breaker_cooldown_s": 60})
    sim.state.fault, sim.state.fault_count = "500", 1
    assert (await post_requests(gw.url, *objects_form(SEARCH, make_png(80)))).status_code == 502
    gw.state.upstream.breaker.opened_at = -1e9  # the cooldown is over: the next call probes
    image = make_png_of_size(1_200_000, 81)  # past the in-memory limit: spooled to disk
    body, headers = hostile_upload(SEARCH, image)
    r = await asyncio.to_thread(requests.post, gw.url, data=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    assert sim.state.history[-1]["file_sha256"] == hashlib.sha256(image).hexdigest()
    assert gw.state.metrics.upstream_breaker_state._value.get() == 0
    assert (await post_requests(gw.url, *objects_form(SEARCH, make_png(82)))).status_code == 200


async def test_hostile_upstream_answers_are_502_and_the_breaker_recovers(
        gateway_factory: GatewayFactory, sim: Sim) -> None:
    gw = await gateway_factory(upstream={"breaker_failures": 1, "breaker_cooldown_s": 60})
    sim.state.fault, sim.state.fault_count = "500", 1
    assert (await post_requests(gw.url, *objects_form(SEARCH, make_png(89)))).status_code == 502
    for i, fault in enumerate(("deep", "redirect")):  # each one a probe that fails
        gw.state.upstream.breaker.opened_at = -1e9
        sim.state.fault, sim.state.fault_count = fault, 1
        calls = sim.state.calls
        r = await post_requests(gw.url, *objects_form(SEARCH, make_png(90 + i)))
        assert r.status_code == 502 and r.json()["data"] is None, fault
        assert sim.state.calls == calls + 1  # the redirect was not followed
    gw.state.upstream.breaker.opened_at = -1e9
    assert (await post_requests(gw.url, *objects_form(SEARCH, make_png(95)))).status_code == 200
    assert gw.state.metrics.upstream_breaker_state._value.get() == 0


async def test_an_upstream_echoing_the_key_relays_no_key(gateway: Gateway, sim: Sim) -> None:
    sim.state.fault, sim.state.fault_count = "echo", 1
    r = await post_requests(gateway.url, *objects_form(SEARCH, make_png(96)))
    assert r.status_code == 430
    message = r.json()["status_message"]
    assert "max_labels=10" in message and "\r" not in message and "\n" not in message
    assert UPSTREAM_KEY not in r.text and UPSTREAM_KEY[:8] not in r.text


BREAKER_RULE_TESTS = """
rule_files: [alerts.yml]
evaluation_interval: 1m
tests:
  - name: a breaker out of closed while misses arrive is critical; a quiet one is not
    interval: 1m
    input_series:
      - series: 'gateway_upstream_breaker_state{job="g",instance="failing"}'
        values: '0 0 0 1 2 1 2 1 2 1 2 1 2 1 2'
      - series: 'gateway_upstream_requests_total{job="g",instance="failing",status="500"}'
        values: '0+6x14'
      - series: 'gateway_upstream_breaker_state{job="g",instance="quiet"}'
        values: '1x14'
      - series: 'gateway_upstream_requests_total{job="g",instance="quiet",status="500"}'
        values: '5x14'
      - series: 'gateway_upstream_breaker_state{job="g",instance="recovered"}'
        values: '0 1 2 0 0 0 0 0 0 0 0 0 0 0 0'
      - series: 'gateway_upstream_requests_total{job="g",instance="recovered",status="200"}'
        values: '0+6x14'
    alert_rule_test:
      - {eval_time: 4m, alertname: GatewayUpstreamBreakerOpen, exp_alerts: []}
      - eval_time: 10m
        alertname: GatewayUpstreamBreakerOpen
        exp_alerts: [{exp_labels: {severity: critical, instance: failing}}]
"""


def test_the_breaker_alert_fires_while_misses_are_refused(tmp_path: Path) -> None:
    (tmp_path / "alerts.yml").write_text(rules_without_annotations(ALERTS.read_text()))
    (tmp_path / "tests.yml").write_text(BREAKER_RULE_TESTS)
    result = run(tool("promtool"), "test", "rules", "tests.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
