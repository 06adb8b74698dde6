"""Where lyra may write: every output path is checked here, before any model loads or any work starts.

Each command that writes calls `check_output_file` or `check_output_dir` once, with the flag that named the
path (library code passes the `errors.setting` that names it), so a bad path costs the user a one-line error
instead of a run. The checks:

- the path is not an existing folder (for a file) or an existing file (for a folder), nor a device or pipe;
- the nearest existing folder above it is a folder, and a file can really be created there (a probe file is
  created and removed: permission bits, read-only mounts and full disks all show up as they would later);
- every name in the path fits the file system's limit;
- there is room for the output where its size is known in advance;
- an existing file is replaced only when lyra wrote it (recognised by its content: `is_ours`) or when the
  user passed `--overwrite`. A file lyra did not write is never modified or truncated.

Nothing is created by a check (the probe file is removed at once), so a refused run leaves no trace.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from lyra_cli.errors import LyraError, setting

OVERWRITE_FLAG = setting("overwrite")  # a setting: the command line shows `--overwrite`, a library caller `overwrite`
PROBE_PREFIX = ".lyra-probe-"
_FALLBACK_NAME_MAX = 255
_FALLBACK_PATH_MAX = 4096
_REASONS = {
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}

IsOurs = Callable[[Path], bool]


class OutputError(LyraError):
    """An output path that cannot or may not be written: a folder, a file lyra did not write, a read-only
    or full disk. Exit 2, like any other bad flag value: nothing has run yet."""

    exit_code = 2


def check_output_file(
    path: Path,
    *,
    flag: str,
    overwrite: bool = False,
    is_ours: IsOurs | None = None,
    size_bytes: int | None = None,
    create_parent: bool = True,
) -> None:
    """Fail unless `path` can be written as a file now (see the module docstring)."""
    path = Path(path).expanduser()
    _check_name_lengths(path, flag)  # first: a too-long name makes even `is_dir` fail
    if path.is_dir():
        raise OutputError(f"{flag} `{path}` is a folder", f"give a file name, e.g. {flag} {path / 'out'}{path.suffix}")
    if path.exists() and not path.is_file():
        raise OutputError(f"{flag} `{path}` is not a regular file (a device or a pipe)", "give a path to a new file")
    if path.is_file() and not overwrite and not _recognised(path, is_ours):
        raise OutputError(f"{flag} `{path}` exists and was not written by lyra",
                          f"give a new name, or add {OVERWRITE_FLAG} to replace it")  # fmt: skip
    _check_writable(path, path.parent, flag=flag, size_bytes=size_bytes, create=create_parent)


def check_output_dir(path: Path, *, flag: str, size_bytes: int | None = None) -> None:
    """Fail unless `path` is, or can be created as, a writable folder."""
    path = Path(path).expanduser()
    _check_name_lengths(path, flag)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} `{path}` is a file, not a folder", f"give a folder, e.g. {flag} {path}-out")
    _check_writable(path, path, flag=flag, size_bytes=size_bytes)


def check_files_in(folder: Path, names: list[str], *, flag: str, overwrite: bool, is_ours: IsOurs | None) -> None:
    """The files lyra will write in `folder` under `names`: each either absent, or lyra's (or `--overwrite`)."""
    for name in names:
        target = Path(folder).expanduser() / name
        if target.exists():
            check_output_file(target, flag=flag, overwrite=overwrite, is_ours=is_ours)


def check_cache_dir(path: Path, *, env: str, can_do_without: str | None = None) -> None:
    """A cache folder (`$LYRA_CACHE_DIR/…`) lyra must write to; `can_do_without` names the flag that skips it."""
    hint = f"set {env} to a writable folder" + (f", or pass {can_do_without}" if can_do_without else "")
    try:
        check_output_dir(path, flag=env)
    except OutputError as exc:
        raise OutputError(f"the cache folder is unusable: {exc.message}", hint) from None


def _recognised(path: Path, is_ours: IsOurs | None) -> bool:
    if is_ours is None:
        return False
    try:
        return bool(is_ours(path))
    except Exception:  # noqa: BLE001 - an unreadable or foreign file is simply not ours
        return False


