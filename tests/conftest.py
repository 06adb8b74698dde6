"""Shared fixtures: the bundled real recordings and one tiny random checkpoint per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "data" / "real"
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="session")
def real() -> Path:
    """`../shared/data/real`, the real recordings and images (see PROVENANCE.md there)."""
    if not REAL.is_dir():
        pytest.skip("../shared/data/real is not beside this checkout")
    return REAL


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never read or write the user's ~/.cache/lyra."""
    os.environ["LYRA_CACHE_DIR"] = str(tmp_path_factory.mktemp("lyra-cache"))


@pytest.fixture(scope="session")
def tiny_dir(_isolated_cache: None) -> Path:
    """The tiny checkpoint (built once per session, read-only for tests)."""
    from lyra_cli.engine.model.tiny import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture
def tiny_copy(tiny_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    target = tmp_path / "tiny"
    shutil.copytree(tiny_dir, target)
    return target


@pytest.fixture(autouse=True)
def _console_not_quiet() -> None:
    """A test that ran the CLI with `-q` leaves the console quiet (`lyra_cli.main.run` resets it only when a
    run starts): tests that call a command's functions directly must not inherit that."""
    from lyra_cli.console import set_quiet

    set_quiet(False)
