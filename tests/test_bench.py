"""The benchmark command runs end to end (`bench/run.py --quick`): every scenario, real
processes, wrk. It judges no speed (that is BENCHMARKS.md's business), only that the bench
works and its correctness checks hold (no non-2xx answer, hits are hits, one upstream call
for a storm of identical uploads)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "bench" / "run.py"


def scenario_titles() -> list[str]:
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    titles = list(module.SCENARIOS.values())
    assert len(titles) == 6
    return titles


@pytest.mark.slow
def test_quick_bench_runs_every_scenario(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed; the benchmark needs it: apt-get install wrk")
    titles = scenario_titles()
    report = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run([sys.executable, str(RUN), "--quick", "--output", str(report)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    markdown = report.read_text()
    for title in titles:
        assert f"== {title} ==" in proc.stdout, f"no {title!r} table in:\n{output[-6000:]}"
        assert f"### {title}" in markdown
    assert "PROBLEM" not in proc.stdout
    assert "Python" in markdown and "aiohttp" in markdown  # the machine section


def test_store_bench_smoke_prints_both_paths() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "store_bench.py"), "--quick"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("  ")[0].strip() for line in proc.stdout.splitlines()[2:]}
    assert rows == {"inline", "writer thread"}


def test_log_bench_smoke_prints_both_formats() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "log_bench.py"), "--quick"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()[2:]] == ["text", "json"]


def test_hot_path_bench_smoke_prints_every_step() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "hot_path_bench.py"), "--quick"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split()[0] for line in proc.stdout.splitlines()[2:]]
    assert rows == ["body", "team", "parameters", "answer"]


def test_inproc_bench_smoke_answers_hits_and_prints_the_gap() -> None:
    # It exits non-zero unless every measured gateway answer was a hit (and one upstream call).
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "inproc_bench.py"), "--quick",
                           "--stages"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(":")[0].strip() for line in proc.stdout.splitlines()]
    assert rows == ["floor", "gateway", "read", "parse", "checks", "hit", *["gap"] * 5]
    assert proc.stdout.count("(HTTP/1.1 200 OK)") == 6  # every stage answered, none refused


def test_savings_bench_smoke_derives_and_widens_below_exact_dedup() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "savings.py"), "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()
            if line.startswith(("exact ", "derive ", "derive+widen "))}
    assert set(rows) == {"exact", "derive", "derive+widen"}, proc.stdout
    calls = {mode: int(row[1]) for mode, row in rows.items()}
    assert calls["derive+widen"] < calls["derive"] < calls["exact"], proc.stdout
    for mode, row in rows.items():
        assert int(row[1]) <= int(row[4]), (mode, proc.stdout)  # never above its minimum
        assert "all equal to the simulator" in " ".join(row), proc.stdout


def test_ab_bench_smoke_measures_two_checkouts_side_by_side() -> None:
    """bench/ab.py with this checkout on both sides: both gateways answer hits and misses."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ab.py"), "--before", str(ROOT),
                           "--quick"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == [
        "hit req/s (101 KB, 16 conns)", "miss added p50 (10 KB)", "miss added p50 (100 KB)"]
    for row in rows[1:]:
        before, after = (float(c.split()[0].replace(",", "")) for c in row.split("|")[2:4])
        assert before > 0 and after > 0, row
