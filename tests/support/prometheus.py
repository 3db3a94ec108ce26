"""Prometheus's own tools (promtool) and the alert rules, for the tests that run them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import ROOT

ALERTS = ROOT / "prometheus" / "alerts.yml"


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"`{name}` is not installed: `apt-get install -y prometheus` provides it "
                    "(CI installs it)", pytrace=False)
    return path


def run(*args: str, cwd: Path | None = None, stdin: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, input=stdin, capture_output=True, text=True,
                          timeout=60, check=False)


def rules_without_annotations(text: str) -> str:
    """alerts.yml minus its annotations blocks, so ``promtool test rules`` checks labels only
    (annotations are prose; ``promtool check rules`` already checks their templates)."""
    out: list[str] = []
    block_indent: int | None = None
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if block_indent is not None and (not line.strip() or indent > block_indent):
            continue
        block_indent = None
        if line.strip() == "annotations:":
            block_indent = indent
            continue
        out.append(line)
    return "\n".join(out) + "\n"
