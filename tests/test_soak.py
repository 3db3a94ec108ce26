"""The bounded soak (bench/soak.py) in its CI size: mixed traffic, upstream faults, checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_soak_passes_its_checks_and_prints_the_table() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    for heading in ("requests by status", "requests by cache outcome", "upstream",
                    "charged per team", "gateway process", "checks"):
        assert f"\n{heading}\n" in out, out
    assert "[FAIL]" not in out and out.count("[ok]") == 7, out
    assert "RSS MB" in out and "open fds" in out
