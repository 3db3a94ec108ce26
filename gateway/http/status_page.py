"""The status page (``/status``): ``/status.json``'s numbers rendered into HTML. The HTML is in
``gateway/http/templates/`` (``status.html``, one ``status_row.html`` per team), filled with
``string.Template``; every value from the store or the config is escaped here."""

from __future__ import annotations

import html
from collections.abc import Mapping
from importlib.resources import files
from string import Template
from typing import Any

from gateway.core.usage import human_age, money_places


def _template(name: str) -> Template:
    return Template((files("gateway.http") / "templates" / name).read_text(encoding="utf-8"))


_PAGE = _template("status.html")
_ROW = _template("status_row.html")


def render_status(s: Mapping[str, Any]) -> str:
    e = html.escape
    rows = []
    for t in s["teams"]:
        quota, used = t["quota"], t["charged"]
        share = min(used / quota, 1.0) if quota else (1.0 if quota == 0 else 0.0)
        level = "full" if share >= 0.9 else "high" if share >= 0.75 else "ok"
        limit = (
            f"{used} used, team not configured"
            if quota is None
            else f"{used} / {quota} used, {t['remaining']} left"
        )
        rows.append(
            _ROW.substitute(
                team=e(t["team"]),
                level=level,
                share=f"{share:.0%}",
                width=f"{share * 100:.1f}",
                limit=e(limit),
                hit_ratio=_ratio(t["hit_ratio"]),
                calls_saved=t["calls_saved"],
                derived_hits=t["derived_hits"],
                spend=_money(t["spend"], s),
                savings=_money(t["savings"], s),
                refused=_refused(t.get("refused_since_start", {})),
            ).rstrip("\n")
        )
    up, cache, total = s["upstream"], s["cache"], s["total"]
    calls = ", ".join(f"{e(k)}: {v}" for k, v in sorted(up["calls_since_start"].items()))
    quota_left = up["account_quota_remaining"]
    resets = s.get("quota_resets_at")
    return _PAGE.substitute(
        period=e(s["period"]),
        quota_period=e(s["quota_period"]),
        resets="never (quota.period = total)"
        if resets is None
        else f"{e(resets)} (in {human_age(s.get('quota_resets_in_s') or 0)})",
        rows="\n".join(rows),
        total_used=total["charged"],
        total_quota=total["quota"],
        total_ratio=_ratio(total["hit_ratio"]),
        total_saved=total["calls_saved"],
        total_derived=total["derived_hits"],
        total_spend=_money(total["spend"], s),
        total_savings=_money(total["savings"], s),
        calls=calls or "none yet",
        failed=up["failed_since_start"],
        called=sum(up["calls_since_start"].values()),
        account="unknown" if quota_left is None else quota_left,
        entries=cache["entries"],
        size=e(cache["size"]),
        size_bytes=cache["size_bytes"],
        generated=e(s["generated_at"]),
        json_link="/status.json",
    )


def _money(amount: float, s: Mapping[str, Any]) -> str:
    places = money_places(s["price_per_call"])
    return f"{amount:.{places}f} {html.escape(s['currency'])}"


def _refused(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} &times; {status}" for status, n in counts.items() if n) or "0"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"
