"""config.toml: valid files load, bad ones are refused with one line naming file, key, problem."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gateway.config import ConfigError, Secret, hash_key, load_config
from tests.support import gateway_command

ROOT = Path(__file__).resolve().parents[2]  # the repository
ENV = {"IMAGERECOGNIZE_API_KEY": "real-upstream-key"}


def test_shipped_config_loads() -> None:
    config = load_config(ROOT / "config.toml", env=ENV)
    assert config.server.port == 8080
    assert config.storage.backend == "sqlite"
    assert {t.name for t in config.teams} == {"search", "ads"}
    search = config.team("search")
    assert search is not None and hash_key("search-demo-key") in search.key_hashes


def test_secret_never_shows_itself() -> None:
    config = load_config(ROOT / "config.toml", env=ENV)
    assert "real-upstream-key" not in repr(config)
    assert "real-upstream-key" not in str(Secret("real-upstream-key"))
    assert config.upstream.api_key.reveal() == "real-upstream-key"


BAD = [
    pytest.param("[server]\nport = 'eighty'\n", "server.port", id="port-type"),
    pytest.param("[server]\nport = 70000\n", "server.port", id="port-range"),
    pytest.param("[server]\nprot = 1\n", "server.prot", id="unknown-key"),
    pytest.param("[quota]\nperiod = 'year'\n", "quota.period", id="period"),
    pytest.param("[storage]\nbackend = 'mongo'\n", "storage.backend", id="backend"),
    pytest.param("[teams.a]\nquota = 5\n", "teams.a.keys", id="team-without-keys"),
    pytest.param("[teams.a]\nkeys = ['k']\n", "teams.a.quota", id="team-without-quota"),
    pytest.param("[teams.a]\nkeys = ['k']\nquota = -1\n", "teams.a.quota", id="negative-quota"),
    pytest.param("[teams.a]\nkeys = ['sha256:xyz']\nquota = 1\n", "teams.a.keys", id="bad-hash"),
    pytest.param("[teams.a]\nkeys = ['k']\nquota = 1\n[teams.b]\nkeys = ['k']\nquota = 1\n",
                 "teams.b.keys", id="shared-key"),
    pytest.param("[teams.a]\nkeys = ['real-upstream-key']\nquota = 1\n", "teams.a.keys",
                 id="upstream-key-as-team-key"),
    pytest.param("[upstream]\nurl = 'ftp://x'\n", "upstream.url", id="url"),
    pytest.param("[cache]\nttl_days = 0\n", "cache.ttl_days", id="ttl"),
    pytest.param("[server\n", "invalid TOML", id="toml-syntax"),
    pytest.param("[upstream]\napi_key_env = ''\n", "upstream.api_key_env", id="key-env-empty"),
    pytest.param("[quota]\nperiod = 'day'\n", "no team is configured", id="no-teams"),
    pytest.param("[server]\ncors_origins = ['intranet.example.com']\n", "server.cors_origins",
                 id="cors-origin-without-scheme"),
    pytest.param("[server]\ncors_origins = ['http://a.example/']\n", "server.cors_origins",
                 id="cors-origin-with-path"),
]


@pytest.mark.parametrize(("text", "named"), BAD)
def test_bad_config_is_refused_naming_the_key(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=ENV)
    message = str(info.value)
    # one line per problem (a file without teams also gets the no-teams line)
    lines = message.splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines) and named in message
    assert "real-upstream-key" not in message


def test_missing_upstream_key_env_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[upstream]\napi_key_env = 'MY_KEY'\n")
    with pytest.raises(ConfigError, match="MY_KEY is not set"):
        load_config(path, env={})


def test_cli_check_config_and_hash_key(tmp_path: Path) -> None:
    ok = subprocess.run([*gateway_command(), "check-config", "--config", str(ROOT / "config.toml")],
                        capture_output=True, text=True, env={**ENV, "PATH": "/usr/bin:/bin"})
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[quota]\nperiod = 'fortnight'\n")
    refused = subprocess.run([*gateway_command(), "check-config", "--config", str(bad)],
                             capture_output=True, text=True)
    assert refused.returncode == 2
    lines = refused.stderr.splitlines()  # one per problem: the period, and no teams
    assert len(lines) == 2 and "quota.period" in lines[0] and "no team" in lines[1]
    hashed = subprocess.run([*gateway_command(), "hash-key", "search-demo-key"],
                            capture_output=True, text=True, check=True)
    assert hashed.stdout.strip() == hash_key("search-demo-key")


def test_serve_refuses_to_start_without_the_upstream_key(tmp_path: Path) -> None:
    result = subprocess.run([*gateway_command(), "serve", "--config", str(ROOT / "config.toml")],
                            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"},
                            timeout=30)
    assert result.returncode == 2
    assert "IMAGERECOGNIZE_API_KEY" in result.stderr


def test_a_table_left_out_takes_exactly_its_dataclass_defaults() -> None:
    """Defaults are written once, on the dataclasses: a config that sets nothing but a team
    reads every section as its dataclass's defaults (a literal default in the parser that
    drifted from the dataclass fails here)."""
    import dataclasses

    from gateway import config as c

    got = c.parse_config({"teams": {"t": {"keys": ["k"], "quota": 1}}},
                         env={"IMAGERECOGNIZE_API_KEY": "x"})
    sections = {"server": c.ServerConfig, "upstream": c.UpstreamConfig,
                "storage": c.StorageConfig, "cache": c.CacheConfig, "quota": c.QuotaConfig,
                "admin": c.AdminConfig, "pricing": c.PricingConfig, "notify": c.NotifyConfig}
    for name, cls in sections.items():
        secrets = {f.name for f in dataclasses.fields(cls) if f.type == "Secret"}
        read = {k: v for k, v in dataclasses.asdict(getattr(got, name)).items()
                if k not in secrets}
        default = {k: v for k, v in dataclasses.asdict(cls()).items() if k not in secrets}
        assert read == default, name
    (team,) = got.teams
    defaults = c.TeamConfig(name="t", key_hashes=team.key_hashes, quota=1)
    assert team == defaults


@pytest.mark.parametrize("section", ["server", "upstream", "storage", "cache", "quota", "admin",
                                     "pricing", "notify"])
def test_every_key_of_a_section_is_known_and_nothing_else(section: str) -> None:
    """The known keys are the dataclass's fields: each is accepted, a neighbour is refused."""
    import dataclasses

    from gateway import config as c

    cls = {f.name: f.type for f in dataclasses.fields(c.Config)}[section]
    cls = getattr(c, cls) if isinstance(cls, str) else cls
    fields = [f.name for f in dataclasses.fields(cls) if f.type != "Secret"]
    assert fields
    with pytest.raises(ConfigError) as refused:
        c.parse_config({section: {"no_such_key": 1}, "teams": {"t": {"keys": ["k"], "quota": 1}}},
                       env={"IMAGERECOGNIZE_API_KEY": "x"})
    message = str(refused.value)
    assert f"{section}.no_such_key: unknown key (known: {', '.join(sorted(fields))})" in message
