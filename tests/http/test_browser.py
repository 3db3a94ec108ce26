"""A real browser against the gateway: the seed's HTML/JavaScript example (§3.2), verbatim
but for jQuery's address, the URL and the key, served from another origin; and /status.

Needs Debian's chromium, Python playwright and jQuery 3.3.1 from npm. A missing one fails
the test (naming the install step) rather than skipping it: a skipped browser test would
hide that browser clients were never checked.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.config import AdminConfig, Secret
from gateway.devtools.sample_images import make_jpeg, make_png
from tests.support import (
    TEAM_KEYS,
    GatewayFactory,
    Sim,
    make_config,
    objects_form,
    post_requests,
)

BROWSER_DIR = Path(__file__).resolve().parents[1] / "browser"  # tests/browser (npm ci there)
SEED_PAGE = BROWSER_DIR / "seed-example.html"
JQUERY = BROWSER_DIR / "node_modules" / "jquery" / "dist" / "jquery.min.js"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SEED_JQUERY = "https://cdnjs.cloudflare.com/ajax/libs/jquery/3.3.1/jquery.min.js"
SEED_URL = "https://imagerecognize.com/api/v2/"
SEED_KEY = "YOUR-API-KEY"
ADMIN_TOKEN = "status-page-token-0123456789"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _require_tools() -> Any:
    """playwright's async API, or a failure that says what to install."""
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.fail("Debian chromium is missing: apt-get install -y chromium")
    if not JQUERY.exists() or b"jQuery v3.3.1 " not in JQUERY.read_bytes()[:100]:
        pytest.fail(f"jQuery 3.3.1 is missing at {JQUERY}: npm ci --prefix tests/browser")
    try:
        from playwright import async_api
    except ImportError:
        pytest.fail("Python playwright is missing: pip install -e '.[test]' (or pip install "
                    "playwright; never `playwright install`, the browser is Debian's)")
    return async_api


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async_api = _require_tools()
    async with async_api.async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@dataclass
class PageSite:
    origin: str
    gateway_url: str = ""


@pytest.fixture
async def page_site() -> AsyncIterator[PageSite]:
    """The seed's page, on its own origin: GET /?team=NAME answers it with that team's key."""
    seed = SEED_PAGE.read_text(encoding="utf-8")
    for needle in (SEED_JQUERY, SEED_URL, SEED_KEY):
        assert seed.count(needle) == 1, needle
    site = PageSite(origin="")

    async def page(request: web.Request) -> web.Response:
        key = TEAM_KEYS[request.query["team"]]
        html = (seed.replace(SEED_JQUERY, "/jquery.min.js").replace(SEED_URL, site.gateway_url)
                .replace(SEED_KEY, key))
        return web.Response(text=html, content_type="text/html")

    async def jquery(request: web.Request) -> web.FileResponse:
        return web.FileResponse(JQUERY)

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/jquery.min.js", jquery)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    site.origin = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield site
    await runner.cleanup()


async def _send(browser: Any, site: PageSite, team: str, image: Path,
                shot: Path) -> tuple[str, str]:
    """Open the page as ``team``, choose ``image``, click the button: (#response1, #response2)."""
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        await page.goto(f"{site.origin}/?team={team}")
        await page.set_input_files("#image-file", str(image))
        await page.click("button[name=submit]")
        await page.wait_for_function(
            "document.getElementById('response1').textContent !== ''", timeout=10_000)
        await page.wait_for_timeout(100)  # statusCode callbacks run after error/success
        await page.screenshot(path=str(shot), full_page=True)
        r1 = await page.text_content("#response1")
        r2 = await page.text_content("#response2")
    finally:
        await page.close()
    assert not errors, f"the page's script failed: {errors}"
    return r1 or "", r2 or ""


async def _text(page: Any, selector: str) -> str:
    return " ".join((await page.inner_text(selector)).split())


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC), path


