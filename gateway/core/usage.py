"""Usage and chargeback: what each team was charged and saved over a period, and what the
cache holds. Shared by the admin CLI, the admin API and the status page.

The quota ledger keeps one row per team and ledger period (``quota.period``). A coarser
period than the ledger's is the sum of the ledger rows inside it (the days of a week or a
month; for a month over a weekly ledger, the ISO weeks whose Thursday falls in it, the same
rule ISO 8601 uses to give a week to a year, so every week is counted in exactly one month).
A finer period cannot be split out of a ledger row and is refused (``PeriodError``).
Quarters (``2026-Q4``), years (``2026``) and date ranges (``2026-01-05..2026-02-15``, both
days included) are summed the same way; a range must start and end on ledger row boundaries
(any days for a daily ledger, Monday to Sunday for a weekly one, whole months for a monthly
one), so that no row is counted in part.

Long because: the period arithmetic (days, ISO weeks, months, quarters, ranges) and the three
renderings of one report (table, CSV, JSON) belong together: each half would need the other's
types.
"""

from __future__ import annotations

import calendar
import dataclasses
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from gateway.config import Config, PricingConfig
from gateway.core.derive import DERIVABLE, DERIVE_OFF_META
from gateway.core.quota import period_key
from gateway.store.base import CacheStats, Store

TOTAL_LABEL = "(total)"  # not a valid team name, so it can't collide with one
CSV_HEADER = (
    "period",
    "team",
    "charged",
    "quota",
    "remaining",
    "cache_hits",
    "coalesced",
    "calls_saved",
    "undelivered",
    "spend",
    "savings",
    "currency",
    "derived_hits",  # of cache_hits; last, so files read by position before it still read
)
_GRAIN = {"day": 0, "week": 1, "month": 2, "total": 3}
_SPANS = ("quarter", "year", "range")  # summed from whatever rows the ledger keeps
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_QUARTER = re.compile(r"(\d{4})-Q([1-4])")
_YEAR = re.compile(r"\d{4}")
_RANGE = re.compile(r"(\d{4}-\d{2}-\d{2})\.\.(\d{4}-\d{2}-\d{2})")
_WEEK = re.compile(r"(\d{4})-W(\d{2})")
_MONTH = re.compile(r"(\d{4})-(\d{2})")
_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class PeriodError(ValueError):
    """A period this ledger cannot answer, or a malformed one (CLI exit 2, HTTP 400)."""


@dataclass(frozen=True, slots=True)
class Period:
    kind: str  # day | week | month | quarter | year | range | total
    key: str  # "2026-11-24", "2026-W48", "2026-11", "2026-Q4", "2026", "A..B", "total"


PERIOD_FORMS = (
    "YYYY-MM, YYYY-MM-DD, YYYY-Www (ISO week), YYYY-Qn (quarter), YYYY (year), "
    "YYYY-MM-DD..YYYY-MM-DD (days included), total or current"
)


def range_period(start: str, end: str) -> str:
    """``--from``/``--to`` as one period text."""
    return f"{start.strip()}..{end.strip()}"


def parse_period(text: str, *, ledger: str, now: float) -> Period:
    """``current`` (the ledger's period now), ``total``, or one of ``PERIOD_FORMS``."""
    text = text.strip()
    if text in ("", "current"):
        return Period(ledger, period_key(ledger, now))
    if text == "total":
        return Period("total", "total")
    try:
        if _DAY.fullmatch(text):
            date.fromisoformat(text)
            return Period("day", text)
        if m := _WEEK.fullmatch(text):
            date.fromisocalendar(int(m[1]), int(m[2]), 1)
            return Period("week", text)
        if (m := _MONTH.fullmatch(text)) and 1 <= int(m[2]) <= 12:
            return Period("month", text)
        if _QUARTER.fullmatch(text):
            return Period("quarter", text)
        if _YEAR.fullmatch(text) and int(text) >= 1:
            return Period("year", text)
        if (m := _RANGE.fullmatch(text)) and date.fromisoformat(m[1]) <= date.fromisoformat(m[2]):
            return Period("range", text)
        if m:
            raise PeriodError(f"period {text}: the range ends before it starts")
    except PeriodError:
        raise
    except ValueError:
        pass
    raise PeriodError(f"period {text!r}: use {PERIOD_FORMS}")


