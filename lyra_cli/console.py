"""The only consoles: the answer goes to stdout, everything else (header, progress, errors) to stderr."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape

ui = Console(stderr=True, highlight=False, soft_wrap=True)


def write_answer(text: str) -> None:
    """Payload text, streamed raw (no markup) and flushed so each delta shows at once."""
    sys.stdout.write(text)
    sys.stdout.flush()


def info(message: str) -> None:
    ui.print(f"[dim]{escape(message)}[/dim]")


def error(message: str, hint: str | None) -> None:
    ui.print(f"[bold red]error:[/bold red] {escape(message)}")
    if hint:
        ui.print(f"[yellow]hint:[/yellow] {escape(hint)}")