async def test_seed_jquery_example_against_gateway(
    browser: Any, page_site: PageSite, gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    gw = await gateway_factory(server={"cors_origins": [page_site.origin]})
    page_site.gateway_url = gw.url
    png, jpeg = tmp_path / "photo.png", tmp_path / "photo.jpg"
    png.write_bytes(make_png(101))
    jpeg.write_bytes(make_jpeg(102))

    for n, image in enumerate((png, jpeg), start=1):
        shot = tmp_path / f"search-{n}.png"
        r1, r2 = await _send(browser, page_site, "search", image, shot)
        envelope = json.loads(r1)
        assert envelope["status"] == 200 and envelope["message"] == "Success"
        data = json.loads(r2)
        assert data == envelope["data"]
        assert data["type"] == "objects" and data["error"] == 0
        assert data["objects"] and all("name" in o and "confidence" in o for o in data["objects"])
        assert data["quota"] == 1000 - n            # the team's remaining sub-quota
        _assert_png(shot)

    # team "tiny" (quota 3) spends its quota, then the page shows the seed's 402 branch
    for seed in (201, 202, 203):
        r = await post_requests(gw.url, *objects_form(TEAM_KEYS["tiny"], make_png(seed)))
        assert r.status_code == 200
    shot = tmp_path / "tiny-402.png"
    fresh = tmp_path / "fresh.png"
    fresh.write_bytes(make_png(204))
    r1, r2 = await _send(browser, page_site, "tiny", fresh, shot)
    assert r1 == "402"
    assert r2 == ""
    _assert_png(shot)


async def test_status_page_in_browser(
    browser: Any, gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path
) -> None:
    config = make_config(sim.url, tmp_path / "gateway.db")
    config = replace(config, admin=AdminConfig("GW_ADMIN_TOKEN", Secret(ADMIN_TOKEN)))
    gw = await gateway_factory(config)
    image = make_png(301)
    for _ in range(3):   # one charged call, two hits
        r = await post_requests(gw.url, *objects_form(TEAM_KEYS["search"], image))
        assert r.status_code == 200
    for seed in (302, 303, 304):
        await post_requests(gw.url, *objects_form(TEAM_KEYS["tiny"], make_png(seed)))

    context = await browser.new_context(
        extra_http_headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    page = await context.new_page()
    response = await page.goto(f"{gw.base}/status")
    assert response is not None and response.status == 200
    shot = tmp_path / "status.png"
    await page.screenshot(path=str(shot), full_page=True)
    rows = {team: await _text(page, f'tr[data-team="{team}"]')
            for team in ("search", "ads", "tiny", "")}
    upstream = await _text(page, "#upstream")
    cache = await _text(page, "#cache")
    refresh = await page.get_attribute("meta[http-equiv=refresh]", "content")
    await context.close()

    _assert_png(shot)
    assert refresh == "10"
    # charged, hit ratio, calls saved, refused (402/429) since start
    # 1 charged, 2 hits; spend and savings (no [pricing] here: 0.00); refusals
    assert rows["search"] == "search 1 / 1000 used, 999 left 66.7% 2 0 0.00 USD 0.00 USD 0"
    assert rows["ads"] == "ads 0 / 1000 used, 1000 left - 0 0 0.00 USD 0.00 USD 0"
    assert rows["tiny"] == "tiny 3 / 3 used, 0 left 0.0% 0 0 0.00 USD 0.00 USD 0"
    assert rows[""] == "all teams 4 / 2003 used 33.3% 2 0 0.00 USD 0.00 USD"
    assert "entries 4 " in cache
    account_left = gw.state.metrics.registry.get_sample_value("gateway_upstream_quota_remaining")
    assert f"account quota remaining {int(account_left or -1)} " in upstream
    assert "failed calls since start 0 of 4 " in upstream

    # a person's browser logs in with HTTP Basic, the token as the password
    login = await browser.new_context(http_credentials={"username": "ops",
                                                         "password": ADMIN_TOKEN})
    page = await login.new_page()
    response = await page.goto(f"{gw.base}/status")
    assert response is not None and response.status == 200
    assert await _text(page, 'tr[data-team="tiny"]') == "tiny 3 / 3 used, 0 left 0.0% 0 0 0.00 USD 0.00 USD 0"
    await login.close()
