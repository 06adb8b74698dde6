"""write_atomically: the one way lyra writes a file for a user or a later run."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lyra_cli.fileio import write_atomically


def test_writes_the_file_with_ordinary_permissions(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    write_atomically(target, lambda tmp: tmp.write_text("{}"))
    assert target.read_text() == "{}"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "preds.jsonl"
    target.write_text("old\n")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise error

    with pytest.raises(type(error)):
        write_atomically(target, half_then_fail)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["preds.jsonl"]


def test_the_temporary_is_a_dot_name_beside_the_target(tmp_path: Path) -> None:
    seen: list[Path] = []
    write_atomically(tmp_path / "g_00500000", lambda tmp: seen.append(tmp) or tmp.write_bytes(b"x"))
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".g_00500000.")
