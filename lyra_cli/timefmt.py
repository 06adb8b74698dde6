"""Recording times as people read them. Shared by the engine (evidence spans) and the console (progress)."""

from __future__ import annotations

SECONDS_PER_MINUTE = 60
SECONDS_PER_HOUR = 60 * SECONDS_PER_MINUTE


def clock(seconds: float) -> str:
    """hh:mm:ss of a whole number of seconds (rounded; negative clamps to 0): 3725 -> "01:02:05"."""
    whole = max(0, int(round(seconds)))
    hours, rest = divmod(whole, SECONDS_PER_HOUR)
    minutes, secs = divmod(rest, SECONDS_PER_MINUTE)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}"


def clock_tenths(seconds: float) -> str:
    """hh:mm:ss.t to the nearest tenth of a second (negative clamps to 0): 130.2 -> "00:02:10.2"."""
    tenths = max(0, round(seconds * 10))
    return f"{clock(tenths // 10)}.{tenths % 10}"
