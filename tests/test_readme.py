"""README's client examples are the seed's own, changed only in URL and key, and they run."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
from pathlib import Path

from gateway.devtools.sample_images import make_jpeg
from tests.support import TEAM_KEYS, Gateway, Sim

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "docs" / "upstream-api-v2.txt"  # the upstream's own document, kept in the repo
README_URL, README_KEY = "http://gateway.internal:8080/api/v2/", "YOUR-TEAM-KEY"


def block(text: str, lang: str, starts: str) -> str:
    found = [b for b in re.findall(rf"```{lang}\n(.*?)```", text, re.S) if b.startswith(starts)]
    assert len(found) == 1, f"one ```{lang} block starting {starts!r}"
    return found[0]


def seed_example(start: str, stop: str | None) -> str:
    seed = SEED.read_text()
    text = seed[seed.index(start) :]
    if stop is not None:
        text = text[: text.index(stop)]
    return text.rstrip() + "\n"


def as_in_readme(seed_text: str) -> str:
    return seed_text.replace("https://imagerecognize.com/api/v2/", README_URL).replace(
        "YOUR-API-KEY", README_KEY)


def test_readme_examples_change_only_url_and_key() -> None:
    readme = (ROOT / "README.md").read_text()
    python = seed_example("import requests\nimport json", "3.2")
    assert block(readme, "python", "import requests") == as_in_readme(python)
    html = seed_example("<!DOCTYPE html>", None)
    assert block(readme, "html", "<!DOCTYPE html>") == as_in_readme(html)


async def test_readme_python_example_runs_against_a_gateway(
        gateway: Gateway, sim: Sim, tmp_path: Path, monkeypatch) -> None:
    code = block((ROOT / "README.md").read_text(), "python", "import requests")
    code = code.replace(README_URL, gateway.url).replace(README_KEY, TEAM_KEYS["search"])
    (tmp_path / "image.jpg").write_bytes(make_jpeg(77))
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()

    def run() -> None:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {})

    await asyncio.to_thread(run)
    printed = out.getvalue().splitlines()
    body = json.loads(printed[0])
    assert body["status"] == 200 and body["data"]["type"] == "objects"
    assert body["data"]["quota"] == 999 and sim.state.calls == 1


def test_browser_test_page_is_the_documents_own() -> None:
    # tests/http/test_browser.py serves this copy to a real browser; it must not drift from the doc.
    page = (ROOT / "tests" / "browser" / "seed-example.html").read_text(encoding="utf-8")
    assert page.rstrip() == seed_example("<!DOCTYPE html>", None).rstrip()
