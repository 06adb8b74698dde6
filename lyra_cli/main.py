"""`lyra`: the command-line entry point.

Commands are registered here and imported lazily inside their functions' modules, so `lyra --help`
never imports torch. Every `LyraError` becomes one `error:` line and one `hint:` line on stderr with
its exit code (1, or 2 for usage); a traceback only with `--debug`.
"""

from __future__ import annotations

import logging
import os
import sys

import click
import typer

from lyra_cli import __version__
from lyra_cli.commands import common
from lyra_cli.commands.cache import cache_app
from lyra_cli.commands.chat import chat
from lyra_cli.commands.eval import eval_app
from lyra_cli.commands.info import info
from lyra_cli.commands.listen import listen
from lyra_cli.commands.longspeech import longspeech
from lyra_cli.commands.serve import serve
from lyra_cli.commands.train import train_app
from lyra_cli.errors import LyraError

EXIT_INTERRUPTED = 130


def _usage_errors() -> tuple[type[BaseException], ...]:
    """click's UsageError and typer's copy of it: typer >= 0.26 vendors its own click, whose exceptions
    are not click's (missing it turns `lyra chat --bogus` into a traceback)."""
    try:
        from typer._click.exceptions import UsageError as VendoredUsageError
    except ImportError:  # an older typer running on click itself
        return (click.UsageError,)
    return (click.UsageError, VendoredUsageError)


USAGE_ERRORS = _usage_errors()
EXITS = (click.exceptions.Exit, typer.Exit)
ABORTS = (click.exceptions.Abort, typer.Abort)
NOISY_LIBRARIES = ("transformers", "bitsandbytes", "peft", "accelerate")
WARNINGS_LOGGER = "py.warnings"  # where logging.captureWarnings sends `warnings.warn`
QUIET_FLAGS = ("-q", "--quiet")
NO_ARGS_IS_HELP = "NoArgsIsHelpError"  # click's usage "error" that only shows the help

app = typer.Typer(
    name="lyra",
    help="Run Lyra, the speech-centric omni-modal model (arXiv 2412.09501): images, video, speech and text in, "
    "streamed text and speech out. Without --model, commands use a tiny random model of the release layout.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command(help="Ask about images, video and speech, one-shot or in a multi-turn REPL.")(chat)
app.command(help="Ask questions about a long recording (minutes to hours), with a speech-token cache.")(longspeech)
app.command(help="Talk with Lyra: spoken turns in, text and speech out, with barge-in.")(listen)
app.command(help="Serve Lyra over an OpenAI-compatible HTTP API (chat completions, speech out) with a web page.")(serve)
app.command(help="Describe a model folder: config, weights, where its towers and vocoder are found, memory needed.")(info)
app.add_typer(eval_app, name="eval")
app.add_typer(train_app, name="train")
app.add_typer(cache_app, name="cache")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lyra {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show engine logs (info level) and library warnings on stderr."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the answer and errors: no header, progress or warnings (as each command's -q)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    quiet = quiet or _command_quiet(common.ARGV)
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Third-party warnings (numpy, torch, PyAV...) go through logging: shown with -v, hidden otherwise.
    logging.captureWarnings(True)
    logging.getLogger(WARNINGS_LOGGER).setLevel(logging.WARNING if verbose or debug else logging.CRITICAL)
    if quiet:
        from lyra_cli.console import set_quiet

        set_quiet(True)
    if not debug:
        # Libraries log about internals a user cannot act on (config validation of tower configs,
        # optional CPU kernels); our own loader reports what matters.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # transformers resets its level on import
        for name in NOISY_LIBRARIES:
            logging.getLogger(name).setLevel(logging.ERROR)


def _command_quiet(argv: list[str]) -> bool:
    """Each command's own -q/--quiet means the same as the global one (everything before a `--`)."""
    options = argv[: argv.index("--")] if "--" in argv else argv
    return any(arg in QUIET_FLAGS for arg in options)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (also used by tests)."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    common.ARGV[:] = args
    from lyra_cli.console import set_quiet

    set_quiet(False)  # a previous in-process run's -q does not carry over
    try:
        # click returns (rather than raises) the code of `typer.Exit` when standalone_mode is off
        code = app(args=args, prog_name="lyra", standalone_mode=False)
    except LyraError as exc:
        if debug:
            raise
        from lyra_cli.console import error

        message, hint = exc.render(common.flag_for)  # the engine names settings, the user typed flags
        error(message, hint or f"see `{_command_path(args)} --help`")
        return exc.exit_code
    except EXITS as exc:
        code = exc.exit_code  # type: ignore[attr-defined]
    except USAGE_ERRORS as exc:
        from lyra_cli.console import error

        if type(exc).__name__ == NO_ARGS_IS_HELP:  # a bare `lyra train`: the help is the answer
            exc.show()  # type: ignore[attr-defined]
            return 2

        ctx = getattr(exc, "ctx", None)
        path = ctx.command_path if ctx is not None else _command_path(args)
        error(exc.format_message(), f"see `{path} --help`")  # type: ignore[attr-defined]
        return 2
    except (*ABORTS, KeyboardInterrupt):
        code = EXIT_INTERRUPTED
    if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C into a silent Exit(130)
        sys.stderr.write("interrupted\n")  # plain write: this may run while a Rich console is mid-render
        sys.stderr.flush()
    return code if isinstance(code, int) else 0


def _command_path(args: list[str]) -> str:
    """`lyra train stage1` from the arguments: the command words before the first option."""
    words = []
    for arg in args:
        if arg.startswith("-") or len(words) == (2 if words and words[0] in GROUPS else 1):
            break
        words.append(arg)
    return " ".join(["lyra", *words])


GROUPS = ("train", "eval", "cache")


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
