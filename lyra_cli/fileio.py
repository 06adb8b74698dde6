"""Files that appear whole or not at all: every file lyra writes for a user or a later run goes through here."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"
NEW_FILE_MODE = 0o666  # what open() would give a new file, before the umask
CACHE_DIR_ENV = "LYRA_CACHE_DIR"
DEFAULT_CACHE_ROOT = Path("~/.cache/lyra")


def cache_root() -> Path:
    """`$LYRA_CACHE_DIR`, or `~/.cache/lyra` when it is unset or empty: the tiny models and the speech-token
    cache live below it."""
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_ROOT).expanduser()


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Run `write(temp)` on a temporary file beside `path`, make it durable, then rename it over `path`.

    The temporary is a dot-name in the same folder (a rename is atomic only within one file system, and a
    dot-name never matches a reader's glob such as `g_*` or `*.safetensors`); it is fsynced before the
    rename, so a power cut cannot leave the name pointing at missing data; it gets the permissions a newly
    opened file would (mkstemp's are 0600: a merged model or a WAV should be readable like any output);
    and it is removed on any failure, Ctrl-C included. Readers see the old file or the new one, never a part.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    temp = Path(name)
    try:
        try:
            os.fchmod(fd, NEW_FILE_MODE & ~_umask())
        finally:
            os.close(fd)
        write(temp)
        _fsync(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)  # the only way to read it is to set it
    os.umask(current)
    return current


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
