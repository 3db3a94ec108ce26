"""Safe defaults: secrets from files, no versions in the Server header.

The status page's tokens are in test_admin.py, the image's missing teams in test_container.py.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests

from gateway.config import ConfigError, parse_config
from gateway.devtools.sample_images import make_png
from tests.support import (
    TEAM_KEYS,
    UPSTREAM_KEY,
    GatewayFactory,
    GatewayProcess,
    Sim,
    free_port,
    objects_form,
    post_requests,
    write_config,
)

ADMIN = "admin-token-from-a-file-1a2b3c"
VIEWER = "viewer-token-from-a-file-4d5e6f"


def raw_config(sim: Sim, db: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "upstream": {"url": sim.url, "api_key_env": "GW_TEST_KEY", "timeout_s": 5},
        "storage": {"path": str(db)},
        "teams": {"search": {"keys": [TEAM_KEYS["search"]], "quota": 10}},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def secret_file(tmp_path: Path, name: str, value: str) -> str:
    path = tmp_path / name
    path.write_text(f"  {value}\n\n", encoding="utf-8")  # as `echo` and editors leave it
    return str(path)


async def test_the_upstream_key_from_api_key_file_reaches_the_upstream(
    gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path
) -> None:
    key_file = secret_file(tmp_path, "upstream_key", UPSTREAM_KEY)
    config = parse_config(
        raw_config(sim, tmp_path / "gw.db", upstream={"api_key_file": key_file}), env={}
    )
    gw = await gateway_factory(config)
    r = await post_requests(gw.url, *objects_form(TEAM_KEYS["search"], make_png(5101)))
    assert r.status_code == 200, r.text  # the simulator refuses any other key than its own
    assert sim.state.calls == 1


async def test_secrets_from_name_file_variables(
    gateway_factory: GatewayFactory, sim: Sim, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    """NAME_FILE, the container convention, for the upstream key and both tokens."""
    env = {
        "GW_TEST_KEY_FILE": secret_file(tmp_path, "k", UPSTREAM_KEY),
        "GW_ADMIN_FILE": secret_file(tmp_path, "a", ADMIN),
        "GW_VIEWER_FILE": secret_file(tmp_path, "v", VIEWER),
    }
    admin = {"token_env": "GW_ADMIN", "status_token_env": "GW_VIEWER"}
    gw = await gateway_factory(parse_config(raw_config(sim, tmp_path / "gw.db", admin=admin),
                                            env=env))
    r = await post_requests(gw.url, *objects_form(TEAM_KEYS["search"], make_png(5102)))
    assert r.status_code == 200, r.text
    for token, path, status in ((ADMIN, "/admin/usage", 200), (VIEWER, "/status.json", 200),
                                (VIEWER, "/admin/usage", 401)):
        async with client.get(gw.base + path, headers={"Authorization": f"Bearer {token}"}) as a:
            assert a.status == status, (token, path)


REFUSED = [
    pytest.param({"upstream": {"api_key_file": "/nonexistent/key"}}, {},
                 "upstream.api_key_file: cannot read the secret file /nonexistent/key",
                 id="missing-file"),
    pytest.param({"upstream": {"api_key_file": "EMPTY"}}, {},
                 "upstream.api_key_file: EMPTY is empty", id="empty-file"),
    pytest.param({}, {"GW_TEST_KEY": "a-key", "GW_TEST_KEY_FILE": "KEYFILE"},
                 "both GW_TEST_KEY and GW_TEST_KEY_FILE are set", id="both-set"),
    pytest.param({"admin": {"token_env": "GW_ADMIN"}}, {"GW_ADMIN_FILE": "/nonexistent/a"},
                 "admin.token_env (GW_ADMIN_FILE): cannot read the secret file", id="admin-file"),
    pytest.param({"admin": {"token_env": "A", "status_token_env": "V"}},
                 {"A": "same-token", "V": " same-token\n"},
                 "admin.status_token_env: the viewer token must differ", id="viewer-is-admin"),
    pytest.param({"admin": {"public_status": "yes"}}, {},
                 "admin.public_status: must be true or false", id="public-status-type"),
]


@pytest.mark.parametrize(("sections", "env", "message"), REFUSED)
def test_a_secret_that_cannot_be_read_is_refused_in_one_line(
    sim: Sim, tmp_path: Path, sections: dict[str, Any], env: dict[str, str], message: str
) -> None:
    (tmp_path / "EMPTY").write_text(" \n")
    (tmp_path / "KEYFILE").write_text("other-key\n")
    for section in sections.values():
        for k, v in list(section.items()):
            if v == "EMPTY":
                section[k] = str(tmp_path / v)
    env = {k: str(tmp_path / v) if v == "KEYFILE" else v for k, v in env.items()}
    message = message.replace("EMPTY", str(tmp_path / "EMPTY"))
    with pytest.raises(ConfigError) as caught:
        parse_config(raw_config(sim, tmp_path / "gw.db", **sections), source="c.toml",
                     env={"GW_TEST_KEY": UPSTREAM_KEY, **env})
    text = str(caught.value)
    assert text.startswith("c.toml: ") and message in text and "\n" not in text
    assert "same-token" not in text and "other-key" not in text and UPSTREAM_KEY not in text


async def test_no_answer_names_the_software_versions(sim: Sim, tmp_path: Path,
                                                     processes: list[GatewayProcess]) -> None:
    """The envelope, aiohttp's own answers (404, 405), JSON, metrics and a request the parser
    refuses: every one says only Server: imagerecognize-gateway."""
    port = free_port()
    config = write_config(tmp_path / "c.toml", sim_url=sim.url, db=tmp_path / "gw.db", port=port,
                          teams={"search": (TEAM_KEYS["search"], 10)},
                          extra="[admin]\npublic_status = true\n")
    gw = GatewayProcess(config, port, tmp_path / "gw.log")
    processes.append(gw)
    await asyncio.to_thread(gw.wait_ready)
    base = f"http://127.0.0.1:{port}"

    def heads() -> list[tuple[str, int, str | None]]:
        seen = []
        for method, path, data in (
            ("POST", "/api/v2/", {"apikey": "wrong", "type": "objects"}),  # 401 envelope
            ("POST", "/api/v2/", {"apikey": TEAM_KEYS["search"], "type": "objects"}),
            ("GET", "/healthz", None), ("GET", "/readyz", None), ("GET", "/metrics", None),
            ("GET", "/status", None), ("GET", "/status.json", None),
            ("GET", "/no/such/path", None), ("DELETE", "/healthz", None),
            ("GET", "/admin/usage", None),
        ):
            r = requests.request(method, base + path, data=data, timeout=10)
            seen.append((path, r.status_code, r.headers.get("Server")))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            head = raw.recv(65536).decode("latin-1").split("\r\n\r\n")[0].split("\r\n")
        server = [h.split(":", 1)[1].strip() for h in head[1:] if h.lower().startswith("server:")]
        seen.append(("<too long>", int(head[0].split()[1]), server[0] if server else None))
        return seen

    seen = await asyncio.to_thread(heads)
    assert {s for _, _, s in seen} == {"imagerecognize-gateway"}, seen
    assert {status for _, status, _ in seen} >= {200, 401, 404, 405, 414}, seen
