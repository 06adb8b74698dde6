"""Cheap checks of the files a command will read, run before anything heavy is imported.

torch, transformers and FFmpeg take seconds to import; a mistyped path or a folder given for a file is
reported before any of them, in a fraction of a second. The decoders (`lyra_cli.audio.io`,
`lyra_cli.engine.model.vision`) run the same check, so the message is the same whichever comes first.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lyra_cli.errors import InputError


def require_input_file(path: str | Path, what: str) -> Path:
    """`path` (with `~` expanded) if it is a readable, non-empty regular file; else an `InputError` naming it.

    `what` names the role in the message: "image", "video", "audio".
    """
    path = Path(path).expanduser()
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(
            f"{what} file `{path}` does not exist", "check the path (a relative path starts at the current folder)"
        ) from None
    except PermissionError:  # a folder on the way cannot be searched
        raise InputError(f"{what} file `{path}` cannot be read (permission denied)", "check the permissions") from None
    except (OSError, ValueError) as exc:  # a name too long, a symlink loop, a NUL byte
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InputError(f"{what} path `{path}` cannot be used ({reason})", "check the path") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"{what} `{path}` is a folder, not a file", f"pass one {what} file")
    if not stat.S_ISREG(info.st_mode):  # a fifo or a device: reading it could block or never end
        raise InputError(f"{what} `{path}` is not a regular file", f"pass a saved {what} file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} file `{path}` cannot be read (permission denied)", "check the file's permissions")
    if info.st_size == 0:  # no format has a 0-byte file; the decoders would only say "invalid data"
        raise InputError(f"{what} file `{path}` is empty (0 bytes)", "check that it was saved or copied completely")
    return path