def _span(asked: Period) -> tuple[date, date]:
    """First and last day of a quarter, a year or a range."""
    if asked.kind == "range":
        first, _, last = asked.key.partition("..")
        return date.fromisoformat(first), date.fromisoformat(last)
    if asked.kind == "year":
        return date(int(asked.key), 1, 1), date(int(asked.key), 12, 31)
    year, quarter = int(asked.key[:4]), int(asked.key[-1])
    end_month = quarter * 3
    return (
        date(year, end_month - 2, 1),
        date(year, end_month, calendar.monthrange(year, end_month)[1]),
    )


def _answerable(ledger: str) -> str:
    """What a ledger of ``ledger`` rows can be asked for, for error messages."""
    return {
        "day": "a day, week, month, quarter, year or any range of days",
        "week": "a week, month, quarter, year or a range from a Monday to a Sunday",
        "month": "a month, quarter, year or a range of whole months",
        "total": "total (or current)",
    }[ledger]


def _span_keys(asked: Period, ledger: str) -> tuple[str, ...]:
    start, end = _span(asked)
    days = [start + timedelta(days=n) for n in range((end - start).days + 1)]
    hint = f'the quota ledger keeps one row per {ledger} (quota.period = "{ledger}")'
    if ledger == "day":
        return tuple(d.isoformat() for d in days)
    if ledger == "week":
        if asked.kind == "range" and (start.isoweekday(), end.isoweekday()) != (1, 7):
            raise PeriodError(
                f"period {asked.key}: {hint}; a range must run from a Monday to a Sunday"
            )
        thursdays = [d for d in days if d.isoweekday() == 4]
        return tuple(f"{t.isocalendar()[0]}-W{t.isocalendar()[1]:02d}" for t in thursdays)
    last_day = calendar.monthrange(end.year, end.month)[1]
    if asked.kind == "range" and (start.day, end.day) != (1, last_day):
        raise PeriodError(
            f"period {asked.key}: {hint}; a range must start on the 1st of a month and end "
            "on the last day of one"
        )
    return tuple(sorted({f"{d.year}-{d.month:02d}" for d in days}))


def ledger_keys(asked: Period, ledger: str) -> tuple[str, ...]:
    """The ledger rows that make up ``asked``."""
    if asked.kind == ledger:
        return (asked.key,)
    hint = f'the quota ledger keeps one row per {ledger} (quota.period = "{ledger}")'
    if ledger == "total":
        raise PeriodError(f"period {asked.key}: {hint}; ask for {_answerable(ledger)}")
    if asked.kind == "total":
        raise PeriodError(f"period total: {hint}; ask for {_answerable(ledger)}")
    if asked.kind in _SPANS:
        return _span_keys(asked, ledger)
    if _GRAIN[asked.kind] < _GRAIN[ledger] or (asked.kind, ledger) == ("week", "month"):
        raise PeriodError(
            f"period {asked.key} is a {asked.kind}, finer than {hint}, which "
            f"cannot be split; ask for {_answerable(ledger)}"
        )
    if asked.kind == "week":
        year, week = (int(p) for p in asked.key.split("-W"))
        return tuple(date.fromisocalendar(year, week, d).isoformat() for d in range(1, 8))
    year, month = (int(p) for p in asked.key.split("-"))
    days = [date(year, month, d) for d in range(1, calendar.monthrange(year, month)[1] + 1)]
    if ledger == "day":
        return tuple(d.isoformat() for d in days)
    thursdays = [d for d in days if d.isoweekday() == 4]
    return tuple(f"{t.isocalendar()[0]}-W{t.isocalendar()[1]:02d}" for t in thursdays)


