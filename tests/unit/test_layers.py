"""Dependencies point one way: ``app -> annotation, db -> dmad_core`` (../shared/DESIGN.md), and inside
``app`` the edges (CLI commands, Streamlit pages) sit on services, never the other way round.

Every module of every package is parsed (no import runs) and each of its imports, including those
inside functions and under ``TYPE_CHECKING``, is checked against the layer table below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("dmad_core", "db", "migrations", "annotation", "app")

# component -> rank. A module may import its own component and components of a lower rank only.
# Components of the same rank are independent of each other (db and annotation know nothing of each
# other; the CLI commands and the Streamlit pages neither).
RANKS: dict[str, int] = {
    "dmad_core": 0,  # the method as a library, and the error types every layer raises
    "db": 1,  # models, queue, repositories, with their migrations
    "annotation": 1,  # Label Studio: server process, project, parsing, receiver, sync
    "app.home_folder": 2,  # the home folder's layout and settings
    "app.signals": 2,  # stop signals of long-running processes
    "app.services": 3,  # what the product does, called by every edge
    "app.worker": 4,  # runs queued jobs through the services
    "app.supervisor": 4,  # runs the product's processes (`dmad up`)
    "app.api": 4,  # HTTP edge (`dmad serve`): routes over services, started by a command
    "app.commands": 5,  # CLI edge: parse arguments, call services
    "app.ui": 5,  # Streamlit edge
    "app.cli": 6,  # the `dmad` entry point over the commands
}
ALIASES = {"migrations": "db"}  # the schema's history is part of db


def component(module: str) -> str | None:
    """The layer component of a first-party module name, None for a third-party one."""
    top = module.split(".")[0]
    if top not in PACKAGES:
        return None
    if top in ALIASES:
        return ALIASES[top]
    if module == "app":  # the namespace itself (`from .. import worker` names app.worker, checked too)
        return None
    for name in sorted(RANKS, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    return "unclassified:" + module


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) of every import in the tree, anywhere in it (relative imports resolved)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names
                      if component(f"{target}.{alias.name}") not in (None, component(target))]
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """Imports of ``module`` (given its source) that point up or sideways in the layer table."""
    own = component(module)
    assert own is not None and own in RANKS, f"{module} is in no layer; add it to RANKS"
    out = []
    for line, target in imported_names(ast.parse(source), module, is_package):
        other = component(target)
        if other is None or other == own:
            continue
        if other not in RANKS or RANKS[other] >= RANKS[own]:
            out.append(f"{module}:{line} imports {target} ({own} may not depend on {other})")
    return out


def first_party_modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_every_module_imports_only_lower_layers() -> None:
    paths = first_party_modules()
    assert len(paths) > 40  # the walk found the tree
    problems = [v for p in paths if module_name(p) != "app"  # the empty namespace package
                for v in violations(p.read_text(), module_name(p), p.name == "__init__.py")]
    assert problems == []


@pytest.mark.parametrize("package", ["dmad_core", "db", "annotation"])
def test_lower_packages_name_nothing_of_app(package: str) -> None:
    for path in (ROOT / package).rglob("*.py"):
        for _line, target in imported_names(ast.parse(path.read_text()), module_name(path), path.name == "__init__.py"):
            assert target.split(".")[0] != "app", f"{path} imports {target}"


@pytest.mark.parametrize(("module", "source"), [
    ("annotation.sink", "from app.home_folder import Home"),  # a lower package naming the app
    ("db.repositories", "def f():\n    import app.services.loop.annotations\n"),  # inside a function
    ("annotation.server", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from db.models import Image\n"),
    ("app.services.labelstudio.tasks", "from app.commands.labelstudio import connect_project"),  # service -> CLI
    ("app.worker", "from app.commands import labelstudio"),  # the module named in `from package import module`
    ("app.ui.context", "from app.commands.loop import cmd_train"),  # one edge reaching into another
    ("dmad_core.model", "from db.models import Image"),
    ("app.services.home_model", "from .. import worker"),  # relative, resolved to app.worker
])
def test_the_check_catches_an_upward_import(module: str, source: str) -> None:
    found = violations(source, module)
    assert len(found) == 1 and module in found[0]


def test_the_check_allows_downward_imports() -> None:
    assert violations("from . import annotations", "app.services.home_model") == []
    assert violations("from dmad_core.errors import NotFound\nfrom app.home_folder import Home\n"
                      "from db.models import Image\nfrom annotation.sink import MemorySink\n",
                      "app.services.labelstudio.sink") == []
