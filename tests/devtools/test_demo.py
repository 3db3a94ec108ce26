"""`gateway demo`, README's first command, as a newcomer runs it."""

from __future__ import annotations

import re
import subprocess

from tests.support import gateway_command


def test_demo_plays_a_workload_and_prints_what_it_saved() -> None:
    result = subprocess.run([*gateway_command(), "demo"], capture_output=True, text=True,
                            timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in ("search", "ads", "total")}
    assert set(rows) == {"search", "ads", "total"}
    header = ["team", "requests", "200", "402", "from", "store", "coalesced", "derived",
              "charged", "quota", "left"]
    assert header[0] in out and "from store" in out
    total = rows["total"]
    requests, ok, over, hits, coalesced, derived, charged = map(int, total[1:8])
    assert requests == 80 and ok + over == requests
    # Each team is charged at most its quota; the rest came from the store or coalesced.
    for team, quota in (("search", 25), ("ads", 4)):
        assert int(rows[team][7]) <= quota
    assert hits + coalesced + derived + charged == ok
    # search asks min_confidence 80 of images ads asked at 50: answered from ads' results.
    assert int(rows["search"][6]) > 0 and int(rows["ads"][6]) == 0
    calls = int(re.search(r"upstream called (\d+) times", out).group(1))  # type: ignore[union-attr]
    assert calls == charged


def test_demo_refuses_sizes_below_one_with_a_usage_line() -> None:
    for args in (["--images", "0"], ["--requests", "-3"]):
        result = subprocess.run([*gateway_command(), "demo", *args], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2, args
        assert "must be at least 1" in result.stderr and "Traceback" not in result.stderr
