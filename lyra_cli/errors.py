"""User-facing failures: one line of message, one line of hint, a fixed exit code.

Everything a user can cause (a bad file, a bad flag, a broken model folder) raises a subclass of
`LyraError`; `lyra_cli.main` prints it without a traceback (unless `--debug`) and exits with
`exit_code`. Data values are quoted in backticks.

The engine is a library: its messages name settings (`device`, `extract`), not command-line flags. A
setting is written `setting("device")` in the text; a library caller reads it as `device`, and the
command line renders it as its flag (`--device`, see `LyraError.render`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

# Marks a setting's name inside a message: control characters no file name or value carries.
_OPEN, _CLOSE = "\x02", "\x03"
_SETTING = re.compile(f"{_OPEN}([a-z_]+){_CLOSE}")


def setting(name: str) -> str:
    """`name` (what the caller sets: a keyword of `lyra_cli.engine.load`, a sampling field, an input kind such
    as `speech`) as an error message names it; the command line shows its flag."""
    return f"{_OPEN}{name}{_CLOSE}"


def _fill(text: str | None, name_of: Callable[[str], str]) -> str | None:
    return None if text is None else _SETTING.sub(lambda m: name_of(m.group(1)), text)


def _bare(name: str) -> str:
    return name


class LyraError(Exception):
    """A failure the user can act on.

    `settings` lists the settings the message names (first: the one at fault), for a caller that maps
    them to its own inputs."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(_fill(message, _bare))
        self._template = (message, hint)
        self.settings = tuple(dict.fromkeys(_SETTING.findall(f"{message}{hint or ''}")))
        self.message = _fill(message, _bare) or ""
        self.hint = _fill(hint, _bare)

    def __str__(self) -> str:
        return self.message

    @property
    def setting(self) -> str | None:
        """The setting at fault, if the message names one."""
        return self.settings[0] if self.settings else None

    def render(self, name_of: Callable[[str], str]) -> tuple[str, str | None]:
        """Message and hint with each setting named by `name_of` (the command line: its flag)."""
        message, hint = self._template
        if self.message != _fill(message, _bare):  # reworded after it was raised: no setting left to map
            message = self.message
        if self.hint != _fill(hint, _bare):
            hint = self.hint
        return _fill(message, name_of) or "", _fill(hint, name_of)


class UsageError(LyraError):
    """Bad command-line usage: an unknown flag value, conflicting options."""

    exit_code = 2


class InputError(LyraError):
    """An input file (image, video, audio, data) is missing or unusable."""


class CheckpointError(LyraError):
    """A model folder is incomplete or inconsistent."""


class RuntimeSetupError(LyraError):
    """The requested device, dtype or quantization is not available here."""


class MissingDependencyError(LyraError):
    """An optional package is needed for the requested feature."""

    def __init__(self, package: str, feature: str, extra: str | None = None) -> None:
        install = f"pip install 'lyra-cli[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{feature} needs the `{package}` package, which is not installed", f"run `{install}`")
