"""Observability: the metrics contract (docs/observability.md, "Metrics"), the Prometheus
config and alert rules, and the Grafana dashboard, checked against a real gateway scraped by a
real Prometheus.

Needs ``promtool`` and ``prometheus`` (Debian: ``apt-get install -y prometheus``); without them
these tests fail, they are not skipped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from gateway.devtools.sample_images import make_jpeg, make_png
from tests.support import (
    TEAM_KEYS,
    UPSTREAM_KEY,
    Gateway,
    Sim,
    free_port,
    objects_form,
    post_requests,
)
from tests.support.prometheus import ALERTS, rules_without_annotations, run, tool

ROOT = Path(__file__).resolve().parents[2]  # the repository
PROMETHEUS_CONFIG = ROOT / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "grafana" / "dashboards" / "gateway.json"
DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = ROOT / "grafana" / "provisioning" / "dashboards" / "gateway.yml"

BAD_KEY = "not-a-team-key-at-all"
QUOTAS = {"search": 1000, "ads": 1000, "tiny": 3}
ANALYSIS_TYPES = {"objects", "celebrities", "detect_faces", "detect_text", "nsfw"}
# docs/observability.md's metrics table, as prometheus_client's parser names the families
# (counters without _total).
CONTRACT: dict[str, tuple[str, set[str]]] = {
    "gateway_requests": ("counter", {"team", "type", "status", "cache"}),
    "gateway_request_duration_seconds": ("histogram", {"type", "cache"}),
    "gateway_upstream_requests": ("counter", {"type", "status"}),
    "gateway_upstream_request_duration_seconds": ("histogram", {"type"}),
    "gateway_upstream_calls_saved": ("counter", {"team", "type"}),
    "gateway_quota_used": ("gauge", {"team"}),
    "gateway_quota_limit": ("gauge", {"team"}),
    "gateway_upstream_quota_remaining": ("gauge", set()),
    "gateway_cache_entries": ("gauge", set()),
    "gateway_cache_size_bytes": ("gauge", set()),
    "gateway_inflight_requests": ("gauge", set()),
}
METRIC_NAME = re.compile(r"\bgateway_[a-z0-9_]+")
LABEL_VALUES = re.compile(r"label_values\((?:(.+),\s*)?(\w+)\)")
# Dashboard queries the workload leaves empty, with the reason. None: the workload includes an
# upstream failure, a 402 and a 401, and the error-ratio panels fall back to `or vector(0)`.
ALLOWED_EMPTY: dict[str, str] = {}


# -- the workload ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Answered:
    team: str      # the metric's team label: "unknown" for a bad key
    status: str
    cache: str     # hit | miss | coalesced | none, read from the Cache-Status header


def cache_outcome(response: requests.Response) -> str:
    header = response.headers.get("Cache-Status", "")
    if "detail=coalesced" in header:
        return "coalesced"
    if "; hit" in header:
        return "hit"
    if "fwd=" in header:
        return "miss"
    return "none"


async def run_workload(gw: Gateway, sim: Sim) -> list[Answered]:
    """Misses, hits (across teams), coalesced duplicates, a team over quota, a bad key and a
    failed upstream call. Returns what each client saw."""
    answered: list[Answered] = []

    async def send(team: str, image: bytes) -> requests.Response:
        r = await post_requests(gw.url, *objects_form(TEAM_KEYS.get(team, BAD_KEY), image))
        answered.append(Answered(team, str(r.status_code), cache_outcome(r)))
        return r

    for seed in (1, 2, 3):
        assert (await send("search", make_png(seed))).status_code == 200
    for seed in (1, 2, 3):
        await send("search", make_png(seed))
    await send("ads", make_png(1))                       # a hit: results are shared
    await send("ads", make_jpeg(4))                      # an ads miss
    sim.state.latency_ms = 500
    await asyncio.gather(*(send("ads", make_png(5)) for _ in range(6)))
    sim.state.latency_ms = 0
    for seed in (6, 7, 8, 9):                            # quota 3: the 4th is 402
        await send("tiny", make_png(seed))
    await send("tiny", make_png(6))                      # hits stay free over quota
    await send("unknown", make_png(1))                   # bad key: 401
    sim.state.fault, sim.state.fault_count = "500", 1
    await send("search", make_png(10))                   # upstream 500: 502, charge kept

    seen = Counter((a.team, a.status, a.cache) for a in answered)
    assert seen[("search", "200", "miss")] == 3 and seen[("search", "200", "hit")] == 3
    assert seen[("ads", "200", "miss")] == 2, "one ads miss, one leader of the coalesced burst"
    assert seen[("ads", "200", "coalesced")] >= 1, seen
    assert seen[("tiny", "200", "miss")] == 3 and seen[("tiny", "402", "none")] == 1
    assert seen[("tiny", "200", "hit")] == 1
    assert seen[("unknown", "401", "none")] == 1 and seen[("search", "502", "none")] == 1
    return answered


# -- /metrics --------------------------------------------------------------------------------
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_samples(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: Samples, name: str, by: tuple[str, ...] = (), **match: str
          ) -> dict[tuple[str, ...], float]:
    """Sum of the samples of ``name`` matching ``match``, grouped by the labels ``by``;
    zero groups left out."""
    out: Counter[tuple[str, ...]] = Counter()
    for (sample_name, labels), value in samples.items():
        labels_ = dict(labels)
        if sample_name == name and all(labels_.get(k) == v for k, v in match.items()):
            out[tuple(labels_[k] for k in by)] += value
    return {k: v for k, v in out.items() if v}


async def scrape(gw: Gateway) -> str:
    r = await asyncio.to_thread(requests.get, f"{gw.base}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    return r.text


# -- dashboard and rules ---------------------------------------------------------------------
def load_dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query-type template variable."""
    queries = [(f"panel {p['title']!r} target {t['refId']}", t["expr"])
               for p in all_panels(dashboard["panels"]) for t in p.get("targets", [])
               if t.get("expr")]
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        # label_values() is Grafana's, not PromQL: ask for the same series.
        m = LABEL_VALUES.fullmatch(query.strip())
        if m:
            selector = m[1] or "{" + m[2] + '!=""}'
            query = f"group by ({m[2]}) ({selector})"
        queries.append((f"variable {var['name']}", query))
    return queries


