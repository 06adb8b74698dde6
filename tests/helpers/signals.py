"""Child processes that Ctrl-C can reach, however the test run itself was started."""

from __future__ import annotations

import signal


def sigint_default() -> None:
    """`preexec_fn` for a child the test interrupts: a shell starts background jobs (`cmd &`) with SIGINT
    ignored, children inherit that, and Python then installs no KeyboardInterrupt handler at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