@dataclass(frozen=True, slots=True)
class TeamLine:
    team: str
    charged: int
    quota: int | None  # None: the team is in the ledger but no longer configured
    remaining: int | None
    hits: int
    coalesced: int
    undelivered: int = 0  # of charged: sent upstream (maybe billed), no result delivered
    derived: int = 0  # of hits: derived from a looser stored result

    @property
    def saved(self) -> int:
        return self.hits + self.coalesced

    @property
    def hit_ratio(self) -> float | None:
        """Share of this team's answered recognitions that cost no upstream call."""
        served = self.saved + self.charged
        return self.saved / served if served else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "team": self.team,
            "charged": self.charged,
            "quota": self.quota,
            "remaining": self.remaining,
            "cache_hits": self.hits,
            "derived_hits": self.derived,
            "coalesced": self.coalesced,
            "calls_saved": self.saved,
            "undelivered": self.undelivered,
        }


def money(amount: float) -> float:
    """Money to the millionth of the unit: a price of 0.001 times 3 calls reads 0.003."""
    return round(amount, 6)


def money_places(price: float) -> int:
    """Decimals that show a price exactly (at least 2, at most 6): 0.001 -> 3, 0.25 -> 2."""
    decimals = f"{price:.6f}".rstrip("0").partition(".")[2]
    return max(2, len(decimals))


@dataclass(frozen=True, slots=True)
class UsageReport:
    period: Period
    quota_period: str
    ledger_periods: tuple[str, ...]
    teams: tuple[TeamLine, ...]
    pricing: PricingConfig = field(default_factory=PricingConfig)

    def spend(self, line: TeamLine) -> float:
        """What the team's charged calls cost at ``[pricing] per_call``. The ledger counts
        calls per team, not per type, so per-type prices apply on the dashboard only."""
        return money(line.charged * self.pricing.per_call)

    def savings(self, line: TeamLine) -> float:
        """What the calls the cache spared the team would have cost."""
        return money(line.saved * self.pricing.per_call)

    @property
    def pricing_note(self) -> str | None:
        if not self.pricing.types:
            return None
        return (
            f"spend and savings are at per_call ({self.pricing.per_call:g} "
            f"{self.pricing.currency}): the ledger counts calls per team, not per type, so "
            "[pricing.types] prices apply on the dashboard (gateway_upstream_calls_by_team_total)"
        )

    def _with_money(self, line: TeamLine) -> dict[str, Any]:
        return {**line.as_dict(), "spend": self.spend(line), "savings": self.savings(line)}

    @property
    def total(self) -> TeamLine:
        return TeamLine(
            TOTAL_LABEL,
            sum(t.charged for t in self.teams),
            sum(t.quota or 0 for t in self.teams),
            sum(t.remaining or 0 for t in self.teams),
            sum(t.hits for t in self.teams),
            sum(t.coalesced for t in self.teams),
            sum(t.undelivered for t in self.teams),
            sum(t.derived for t in self.teams),
        )

    @property
    def note(self) -> str | None:
        n = len(self.ledger_periods)
        if n == 1:
            return None
        return (
            f"summed over {n} {self.quota_period} ledger rows "
            f"({self.ledger_periods[0]} .. {self.ledger_periods[-1]}); quota is the "
            f"per-{self.quota_period} quota times {n}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "period": self.period.key,
            "period_kind": self.period.kind,
            "quota_period": self.quota_period,
            "ledger_periods": list(self.ledger_periods),
            "teams": [self._with_money(t) for t in self.teams],
            "total": self._with_money(self.total),
            "note": self.note,
            "currency": self.pricing.currency,
            "price_per_call": self.pricing.per_call,
            "prices_by_type": dict(self.pricing.types),
            "pricing_note": self.pricing_note,
        }

    def csv_rows(self) -> list[tuple[str | int, ...]]:
        """The chargeback file: header, one row per team, the total row."""
        rows: list[tuple[str | int, ...]] = [CSV_HEADER]
        for t in (*self.teams, self.total):
            rows.append(
                (
                    self.period.key,
                    t.team,
                    t.charged,
                    _blank(t.quota),
                    _blank(t.remaining),
                    t.hits,
                    t.coalesced,
                    t.saved,
                    t.undelivered,
                    f"{self.spend(t):.6f}",
                    f"{self.savings(t):.6f}",
                    self.pricing.currency,
                    t.derived,
                )
            )
        return rows


def _blank(value: int | None) -> str | int:
    return "" if value is None else value


