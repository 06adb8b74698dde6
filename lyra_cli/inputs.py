"""Cheap checks of the files a command will read, run before anything heavy is imported.

torch, transformers and FFmpeg take seconds to import; a mistyped path or a folder given for a file is
reported before any of them, in a fraction of a second. The decoders (`lyra_cli.audio.io`,
`lyra_cli.engine.vision`) run the same check, so the message is the same whichever comes first.
"""

from __future__ import annotations

import os
from pathlib import Path

from lyra_cli.errors import InputError


def require_input_file(path: str | Path, what: str) -> Path:
    """`path` (with `~` expanded) if it is a readable regular file; else an `InputError` naming it.

    `what` names the role in the message: "image", "video", "audio".
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{what} `{path}` is a folder, not a file", f"pass one {what} file")
    if not path.exists():
        raise InputError(
            f"{what} file `{path}` does not exist", "check the path (a relative path starts at the current folder)"
        )
    if not path.is_file():  # a fifo or a device: reading it could block or never end
        raise InputError(f"{what} `{path}` is not a regular file", f"pass a saved {what} file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} file `{path}` cannot be read (permission denied)", "check the file's permissions")
    if path.stat().st_size == 0:  # no format has a 0-byte file; the decoders would only say "invalid data"
        raise InputError(f"{what} file `{path}` is empty (0 bytes)", "check that it was saved or copied completely")
    return path
