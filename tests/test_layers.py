"""The layers: commands → engine → audio, never backwards; the engine and audio never import the CLI toolkit.

Two guards. Statically, every import statement under `lyra_cli/engine` and `lyra_cli/audio` (at module level
or inside a function) is read with `ast`. Dynamically, a fresh interpreter imports every one of their modules
and then looks at `sys.modules`, which also catches a toolkit pulled in through a third module.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "lyra_cli"
LIBRARY_PACKAGES = ("engine", "audio")
CLI_TOOLKITS = ("typer", "rich", "click")  # click comes with typer: importing it is the same mistake
# What each library package must never import: the CLI toolkits and the layers above it.
FORBIDDEN = {
    "engine": (*CLI_TOOLKITS, "lyra_cli.commands", "lyra_cli.main", "lyra_cli.console", "lyra_cli.serve"),
    "audio": (*CLI_TOOLKITS, "lyra_cli.commands", "lyra_cli.main", "lyra_cli.console", "lyra_cli.engine",
              "lyra_cli.serve"),
    # the HTTP server sits beside the commands, over the engine: it never prints or parses a command line
    "serve": (*CLI_TOOLKITS, "lyra_cli.commands", "lyra_cli.main", "lyra_cli.console"),
}

_IMPORT_ALL = """
import importlib, json, pkgutil, sys
import lyra_cli.audio, lyra_cli.engine

names = []
for package in (lyra_cli.engine, lyra_cli.audio):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)
        names.append(module.name)
print(json.dumps({"imported": names, "toolkits": sorted(m for m in %r if m in sys.modules)}))
""" % (CLI_TOOLKITS,)


def _imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import statement in `path`, wherever it stands."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                parts = path.relative_to(REPO).with_suffix("").parts[: -node.level]
                base = ".".join(parts)
                names.append((node.lineno, f"{base}.{node.module}" if node.module else base))
            else:
                names.append((node.lineno, node.module or ""))
    return names


def _matches(name: str, forbidden: str) -> bool:
    return name == forbidden or name.startswith(forbidden + ".")


@pytest.mark.parametrize("package", [*LIBRARY_PACKAGES, "serve"])
def test_no_import_statement_reaches_up_or_into_the_cli_toolkit(package: str) -> None:
    files = sorted((PACKAGE / package).rglob("*.py"))
    assert len(files) > 3  # the walk found the package
    offending = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in files
        for line, name in _imported_names(path)
        if any(_matches(name, forbidden) for forbidden in FORBIDDEN[package])
    ]
    assert offending == []


def test_importing_every_engine_and_audio_module_loads_no_cli_toolkit() -> None:
    done = subprocess.run([sys.executable, "-c", _IMPORT_ALL], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    expected = {
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for package in LIBRARY_PACKAGES
        for path in (PACKAGE / package).rglob("*.py")
        if path.name != "__init__.py" or path.parent != PACKAGE / package
    }
    assert set(report["imported"]) == expected  # every module was really imported
    assert report["toolkits"] == []