def _check_writable(path: Path, folder: Path, *, flag: str, size_bytes: int | None, create: bool = True) -> None:
    """`folder` (which will hold `path`, or is `path`) exists or can be made, and takes a new file now."""
    anchor = _nearest_existing(folder)
    if not anchor.is_dir():
        raise OutputError(f"cannot write {flag} `{path}`: `{anchor}` is a file, not a folder",
                          "give a path whose folders are folders")  # fmt: skip
    if not create and anchor != folder:
        raise OutputError(f"cannot write {flag} `{path}`: the folder `{folder}` does not exist",
                          "create the folder first, or give a path in an existing one")  # fmt: skip
    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=anchor)
    except OSError as exc:
        reason = _REASONS.get(exc.errno or 0, exc.strerror or str(exc))
        raise OutputError(f"cannot write {flag} `{path}` in `{anchor}`: {reason}",
                          "choose a folder you can write to, on a disk with free space") from None  # fmt: skip
    os.close(fd)
    os.unlink(probe)
    if size_bytes is not None:
        free = shutil.disk_usage(anchor).free
        if free < size_bytes:
            raise OutputError(f"{flag} `{path}` needs about {size_bytes / 1e6:,.0f} MB; `{anchor}` has "
                              f"{free / 1e6:,.0f} MB free", "free some space, or write elsewhere")  # fmt: skip


def _nearest_existing(folder: Path) -> Path:
    """The deepest existing path at or above `folder` (a file there is reported by the caller)."""
    current = folder if str(folder) else Path(".")
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def _check_name_lengths(path: Path, flag: str) -> None:
    """Before any `stat`: a name over the limit makes `exists()` itself raise ENAMETOOLONG."""
    name_max, path_max = _limit("PC_NAME_MAX", _FALLBACK_NAME_MAX), _limit("PC_PATH_MAX", _FALLBACK_PATH_MAX)
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            raise OutputError(f"{flag}: the name `{part[:40]}…` is longer than the file system allows "
                              f"({name_max} bytes)", "give a shorter name")  # fmt: skip
    if len(os.fsencode(str(path.absolute()))) >= path_max:
        raise OutputError(f"{flag}: the path `{str(path)[:40]}…` is longer than the system allows ({path_max} bytes)",
                          "give a shorter path")  # fmt: skip


def _limit(name: str, fallback: int) -> int:
    try:
        return os.pathconf(".", name)
    except (OSError, ValueError):
        return fallback


# ---------------------------------------------------------------------------------------------------------
# How lyra recognises its own files (an existing file that passes is replaced or continued without --overwrite)
# ---------------------------------------------------------------------------------------------------------

LYRA_SOFTWARE_TAG = "lyra"  # in a wav's INFO/ISFT chunk and a PNG's `Software` text chunk
_FIRST_LINE_BYTES = 1 << 16


def is_predictions_file(path: Path) -> bool:
    """An eval predictions JSONL: empty (a run killed before its first answer), or a first line that is one
    of lyra's records (`{"id": …, "suite": …}`; a torn first line still starts with `{"id": `)."""
    with open(path, "rb") as handle:
        head = handle.read(_FIRST_LINE_BYTES)
    if not head.strip():
        return True
    first, newline, _ = head.partition(b"\n")
    if not newline:  # a single torn line: only its start can be checked
        return first.startswith(b'{"id": ')
    import json

    record = json.loads(first)
    return isinstance(record, dict) and "id" in record and "suite" in record


def is_jsonl_with(*keys: str) -> IsOurs:
    """A JSONL log whose first record has all of `keys` (e.g. training's metrics.jsonl: step, loss)."""

    def check(path: Path) -> bool:
        import json

        with open(path, "rb") as handle:
            first = handle.readline(_FIRST_LINE_BYTES)
        if not first.strip():
            return path.stat().st_size == 0
        record = json.loads(first)
        return isinstance(record, dict) and all(key in record for key in keys)

    return check


def is_json_with(*keys: str) -> IsOurs:
    """A JSON object with all of `keys` (e.g. needle.json) — or, without keys, any object of strings (an
    MM-Vet export: id → answer)."""

    def check(path: Path) -> bool:
        import json

        value = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(value, dict):
            return False
        return all(key in value for key in keys) if keys else all(isinstance(v, str) for v in value.values())

    return check


def is_lyra_wav(path: Path) -> bool:
    """A wav lyra wrote: tagged `lyra` in its INFO chunk (`audio.playback` writes the tag)."""
    import soundfile

    with soundfile.SoundFile(path) as handle:
        return str(handle.software).startswith(LYRA_SOFTWARE_TAG)


def is_lyra_png(path: Path) -> bool:
    """A PNG lyra drew: `Software: lyra` in its text chunks."""
    from PIL import Image

    with Image.open(path) as image:
        return image.format == "PNG" and image.info.get("Software") == LYRA_SOFTWARE_TAG
