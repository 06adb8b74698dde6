"""The only consoles: the answer goes to stdout, everything else (header, progress, errors) to stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from lyra_cli.timefmt import clock

if TYPE_CHECKING:
    from lyra_cli.engine.run.events import TokenLogprob

ui = Console(stderr=True, highlight=False, soft_wrap=True)
# Errors, and stderr output the user asked for (the --logprobs table), show even under -q.
_unquiet = Console(stderr=True, highlight=False, soft_wrap=True)


def set_quiet(quiet: bool) -> None:
    """-q: nothing on stderr but errors and asked-for tables (headers, progress and notes are dropped)."""
    ui.quiet = quiet


def write_answer(text: str) -> None:
    """Payload text, streamed raw (no markup) and flushed so each delta shows at once."""
    sys.stdout.write(text)
    sys.stdout.flush()


def info(message: str) -> None:
    ui.print(f"[dim]{escape(message)}[/dim]")


def error(message: str, hint: str | None) -> None:
    _unquiet.print(f"[bold red]error:[/bold red] {escape(message)}")
    if hint:
        _unquiet.print(f"[yellow]hint:[/yellow] {escape(hint)}")


def logprob_table(entries: Sequence["TokenLogprob"]) -> None:
    """One row per generated token: its text (quoted, so spaces and newlines show), id, log-probability and
    the most likely alternatives. Cells are plain `Text`: a token like `[/]` is not markup."""
    from rich.table import Table
    from rich.text import Text

    with_top = any(entry.top_logprobs for entry in entries)  # none with `--logprobs 0`
    table = Table(box=None, header_style="dim", pad_edge=False)
    table.add_column("token")
    table.add_column("id", justify="right")
    table.add_column("logprob", justify="right")
    if with_top:
        table.add_column("top alternatives")
    for entry in entries:
        row = [Text(_quoted(entry.token)), str(entry.id), f"{entry.logprob:.4f}"]
        if with_top:
            row.append(Text("  ".join(f"{_quoted(t.token)} {t.logprob:.3f}" for t in entry.top_logprobs)))
        table.add_row(*row)
    _unquiet.print(table)  # asked for with --logprobs: payload, kept under -q


def _quoted(token: str) -> str:
    return json.dumps(token, ensure_ascii=False)


class AudioProgress:
    """A stderr progress bar counted in audio time: position, speed as × real time, ETA.

    Feed it `update(done_s, total_s)`; it renders nothing when `enabled` is false (`--quiet`)."""

    def __init__(self, label: str, *, enabled: bool = True) -> None:
        from rich.progress import BarColumn, Progress, TextColumn

        self.enabled = enabled
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[position]}  {task.fields[speed]}  ETA {task.fields[eta]}"),
            console=ui,
            transient=False,
            disable=not enabled,
        )
        self._task = self._progress.add_task(label, total=None, position="", speed="", eta="--:--:--")
        self._start = 0.0

    def __enter__(self) -> "AudioProgress":
        import time

        self._start = time.perf_counter()
        self._started = False
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            self._progress.stop()

    def update(self, done_s: float, total_s: float) -> None:
        import time

        if not self._started:  # started on the first report: a cache hit shows no empty bar
            self._progress.start()
            self._started = True
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        speed = done_s / elapsed
        eta = clock((total_s - done_s) / speed) if speed > 0 and total_s >= done_s else "--:--:--"
        self._progress.update(self._task, completed=done_s, total=total_s or None,
                              position=f"{clock(done_s)} of {clock(total_s)}", speed=f"{speed:.1f}× real time", eta=eta)  # fmt: skip


class PrefillProgress:
    """A stderr bar for the prefill of a long prompt: share of the work done, elapsed, ETA.

    Fed `update(done, total)` in token-layers (`engine.run.prefill`); it goes away as soon as the prefill
    completes, before the answer streams to stdout (the caller prints a summary line after). Nothing
    renders when `enabled` is false (`--quiet`)."""

    def __init__(self, *, enabled: bool = True) -> None:
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("prefill"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=ui,
            transient=True,
            disable=not enabled,
            redirect_stdout=False,  # the answer goes to the real stdout, never through the bar
            redirect_stderr=False,
        )
        self._task = self._progress.add_task("prefill", total=None)
        self._live = False

    def __enter__(self) -> "PrefillProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def update(self, done: int, total: int) -> None:
        if done >= total:
            self._stop()
            return
        if not self._live:
            self._progress.start()
            self._live = True
        self._progress.update(self._task, completed=done, total=total)

    def _stop(self) -> None:
        if self._live:
            self._progress.stop()
            self._live = False

