"""User-facing failures: one line of message, one line of hint, a fixed exit code.

Everything a user can cause (a bad file, a bad flag, a broken model folder) raises a subclass of
`LyraError`; `lyra_cli.main` prints it without a traceback (unless `--debug`) and exits with
`exit_code`. Data values are quoted in backticks.
"""

from __future__ import annotations


class LyraError(Exception):
    """A failure the user can act on."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


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