def concrete(expr: str) -> str:
    """The query Grafana would send with team=All, price_per_call=0.001 and 30s intervals."""
    assert not re.search(r'(?<!=~")\$\{?team', expr), f"$team outside a =~ matcher: {expr}"
    expr = re.sub(r"\$\{team(?::\w+)?\}|\$team\b", ".*", expr)
    expr = re.sub(r"\$\{?__(?:rate_interval|interval|range)\}?", "30s", expr)
    expr = re.sub(r"\$\{price_per_call\}|\$price_per_call\b", "0.001", expr)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


# -- static checks ---------------------------------------------------------------------------
def test_alert_rules_pass_promtool() -> None:
    result = run(tool("promtool"), "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    shutil.copy(PROMETHEUS_CONFIG, tmp_path / "prometheus.yml")
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    result = run(tool("promtool"), "check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    text = PROMETHEUS_CONFIG.read_text()
    for expected in ("gateway:8080", "metrics_path: /metrics", "scrape_interval: 15s",
                     "- alerts.yml"):
        assert expected in text


RULE_TESTS = """
rule_files: [alerts.yml]
evaluation_interval: 1m
tests:
  - name: team quota at 80% warns, at 100% is critical, two replicas count once
    interval: 1m
    input_series:
      - series: 'gateway_quota_used{job="g",instance="a",team="search"}'
        values: '850x15'
      - series: 'gateway_quota_used{job="g",instance="b",team="search"}'
        values: '850x15'
      - series: 'gateway_quota_limit{job="g",instance="a",team="search"}'
        values: '1000x15'
      - series: 'gateway_quota_limit{job="g",instance="b",team="search"}'
        values: '1000x15'
      - series: 'gateway_quota_used{job="g",instance="a",team="tiny"}'
        values: '3x15'
      - series: 'gateway_quota_limit{job="g",instance="a",team="tiny"}'
        values: '3x15'
      - series: 'gateway_quota_used{job="g",instance="a",team="ads"}'
        values: '10x15'
      - series: 'gateway_quota_limit{job="g",instance="a",team="ads"}'
        values: '1000x15'
      - series: 'gateway_quota_used{job="g",instance="a",team="off"}'
        values: '0x15'
      - series: 'gateway_quota_limit{job="g",instance="a",team="off"}'
        values: '0x15'
    alert_rule_test:
      - {eval_time: 3m, alertname: GatewayTeamQuotaHigh, exp_alerts: []}
      - eval_time: 10m
        alertname: GatewayTeamQuotaHigh
        exp_alerts: [{exp_labels: {severity: warning, team: search}}]
      - eval_time: 10m
        alertname: GatewayTeamQuotaExhausted
        exp_alerts: [{exp_labels: {severity: critical, team: tiny}}]

  - name: upstream account quota low, but not while still unknown
    interval: 1m
    input_series:
      - series: 'gateway_upstream_quota_remaining{job="g",instance="fresh"}'
        values: 'NaN NaN NaN NaN NaN NaN NaN NaN NaN NaN NaN
                 NaN NaN NaN NaN NaN NaN NaN NaN NaN NaN'
      - series: 'gateway_upstream_requests_total{job="g",instance="fresh",status="200"}'
        values: '0x20'
      - series: 'gateway_upstream_quota_remaining{job="g",instance="low"}'
        values: '500x20'
      - series: 'gateway_upstream_requests_total{job="g",instance="low",status="200"}'
        values: '0+1x20'
      - series: 'gateway_upstream_quota_remaining{job="g",instance="empty"}'
        values: '0x20'
      - series: 'gateway_upstream_requests_total{job="g",instance="empty",status="402"}'
        values: '0+1x20'
      - series: 'gateway_upstream_quota_remaining{job="g",instance="restarted"}'
        values: '700x20'
      - series: 'gateway_upstream_requests_total{job="g",instance="restarted",status="200"}'
        values: '0x20'
      - series: 'gateway_upstream_quota_remaining{job="g",instance="plenty"}'
        values: '50000x20'
      - series: 'gateway_upstream_requests_total{job="g",instance="plenty",status="200"}'
        values: '0+1x20'
    alert_rule_test:
      - eval_time: 15m
        alertname: GatewayUpstreamQuotaLow
        exp_alerts:
          - {exp_labels: {severity: warning, job: g, instance: low}}
          - {exp_labels: {severity: warning, job: g, instance: empty}}
          - {exp_labels: {severity: warning, job: g, instance: restarted}}
      - eval_time: 15m
        alertname: GatewayUpstreamQuotaExhausted
        exp_alerts: [{exp_labels: {severity: critical}}]

  - name: upstream refuses the key
    interval: 1m
    input_series:
      - series: 'gateway_upstream_requests_total{status="200"}'
        values: '0+10x10'
      - series: 'gateway_upstream_requests_total{status="401"}'
        values: '0+1x10'
    alert_rule_test:
      - eval_time: 5m
        alertname: GatewayUpstreamCredentialsRefused
        exp_alerts: [{exp_labels: {severity: critical}}]

  - name: upstream errors and timeouts are told apart
    interval: 1m
    input_series:
      - series: 'gateway_upstream_requests_total{status="200"}'
        values: '0+90x20'
      - series: 'gateway_upstream_requests_total{status="500"}'
        values: '0+5x20'
      - series: 'gateway_upstream_requests_total{status="error"}'
        values: '0+5x20'
      - series: 'gateway_upstream_requests_total{status="timeout"}'
        values: '0+1x20'
      - series: 'gateway_upstream_requests_total{status="412"}'
        values: '0+20x20'
    alert_rule_test:
      - eval_time: 12m
        alertname: GatewayUpstreamErrorRateHigh
        exp_alerts: [{exp_labels: {severity: warning}}]
      - {eval_time: 12m, alertname: GatewayUpstreamTimeoutsHigh, exp_alerts: []}

  - name: upstream timeouts
    interval: 1m
    input_series:
      - series: 'gateway_upstream_requests_total{status="200"}'
        values: '0+90x20'
      - series: 'gateway_upstream_requests_total{status="timeout"}'
        values: '0+10x20'
    alert_rule_test:
      - eval_time: 12m
        alertname: GatewayUpstreamTimeoutsHigh
        exp_alerts: [{exp_labels: {severity: warning}}]
      - {eval_time: 12m, alertname: GatewayUpstreamErrorRateHigh, exp_alerts: []}

  - name: gateway 5xx ratio
    interval: 1m
    input_series:
      - series: 'gateway_requests_total{team="search",status="200",cache="hit"}'
        values: '0+90x20'
      - series: 'gateway_requests_total{team="search",status="502",cache="none"}'
        values: '0+10x20'
    alert_rule_test:
      - eval_time: 12m
        alertname: GatewayHigh5xxRatio
        exp_alerts: [{exp_labels: {severity: critical}}]

  - name: only-if-cached misses are 504 by design, not a 5xx ratio
    interval: 1m
    input_series:
      - series: 'gateway_requests_total{team="search",status="200",cache="hit"}'
        values: '0+90x20'
      - series: 'gateway_requests_total{team="search",status="504",cache="only-if-cached"}'
        values: '0+10x20'
    alert_rule_test:
      - {eval_time: 12m, alertname: GatewayHigh5xxRatio, exp_alerts: []}

  - name: an audit mismatch is critical
    interval: 1m
    input_series:
      - series: 'gateway_cache_audits_total{type="objects",result="match"}'
        values: '0+1x20'
      - series: 'gateway_cache_audits_total{type="objects",result="mismatch"}'
        values: '0x10 1x10'
    alert_rule_test:
      - {eval_time: 5m, alertname: GatewayCacheModelMismatch, exp_alerts: []}
      - eval_time: 15m
        alertname: GatewayCacheModelMismatch
        exp_alerts: [{exp_labels: {severity: critical, type: objects}}]

  - name: cache hit ratio falls from 80% to 10%
    interval: 1m
    input_series:
      - series: 'gateway_requests_total{team="search",status="200",cache="hit"}'
        values: '0+48x1440 69120+6x120'
      - series: 'gateway_requests_total{team="search",status="200",cache="miss"}'
        values: '0+12x1440 17280+54x120'
    alert_rule_test:
      - {eval_time: 1d, alertname: GatewayCacheHitRatioCollapse, exp_alerts: []}
      - eval_time: 1d100m
        alertname: GatewayCacheHitRatioCollapse
        exp_alerts: [{exp_labels: {severity: warning}}]
"""


def test_alert_rules_fire_when_they_should(tmp_path: Path) -> None:
    (tmp_path / "alerts.yml").write_text(rules_without_annotations(ALERTS.read_text()))
    (tmp_path / "tests.yml").write_text(RULE_TESTS)
    result = run(tool("promtool"), "test", "rules", "tests.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_well_formed() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "imagerecognize-gateway"
    assert dashboard["title"] == "ImageRecognize gateway"
    assert 36 <= dashboard["schemaVersion"] <= 41

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    team = variables["team"]
    team_query = team["query"]["query"] if isinstance(team["query"], dict) else team["query"]
    assert team["type"] == "query" and team_query == "label_values(gateway_quota_limit, team)"
    assert team["multi"] and team["includeAll"]
    assert team["datasource"]["uid"] == "${datasource}"
    # Money comes from the gateway's [pricing] (gateway_upstream_call_price), not a text box.
    assert "price_per_call" not in variables

    panels = [p for p in all_panels(dashboard["panels"]) if p["type"] != "row"]
    ids = [p["id"] for p in all_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: dict[tuple[int, int], str] = {}
    for panel in all_panels(dashboard["panels"]):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in occupied, f"{panel['title']} overlaps {occupied[x, y]}"
                occupied[x, y] = panel["title"]
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == "${datasource}"

    exprs = " ".join(expr for _, expr in dashboard_queries(dashboard))
    used = {name.removesuffix("_total").removesuffix("_bucket")
            for name in METRIC_NAME.findall(exprs)}
    assert set(CONTRACT) <= used, f"metrics with no panel: {set(CONTRACT) - used}"
    assert "gateway_upstream_call_price" in exprs and "gateway_upstream_calls_by_team" in exprs
    quota_bars = [p for p in panels if p["type"] == "bargauge"
                  and "gateway_quota_used" in json.dumps(p["targets"])
                  and "gateway_quota_limit" in json.dumps(p["targets"])]
    assert quota_bars, "a bar gauge of quota used against the limit"

    # Calls are whole: increase() extrapolates to the range's edges (2.87 calls saved), so a
    # panel counting calls rounds in the query and shows no decimals, and money is whole
    # calls times the price.
    counting = call_count_panels(dashboard)
    assert {"Requests answered", "Upstream calls saved",
            "Upstream calls saved by team"} <= {p["title"] for p in counting}
    for panel in counting:
        assert panel["fieldConfig"]["defaults"]["decimals"] == 0, panel["title"]
        for target in panel["targets"]:
            assert target["expr"].startswith("round("), (panel["title"], target["expr"])
    money = [t["expr"] for p in panels for t in p["targets"]
             if "gateway_upstream_call_price" in t["expr"] and "increase(" in t["expr"]]
    assert money
    for expr in money:
        assert expr.count("increase(") == expr.count("round(increase("), expr


# Series growing at a steady pace, read over a range that does not end on a sample's edge:
# increase() extrapolates there (team a's 3 calls read 3.33), as on any live dashboard.
WHOLE_CALLS_INPUT = [
    {"series": 'gateway_upstream_calls_saved_total{team="a",type="objects"}', "values": "0+1x20"},
    {"series": 'gateway_upstream_calls_saved_total{team="b",type="objects"}', "values": "0+2x20"},
    {"series": 'gateway_requests_total{team="a",type="objects",status="200",cache="hit"}',
     "values": "0+1x20"},
    {"series": 'gateway_requests_total{team="a",type="objects",status="200",cache="derived"}',
     "values": "0+1x20"},
    {"series": 'gateway_upstream_calls_by_team_total{team="a",type="objects"}',
     "values": "0+1x20"},
    {"series": 'gateway_upstream_call_price{type="objects",currency="EUR"}', "values": "0.5x20"},
]
# (panel, legend) -> what it shows: whole calls, and money as whole calls times 0.5.
WHOLE_CALLS_SHOWN: dict[tuple[str, str], list[tuple[dict[str, str], float]]] = {
    ("Requests answered", "requests"): [({}, 7)],  # 3.33 + 3.33 requests
    ("Upstream calls saved", "calls saved"): [({}, 10)],  # 3.33 + 6.67
    ("Upstream calls saved", "calls saved by derivation"): [({}, 3)],
    ("Upstream calls saved by team", "{{team}}"): [({"team": "a"}, 3), ({"team": "b"}, 7)],
    ("Money saved", "all teams"): [({}, 5.0)],  # 3 x 0.5 + 7 x 0.5
    ("Money saved", "{{team}}"): [({"team": "a"}, 1.5), ({"team": "b"}, 3.5)],
    ("Upstream spend", "all teams"): [({}, 1.5)],
    ("Upstream spend", "{{team}}"): [({"team": "a"}, 1.5)],
}


def test_panels_counting_calls_show_whole_calls(tmp_path: Path) -> None:
    dashboard = load_dashboard()
    tests, seen = [], set()
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            where = (panel["title"], target.get("legendFormat", ""))
            if where not in WHOLE_CALLS_SHOWN:
                continue
            seen.add(where)
            expr = concrete(target["expr"]).replace("[30s]", "[50s]")
            samples = [{"labels": "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}",
                        "value": value} for labels, value in WHOLE_CALLS_SHOWN[where]]
            tests.append({"expr": expr, "eval_time": "5m", "exp_samples": samples})
    assert seen == set(WHOLE_CALLS_SHOWN), set(WHOLE_CALLS_SHOWN) - seen
    (tmp_path / "whole.yml").write_text(json.dumps({"tests": [{
        "interval": "15s", "input_series": WHOLE_CALLS_INPUT, "promql_expr_test": tests}]}))
    result = run(tool("promtool"), "test", "rules", "whole.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def call_count_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Stat and bar gauge panels that count calls or requests over the range."""
    return [p for p in all_panels(dashboard["panels"])
            if p["type"] in ("stat", "bargauge")
            and p["fieldConfig"]["defaults"].get("unit") == "short"
            and any("increase(" in t["expr"] for t in p["targets"])]


def test_grafana_provisioning() -> None:
    datasources = DATASOURCES.read_text()
    for expected in ("apiVersion: 1", "type: prometheus", "uid: prometheus",
                     "url: http://prometheus:9090"):
        assert expected in datasources
    providers = DASHBOARD_PROVIDERS.read_text()
    for expected in ("apiVersion: 1", "type: file", "path: /var/lib/grafana/dashboards"):
        assert expected in providers


# -- a real gateway ------------------------------------------------------------------------
async def test_metrics_match_the_workload(gateway: Gateway, sim: Sim) -> None:
    answered = await run_workload(gateway, sim)
    text = await scrape(gateway)
    samples = parse_samples(text)

    # The contract: every metric of docs/observability.md, its type, exactly its labels,
    # bounded values.
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, (kind, labels) in CONTRACT.items():
        assert name in families, f"{name} missing from /metrics"
        assert families[name].type == kind, name
        for sample in families[name].samples:
            assert set(sample.labels) - {"le"} == labels, (sample.name, sample.labels)
            assert sample.labels.get("team", "unknown") in {*QUOTAS, "unknown"}
            assert sample.labels.get("cache", "none") in {"hit", "miss", "coalesced", "derived",
                                                          "only-if-cached", "none"}
            assert sample.labels.get("type", "cache") in {*ANALYSIS_TYPES, "cache", "invalid"}

    # Requests: exactly what the clients saw, by team, status and cache outcome.
    expected = Counter((a.team, a.status, a.cache) for a in answered)
    assert total(samples, "gateway_requests_total", ("team", "status", "cache")) == expected
    by_cache = Counter(a.cache for a in answered)
    assert total(samples, "gateway_request_duration_seconds_count", ("cache",)) == {
        (cache,): n for cache, n in by_cache.items()}

    # Upstream: one call per miss plus the failed one; nothing else reached the simulator.
    misses = Counter(a.team for a in answered if a.cache == "miss")
    assert sim.state.calls == sum(misses.values()) + 1
    assert total(samples, "gateway_upstream_requests_total", ("status",)) == {
        ("200",): sum(misses.values()), ("500",): 1}
    assert total(samples, "gateway_upstream_request_duration_seconds_count") == {
        (): sim.state.calls}

    # Calls saved: the hits and coalesced followers of each team.
    saved = Counter(a.team for a in answered if a.cache in ("hit", "coalesced"))
    assert total(samples, "gateway_upstream_calls_saved_total", ("team",)) == {
        (team,): n for team, n in saved.items()}

    # Quota: charged for misses and for the failed call (it reached the upstream, which may
    # have billed it: the charge follows the bill), against each team's limit.
    charged = misses + Counter({"search": 1})
    for team, limit in QUOTAS.items():
        assert samples[("gateway_quota_used", frozenset({("team", team)}))] == charged[team]
        assert samples[("gateway_quota_limit", frozenset({("team", team)}))] == limit
    assert misses["tiny"] == QUOTAS["tiny"]

    assert samples[("gateway_upstream_quota_remaining", frozenset())] == sim.state.quota
    assert samples[("gateway_cache_entries", frozenset())] == sum(misses.values())
    assert samples[("gateway_cache_size_bytes", frozenset())] > 0
    assert samples[("gateway_inflight_requests", frozenset())] == 0

    # No secret, nor its hash, anywhere in the scrape.
    for secret in (UPSTREAM_KEY, BAD_KEY, *TEAM_KEYS.values()):
        assert secret not in text
        assert hashlib.sha256(secret.encode()).hexdigest() not in text

    # promtool's linter finds nothing to say (it prints any problem it finds).
    lint = run(tool("promtool"), "check", "metrics", stdin=text)
    assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), (
        lint.stdout + lint.stderr)

    # Every metric the dashboard or the alert rules use is one the gateway exports.
    exported = {name for name, _ in samples}
    dashboard_names = set(METRIC_NAME.findall(
        " ".join(expr for _, expr in dashboard_queries(load_dashboard()))))
    rule_names = set(METRIC_NAME.findall(ALERTS.read_text()))
    assert dashboard_names and rule_names
    assert dashboard_names <= exported, f"dashboard: not exported: {dashboard_names - exported}"
    assert rule_names <= exported, f"alerts.yml: not exported: {rule_names - exported}"


@dataclass
class PrometheusServer:
    url: str
    log: Path


def wait_ready(url: str, what: str, proc: subprocess.Popen[bytes], log: Path,
               within_s: float = 60) -> None:
    """Until ``url`` answers 200: a server's readiness endpoint, not its first answer (a
    Prometheus still opening its TSDB answers its API with 503)."""
    deadline = time.monotonic() + within_s
    last = "no answer"
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            r = requests.get(url, timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.1)
    pytest.fail(f"{what} not ready at {url} ({last}); log:\n{log.read_text()[-3000:]}")


async def gateway_ready(client: aiohttp.ClientSession, gw: Gateway) -> None:
    async with client.get(f"{gw.base}/readyz") as r:
        assert r.status == 200, await r.text()


@pytest.fixture
def prometheus(gateway: Gateway, tmp_path: Path) -> Iterator[PrometheusServer]:
    """A real Prometheus scraping the test's gateway every second, with alerts.yml loaded,
    ready (/-/ready) before the test starts."""
    exe = tool("prometheus")
    port = free_port()
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [{tmp_path / "alerts.yml"}]
scrape_configs:
  - job_name: imagerecognize-gateway
    metrics_path: /metrics
    static_configs:
      - targets: ["{gateway.base.removeprefix("http://")}"]
""")
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [exe, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/-/ready", "Prometheus", proc, log)
        yield PrometheusServer(url, log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def api_get(client: aiohttp.ClientSession, url: str) -> Any:
    """The ``data`` of a Prometheus API answer; anything but a 200 success fails the test (the
    server is ready by now, so a 503 is a finding, not something to wait out)."""
    async with client.get(url) as r:
        text = await r.text()
        assert r.status == 200, f"{url}: HTTP {r.status}: {text[:500]}"
    body = json.loads(text)
    assert body["status"] == "success", body
    return body["data"]


async def wait_until(check: Callable[[], Awaitable[bool]], what: str, server: PrometheusServer,
                     within_s: float = 20) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}; prometheus log:\n{server.log.read_text()[-3000:]}")


async def test_dashboard_and_alerts_on_a_real_prometheus(
        gateway: Gateway, sim: Sim, prometheus: PrometheusServer,
        client: aiohttp.ClientSession) -> None:
    api = f"{prometheus.url}/api/v1"
    await gateway_ready(client, gateway)  # the in-process gateway: ready before it is scraped

    async def query(expr: str) -> dict[str, Any]:
        async with client.post(f"{api}/query", data={"query": expr}) as r:
            text = await r.text()
            # 400/422 carry the error of a bad expression, which the caller reports
            assert r.status in (200, 400, 422), f"query: HTTP {r.status}: {text[:500]}"
            return dict(json.loads(text))

    async def target_up() -> bool:
        targets = (await api_get(client, f"{api}/targets"))["activeTargets"]
        return bool(targets) and all(t["health"] == "up" for t in targets)

    await wait_until(target_up, "the gateway target to be up", prometheus)
    answered = await run_workload(gateway, sim)
    saved = sum(a.cache in ("hit", "coalesced") for a in answered)

    async def scraped_after_workload() -> bool:
        # Every counter series seen at least 3 times, the last one after the workload, so
        # the series the workload created have enough samples for rate().
        body = await query(
            "min(count_over_time(gateway_requests_total[30s])) >= 3"
            " and on () min(count_over_time(gateway_upstream_requests_total[30s])) >= 3"
            f" and on () sum(gateway_upstream_calls_saved_total) == {saved}")
        assert body["status"] == "success", body
        return bool(body["data"]["result"])

    await wait_until(scraped_after_workload, "Prometheus to scrape the workload", prometheus)

    problems = []
    for where, expr in dashboard_queries(load_dashboard()):
        body = await query(concrete(expr))
        if body.get("status") != "success":
            problems.append(f"{where}: {body.get('error')}\n    {concrete(expr)}")
        elif not body["data"]["result"] and expr not in ALLOWED_EMPTY:
            problems.append(f"{where}: no data\n    {concrete(expr)}")
    assert not problems, "dashboard queries failing:\n" + "\n".join(problems)

    async def rules_evaluated() -> bool:
        groups = (await api_get(client, f"{api}/rules"))["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return len(rules) == ALERTS.read_text().count("- alert:") and all(
            rule["health"] == "ok" and not rule.get("lastError") for rule in rules)

    await wait_until(rules_evaluated, "every alert rule to evaluate with health ok", prometheus)

    # The tiny team is at 3 of 3: its alert is pending (for: 1m), and only that one.
    async def tiny_exhausted() -> bool:
        alerts = (await api_get(client, f"{api}/alerts"))["alerts"]
        return any(a["labels"]["alertname"] == "GatewayTeamQuotaExhausted"
                   and a["labels"]["team"] == "tiny" for a in alerts)

    await wait_until(tiny_exhausted, "GatewayTeamQuotaExhausted for team tiny", prometheus)
    active = {(a["labels"]["alertname"], a["labels"].get("team"))
              for a in (await api_get(client, f"{api}/alerts"))["alerts"]}
    assert ("GatewayTeamQuotaHigh", "tiny") not in active
    assert not any(name in ("GatewayUpstreamQuotaLow", "GatewayUpstreamQuotaExhausted",
                            "GatewayUpstreamCredentialsRefused") for name, _ in active), active


async def test_requests_counted_in_bulk_scrape_as_if_observed_one_by_one() -> None:
    """Metrics.count_request folds a loop turn's requests into one change per series; the
    scrape must read exactly what Counter.inc() and Histogram.observe() per request give."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from gateway.obs.metrics import LATENCY_BUCKETS, Metrics

    durations = [0.0001, 0.0005, 0.0007, 0.002, 0.0025, 0.3, 0.3, 7.0, 61.0, 1e-9]
    metrics = Metrics(CollectorRegistry())
    for seconds in durations:
        metrics.count_request("search", "objects", 200, "hit", seconds)
    metrics.count_request("ads", "nsfw", 402, "none", 0.01)
    metrics.count_saved("search", "objects")
    metrics.count_saved("search", "objects")
    await asyncio.sleep(0)  # the loop turn after the requests: folded without a scrape
    reference_registry = CollectorRegistry()
    reference = Histogram("gateway_request_duration_seconds", "x", ("type", "cache"),
                          buckets=LATENCY_BUCKETS, registry=reference_registry)
    for seconds in durations:
        reference.labels("objects", "hit").observe(seconds)

    def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {tuple(sorted(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples
                if s.name == name and s.labels.get("type") == "objects"}

    ours = generate_latest(metrics.registry).decode()
    theirs = generate_latest(reference_registry).decode()
    for suffix in ("_bucket", "_sum", "_count"):
        name = "gateway_request_duration_seconds" + suffix
        assert samples(ours, name) == pytest.approx(samples(theirs, name)), suffix
    counted = {tuple(sorted(s.labels.items())): s.value
               for family in text_string_to_metric_families(ours) for s in family.samples
               if s.name in ("gateway_requests_total", "gateway_upstream_calls_saved_total")}
    assert counted[(("cache", "hit"), ("status", "200"), ("team", "search"),
                    ("type", "objects"))] == len(durations)
    assert counted[(("cache", "none"), ("status", "402"), ("team", "ads"), ("type", "nsfw"))] == 1
    assert counted[(("team", "search"), ("type", "objects"))] == 2


def test_request_latency_counts_the_same_with_or_without_the_bulk_path() -> None:
    """Metrics.fold adds a loop turn's requests to the histogram's private sum and bucket
    counters; where prometheus-client lacks them, each request is observed through the public
    observe(). Both leave the same series and values; the installed version takes the bulk one."""
    from prometheus_client import CollectorRegistry

    from gateway.obs.metrics import Metrics, bulk_histograms

    durations = [0.0004, 0.003, 0.003, 0.02, 0.2, 1.5, 7.0, 42.0]
    samples = []
    for bulk in (True, False):
        registry = CollectorRegistry()
        metrics = Metrics(registry)
        metrics.bulk = bulk
        for i, seconds in enumerate(durations):
            metrics.count_request("search", "objects", 200, "hit" if i % 2 else "miss", seconds)
        metrics.fold()
        samples.append(sorted(
            (s.name, tuple(sorted(s.labels.items())), round(s.value, 9))
            for family in registry.collect() if family.name.startswith("gateway_request")
            for s in family.samples))
    assert samples[0] == samples[1]
    assert any(name.endswith("_bucket") and value for name, _, value in samples[0])
    assert Metrics(CollectorRegistry()).bulk
    assert not bulk_histograms(object())
