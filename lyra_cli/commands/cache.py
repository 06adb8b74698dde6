"""`lyra cache`: where the speech-token cache lives, how big it is, and clearing it."""

from __future__ import annotations

import typer

cache_app = typer.Typer(help="Inspect or clear the speech-token cache ($LYRA_CACHE_DIR/speech).", no_args_is_help=True)


@cache_app.command("info")
def cache_info() -> None:
    """Print the cache folder, its entry count and size."""
    from lyra_cli.console import write_answer
    from lyra_cli.engine.run.speech_cache import SpeechTokenCache

    root = _usable_root()
    cache = SpeechTokenCache(root)
    entries = len(list(root.glob("*.safetensors"))) if root.is_dir() else 0
    write_answer(f"{root}\n{entries} entries, {cache.size_bytes() / 1e6:.1f} MB\n")


@cache_app.command("clear")
def cache_clear() -> None:
    """Delete every cached recording (they are rebuilt on the next question)."""
    from lyra_cli.console import info
    from lyra_cli.engine.run.speech_cache import SpeechTokenCache

    removed = SpeechTokenCache(_usable_root()).clear()
    info(f"removed {removed} cached recording(s)")


def _usable_root():  # noqa: ANN202
    """The cache folder; a file in its place is an error (an absent folder is an empty cache)."""
    from lyra_cli.engine.run.speech_cache import default_cache_dir
    from lyra_cli.fileio import CACHE_DIR_ENV
    from lyra_cli.outputs import OutputError

    root = default_cache_dir()
    for folder in (root, *root.parents):
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"the cache folder `{root}` cannot exist: `{folder}` is a file",
                              f"set {CACHE_DIR_ENV} to a folder")  # fmt: skip
    return root