async def compute_usage(store: Store, config: Config, asked: Period) -> UsageReport:
    keys = ledger_keys(asked, config.quota.period)
    sums: dict[str, list[int]] = {}
    for key in keys:
        for row in await store.usage(key):
            acc = sums.setdefault(row.team, [0, 0, 0, 0, 0])
            acc[0] += row.charged
            acc[1] += row.hits
            acc[2] += row.coalesced
            acc[3] += row.undelivered
            acc[4] += row.derived
    lines = []
    for team in config.teams:
        charged, hits, coalesced, undelivered, derived = sums.pop(team.name, [0, 0, 0, 0, 0])
        quota = team.quota * len(keys)
        lines.append(
            TeamLine(
                team.name, charged, quota, max(quota - charged, 0), hits, coalesced,
                undelivered, derived,
            )
        )
    # Charges of teams since removed from the config still belong in a chargeback.
    for name in sorted(sums):
        charged, hits, coalesced, undelivered, derived = sums[name]
        lines.append(
            TeamLine(name, charged, None, None, hits, coalesced, undelivered, derived))
    return UsageReport(asked, config.quota.period, keys, tuple(lines), config.pricing)


def period_resets_at(period: str, now: float) -> float | None:
    """When the quota period holding ``now`` ends (UTC), or None for ``total``."""
    moment = datetime.fromtimestamp(now, UTC)
    today = datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
    if period == "day":
        return (today + timedelta(days=1)).timestamp()
    if period == "week":
        return (today + timedelta(days=8 - moment.isoweekday())).timestamp()
    if period == "month":
        year, month = divmod(moment.month, 12)
        return datetime(moment.year + year, month + 1, 1, tzinfo=UTC).timestamp()
    return None


# -- the cache --------------------------------------------------------------------------------
def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` (or combined: ``1d12h``) -> seconds."""
    compact = text.strip().lower()
    parts = _AGE.findall(compact)
    if not parts or _AGE.sub("", compact).strip():
        raise ValueError(f"age {text!r}: use a number and a unit, e.g. 30d, 12h, 90m")
    return sum(float(n) * _AGE_UNITS[unit] for n, unit in parts)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def iso_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def human_age(seconds: float) -> str:
    delta = timedelta(seconds=max(int(seconds), 0))
    if delta.days:
        return f"{delta.days}d {delta.seconds // 3600}h"
    hours, rest = divmod(delta.seconds, 3600)
    return f"{hours}h {rest // 60}m" if hours else f"{rest // 60}m {rest % 60}s"


async def cache_report(store: Store, config: Config, *, now: float) -> tuple[CacheStats, TeamLine]:
    """The cache's stats, and the ledger's total for the current quota period (for the hit
    ratio: recognitions answered without an upstream call, over all answered)."""
    usage = await compute_usage(
        store, config, parse_period("current", ledger=config.quota.period, now=now)
    )
    off = {}
    for type_ in DERIVABLE:  # what the audit switched off, and why (gateway.core.service)
        why = await store.get_meta(DERIVE_OFF_META + type_)
        if why:
            off[type_] = why
    return dataclasses.replace(await store.stats(), derive_off=off), usage.total


def derivation(stats: CacheStats, config: Config) -> dict[str, str]:
    """Per derivable type: "on", "off (config)" or why the audit switched it off."""
    if not config.cache.derive:
        return {t: "off (cache.derive = false)" for t in DERIVABLE}
    return {t: f"off: {stats.derive_off[t]}" if t in stats.derive_off else "on" for t in DERIVABLE}


def stats_dict(stats: CacheStats, period: TeamLine | None = None) -> dict[str, Any]:
    ratio = period.hit_ratio if period is not None else None
    return {
        "entries": stats.entries,
        "size_bytes": stats.size_bytes,
        "size": human_bytes(stats.size_bytes),
        "hits": stats.hits,
        "hit_ratio": round(ratio, 4) if ratio is not None else None,
        "oldest": iso_utc(stats.oldest) if stats.oldest is not None else None,
        "by_type": [{"type": t, "entries": n, "size_bytes": b} for t, n, b in stats.by_type],
        "derive_off": dict(stats.derive_off),
    }
