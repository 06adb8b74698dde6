"""Input paths are checked before anything heavy is imported: a bad path costs no torch import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lyra_cli.errors import InputError
from lyra_cli.inputs import require_input_file

HEAVY_MODULES = ("torch", "transformers", "av", "safetensors", "peft")
INFO_HEAVY_MODULES = ("torch", "transformers", "av", "peft", "accelerate")


def test_a_readable_file_passes_with_home_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "q.wav").write_bytes(b"RIFF")
    assert require_input_file("~/q.wav", "audio") == tmp_path / "q.wav"


def test_missing_folder_fifo_and_unreadable_are_told_apart(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"audio file `.*nope\.wav` does not exist"):
        require_input_file(tmp_path / "nope.wav", "audio")
    with pytest.raises(InputError, match=r"image `.*` is a folder, not a file"):
        require_input_file(tmp_path, "image")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match=r"image file `.*empty\.png` is empty \(0 bytes\)"):
        require_input_file(tmp_path / "empty.png", "image")
    with pytest.raises(InputError, match=r"audio path `a+` cannot be used \(File name too long\)"):
        require_input_file("a" * 5000, "audio")
    loop = tmp_path / "loop.wav"
    loop.symlink_to(loop)
    with pytest.raises(InputError, match=r"audio path `.*loop\.wav` cannot be used"):
        require_input_file(loop, "audio")
    fifo = tmp_path / "pipe.mp3"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="is not a regular file"):
        require_input_file(fifo, "audio")
    locked = tmp_path / "locked.jpg"
    locked.write_bytes(b"\xff\xd8")
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads anything
        pytest.skip("running as root: permissions are not enforced")
    with pytest.raises(InputError, match="permission denied"):
        require_input_file(locked, "image")


def test_bad_input_paths_fail_before_any_heavy_import(tmp_path: Path) -> None:
    """Each command's bad path, in one interpreter: exit 1, the path named, and none of torch & co loaded."""
    missing, folder = tmp_path / "missing.mp3", tmp_path / "photos"
    folder.mkdir()
    calls = [
        ["chat", "--speech", str(missing), "--text", "hi"],
        ["chat", "--text", "hi", "--image", str(folder)],
        ["chat", "--video", str(missing), "--text", "hi"],
        ["longspeech", str(missing), "--ask", "what is said?"],
        ["listen", "--input-file", str(folder)],
    ]
    code = (
        "import sys; from lyra_cli.main import run\n"
        f"for argv in {calls!r}:\n"
        "    print('RC', run(argv))\n"
        f"print('HEAVY', [m for m in {HEAVY_MODULES!r} if m in sys.modules])\n"
    )
    env = {**os.environ, "LYRA_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.count("RC 1") == len(calls), done.stdout + done.stderr
    assert "HEAVY []" in done.stdout, done.stdout
    assert done.stderr.count("does not exist") == 3 and done.stderr.count("is a folder") == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "cache").exists()  # nothing was built either (the tiny model is not needed yet)


def test_info_reads_a_model_folder_without_importing_torch(tiny_dir: Path) -> None:
    """`lyra info` reads config.json and safetensors headers (safetensors itself is light): no torch & co."""
    code = (
        "import sys; from lyra_cli.main import run\n"
        f"rc = run(['info', '--model', {str(tiny_dir)!r}])\n"
        f"print('RC', rc, 'HEAVY', [m for m in {INFO_HEAVY_MODULES!r} if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "RC 0 HEAVY []" in done.stdout, done.stdout + done.stderr
