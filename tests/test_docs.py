"""docs/architecture.md stays true: every code name and file it cites exists.

The page writes code as `gateway.module.name` (a function, class, attribute, or a method of
exactly one class in that module) and files as `gateway/...`, `tests/...` and the like, each
in backticks; target paths of the planned layout carry no backticks and are not checked.
"""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"
SPAN = re.compile(r"`([^`\n]+)`")
CODE = re.compile(r"gateway(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
PATH = re.compile(r"(?:gateway|tests|bench|docs|scripts|grafana|prometheus)/[\w./-]*")


def cited(kind: re.Pattern[str]) -> list[str]:
    spans = SPAN.findall(ARCHITECTURE.read_text(encoding="utf-8"))
    return sorted({s.removesuffix("()") for s in spans if kind.fullmatch(s.removesuffix("()"))})


def resolve(name: str) -> object:
    """The object ``name`` names, or raise LookupError saying which part is missing."""
    parts = name.split(".")
    module: ModuleType | None = None
    n = len(parts)
    while n > 1:  # the longest prefix that is a module of the package
        try:
            module = importlib.import_module(".".join(parts[:n]))
            break
        except ModuleNotFoundError:
            n -= 1
    if module is None:
        raise LookupError(f"{name}: no such module")
    rest = parts[n:]
    obj: object = module
    if rest and not hasattr(module, rest[0]):
        # `gateway.core.service._lead`: a method of exactly one class defined in the module.
        owners = [
            c
            for _, c in inspect.getmembers(module, inspect.isclass)
            if c.__module__ == module.__name__ and rest[0] in vars(c)
        ]
        if len(owners) != 1:
            where = f"{len(owners)} classes of {module.__name__}"
            raise LookupError(f"{name}: {rest[0]!r} is in {where}")
        obj = owners[0]
    for part in rest:
        if not hasattr(obj, part):
            raise LookupError(f"{name}: {obj!r} has no {part!r}")
        obj = getattr(obj, part)
    return obj


def test_the_architecture_page_cites_only_code_that_exists() -> None:
    names = cited(CODE)
    assert len(names) > 80, "the page cites code as `gateway.module.name`"
    missing = []
    for name in names:
        try:
            resolve(name)
        except LookupError as exc:
            missing.append(str(exc))
    assert missing == []


def test_the_architecture_page_cites_only_files_that_exist() -> None:
    paths = cited(PATH)
    assert len(paths) > 40
    assert [p for p in paths if not (ROOT / p).exists()] == []


def test_every_module_of_the_package_is_on_the_map() -> None:
    """A new module gets a place in the layers' table."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    modules = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "gateway").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    )
    layers = text.partition("## The layers")[2].partition("\n## ")[0]
    assert [m for m in modules if f"`{m}`" not in layers] == []


def test_readme_layout_links_the_map() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1]
    assert "(docs/architecture.md)" in layout


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("gateway.core.service._no_such_step", id="method"),
        pytest.param("gateway.no_such_module.thing", id="module"),
        pytest.param("gateway.core.quota.QuotaLedger.no_such", id="attribute"),
    ],
)
def test_a_name_that_does_not_exist_is_caught(name: str) -> None:
    with pytest.raises(LookupError):
        resolve(name)


def test_the_repository_cites_no_file_outside_it() -> None:
    """A fresh clone has nothing beside it: no file names the design notes it grew from."""
    outside = re.compile(r"\.\./shared|DESIGN\.md|STYLE\.md")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    found = []
    for name in tracked:
        if name == "tests/test_docs.py" or not name.endswith((".py", ".md", ".toml", ".yaml",
                                                             ".yml", ".txt", ".sh", "run")):
            continue
        for n, line in enumerate((ROOT / name).read_text(errors="replace").splitlines(), 1):
            if outside.search(line):
                found.append(f"{name}:{n}: {line.strip()[:80]}")
    assert not found, "\n".join(found)
