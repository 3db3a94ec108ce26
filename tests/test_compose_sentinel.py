"""compose.sentinel.yaml, the Sentinel variant of compose.yaml (docker does not run here, so
it is checked as YAML): two replicas and three sentinels of the primary, every Redis durable,
and the [storage] it documents is a config the gateway accepts."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
OVERRIDE = ROOT / "compose.sentinel.yaml"


@pytest.fixture(scope="module")
def override() -> dict[str, Any]:
    data = yaml.safe_load(OVERRIDE.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def test_every_redis_is_durable_and_the_replicas_follow_the_primary(
        override: dict[str, Any]) -> None:
    base = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))
    services = override["services"]
    redis = [name for name in services if name == "redis" or name.startswith("redis-")]
    assert sorted(redis) == ["redis", "redis-replica-1", "redis-replica-2"]
    for name in redis:
        command = services[name]["command"]
        assert command[:1] == ["redis-server"], name
        flags = dict(zip(command[1::2], command[2::2], strict=False))
        assert flags["--appendonly"] == "yes" and flags["--maxmemory-policy"] == "noeviction"
        if name != "redis":
            assert command[-3:] == ["--replicaof", "redis", "6379"], name
    for name, service in services.items():
        if name != "redis":  # compose.yaml's redis is already opt-in
            assert service["profiles"] == ["redis"], f"{name} must be opt-in like redis"
            assert service["image"] == base["services"]["redis"]["image"], name
        for entry in service.get("volumes", []):
            assert entry.split(":")[0] in override["volumes"], (name, entry)


def test_three_sentinels_watch_the_primary_with_a_quorum_of_two(
        override: dict[str, Any], tmp_path: Path) -> None:
    services = override["services"]
    sentinels = sorted(n for n in services if n.startswith("sentinel-"))
    assert sentinels == ["sentinel-1", "sentinel-2", "sentinel-3"]
    sh, dash_c, script = services["sentinel-1"]["command"]
    assert (sh, dash_c) == ("sh", "-c")
    # Run what each sentinel runs at start, up to the config it writes.
    conf = tmp_path / "sentinel.conf"
    script = script.replace("/tmp/sentinel.conf", str(conf)).replace(
        f"exec redis-sentinel {conf}", f"cat {conf}")
    lines = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True,
                           timeout=10).stdout.splitlines()
    assert "port 26379" in lines
    assert "sentinel monitor mymaster redis 6379 2" in lines
    assert all(line == line.strip() for line in lines), lines


def test_the_documented_storage_is_a_config_the_gateway_accepts(
        override: dict[str, Any]) -> None:
    header = [line.removeprefix("#   ") for line in OVERRIDE.read_text().splitlines()
              if line.startswith("#   ") and not line.startswith("#   docker")]
    storage = tomllib.loads("\n".join(header))["storage"]
    config = parse_config(
        {"upstream": {"url": "http://127.0.0.1:1/api/v2/", "api_key_env": "K"},
         "storage": storage, "teams": {"search": {"keys": ["k" * 20], "quota": 1}}},
        source="compose.sentinel.yaml", env={"K": "upstream-key"})
    assert config.storage.backend == "redis" and config.storage.require_persistence
    for address in config.storage.redis_sentinels:
        host, _, port = address.rpartition(":")
        assert host in override["services"] and port == "26379", address
    assert config.storage.redis_master_name == "mymaster"
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"compose\.sentinel\.yaml", readme)
