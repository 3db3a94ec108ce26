"""`gateway check-config` reports every problem of a file in one run, one line each."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support import gateway_command

SIX_PROBLEMS = """\
[server]
port = "eighty"
prot = 1

[upstream]
url = "ftp://example.com/"
timeout_s = -1

[quota]
period = "fortnight"

[teams.search]
keys = ["sha256:nothex"]
quota = 5

[teams.ads]
keys = ["ads-key"]
"""

EXPECTED = [
    "server.prot: unknown key",
    "server.port: must be an integer, got str",
    "upstream.url: must be an http:// or https:// URL",
    "upstream.timeout_s: must be > 0",
    "quota.period: must be one of day, week, month, total",
    "teams.search.keys: a sha256: key must be 64 hex digits",
    "teams.ads.quota: missing (upstream calls per quota.period)",
]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "IMAGERECOGNIZE_API_KEY"}
    return subprocess.run([*gateway_command(), *args], capture_output=True, text=True,
                          timeout=60, env=env, check=False)


def test_check_config_reports_every_problem_in_one_run(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(SIX_PROBLEMS)
    out = run("check-config", "--config", str(path))
    assert (out.returncode, out.stdout) == (2, "")
    lines = out.stderr.splitlines()
    assert len(lines) == len(EXPECTED), out.stderr
    for line, expected in zip(lines, EXPECTED, strict=True):
        assert line.startswith(f"gateway: config error: {path}: {expected}"), (line, expected)


def test_serve_refuses_with_the_same_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(SIX_PROBLEMS)
    check = run("check-config", "--config", str(path))
    serve = run("serve", "--config", str(path))
    assert serve.returncode == 2
    # serve also needs the upstream key: one more line
    extra = set(serve.stderr.splitlines()) - set(check.stderr.splitlines())
    assert len(serve.stderr.splitlines()) == len(EXPECTED) + 1
    assert [line.split(": ")[3] for line in extra] == ["upstream.api_key_env"]
    assert not (tmp_path / "data").exists()


def test_one_problem_is_still_one_line(tmp_path: Path) -> None:
    path = tmp_path / "one.toml"
    path.write_text('[teams.a]\nkeys = ["k"]\nquota = -1\n')
    out = run("check-config", "--config", str(path))
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"gateway: config error: {path}: teams.a.quota: must be an integer >= 0"]
