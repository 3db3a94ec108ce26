"""server.event_loop: uvloop by default where installed, asyncio when asked, and "uvloop"
without uvloop refused in one line."""

from __future__ import annotations

import asyncio
import sys
import tomllib
from pathlib import Path

import pytest

from gateway.config import ConfigError
from tests.support import GatewayProcess, Sim, free_port, make_config, write_config

ROOT = Path(__file__).resolve().parents[2]  # the repository


def loaded_uvloop(pid: int) -> bool:
    """Whether the process has uvloop's extension module mapped (imported it)."""
    return "/uvloop/" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.parametrize(("setting", "uvloop"), [
    pytest.param("", True, id="default-auto"),
    pytest.param('event_loop = "uvloop"', True, id="uvloop"),
    pytest.param('event_loop = "asyncio"', False, id="asyncio"),
])
async def test_the_gateway_runs_on_the_configured_loop(
        tmp_path: Path, sim: Sim, processes: list[GatewayProcess], setting: str,
        uvloop: bool) -> None:
    port = free_port()
    config = write_config(tmp_path / "g.toml", sim_url=sim.url, db=tmp_path / "g.db", port=port,
                          teams={"t": ("k", 1)}, server=setting)
    gw = GatewayProcess(config, port, tmp_path / "g.log")
    processes.append(gw)
    await asyncio.to_thread(gw.wait_ready)
    assert loaded_uvloop(gw.proc.pid) is uvloop


def test_uvloop_when_not_installed_is_a_config_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed
    with pytest.raises(ConfigError) as refused:
        make_config("http://127.0.0.1:9/api/v2/", tmp_path / "g.db",
                    server={"event_loop": "uvloop"})
    message = str(refused.value)
    assert "\n" not in message and "server.event_loop: uvloop is not installed" in message
    auto = make_config("http://127.0.0.1:9/api/v2/", tmp_path / "g.db")
    assert auto.server.event_loop == "auto"


def test_an_unknown_loop_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.event_loop: must be one of auto, asyncio, "
                                          r"uvloop, not 'tokio'"):
        make_config("http://127.0.0.1:9/api/v2/", tmp_path / "g.db",
                    server={"event_loop": "tokio"})


def test_a_plain_install_on_linux_brings_uvloop() -> None:
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    uvloop = [r for r in map(Requirement, project["dependencies"]) if r.name == "uvloop"]
    assert len(uvloop) == 1, "uvloop is not a main dependency"
    marker = uvloop[0].marker
    assert marker is not None
    assert marker.evaluate({"sys_platform": "linux", "platform_python_implementation": "CPython"})
    assert not marker.evaluate({"sys_platform": "win32",
                                "platform_python_implementation": "CPython"})
