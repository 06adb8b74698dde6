"""Speech needle in a haystack (the paper's Fig. 6): can the model find one spoken fact in a long recording?

For every length L and depth d of the grid, a recording of exactly L seconds is built: the haystack clips
one after another, repeated as needed, with the needle clip (padded by a short silence each side) placed
so that a fraction d of the haystack comes before it. The recording goes through the long-speech path
(`RecordingEncoder`: streamed, windowed, batched; the speech-token cache is bypassed) and is asked the
question in the official long-speech layout `<speech>\\n{question}`.

Scoring rule: a cell scores 1 when any expected answer, normalised (lower-case, punctuation removed,
whitespace collapsed), appears in the normalised prediction as whole words; else 0. With the extractor
on, each cell also records which share of the needle's seconds survived its last drop (`needle_kept`).
"""

from __future__ import annotations

import math
import tempfile
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lyra_cli.audio.io import SAMPLE_RATE_HZ
from lyra_cli.errors import UsageError

NEEDLE_PAD_S = 0.5  # silence around the needle, so it is heard as an utterance of its own
NEEDLE_MAX_NEW_TOKENS = 64  # the answer is a short fact
WAV_SUBTYPE = "FLOAT"  # the temporary recordings keep the float samples exactly

CellCallback = Callable[[int, int, "NeedleCell"], None]  # (done, total, the cell just scored)


@dataclass(frozen=True)
class NeedleSpec:
    question: str
    answers: tuple[str, ...]
    lengths_s: tuple[float, ...]
    depths: tuple[float, ...]  # fractions of the haystack before the needle, in [0, 1]


@dataclass(frozen=True)
class NeedleCell:
    length_s: float
    depth: float
    needle_start_s: float
    prediction: str
    score: float
    prompt_tokens: int
    kept_tokens: int
    needle_kept: float | None  # share of the needle's seconds the extractor kept; None with it off
    seconds: float


# ---------------------------------------------------------------------------------------------------
# Recordings


def tile(clips: Sequence[np.ndarray], n_samples: int) -> np.ndarray:
    """The clips one after another, repeated and cut to `n_samples`: (n_samples,) float32."""
    cycle = np.concatenate([np.asarray(c, dtype=np.float32) for c in clips])
    if cycle.size == 0:
        raise UsageError("the haystack has no audio", "give a --haystack recording with speech")
    return np.tile(cycle, n_samples // cycle.size + 1)[:n_samples]


def padded_needle(needle: np.ndarray) -> np.ndarray:
    pad = np.zeros(round(NEEDLE_PAD_S * SAMPLE_RATE_HZ), dtype=np.float32)
    return np.concatenate([pad, needle.astype(np.float32), pad])


def compose(haystack: Sequence[np.ndarray], needle: np.ndarray, length_s: float,
            depth: float) -> tuple[np.ndarray, float]:  # fmt: skip
    """A recording of `length_s` with the padded needle after `depth` of the haystack: (samples, needle start s)."""
    inserted = padded_needle(needle)
    n_total = round(length_s * SAMPLE_RATE_HZ)
    n_hay = n_total - inserted.size
    if n_hay < 0:
        raise UsageError(f"a {length_s:g} s recording cannot hold the {inserted.size / SAMPLE_RATE_HZ:.1f} s needle",
                         "give --lengths longer than the needle")  # fmt: skip
    hay = tile(haystack, n_hay)
    at = round(depth * n_hay)
    recording = np.concatenate([hay[:at], inserted, hay[at:]])
    return recording, (at + round(NEEDLE_PAD_S * SAMPLE_RATE_HZ)) / SAMPLE_RATE_HZ


# ---------------------------------------------------------------------------------------------------
# Scoring


def normalize(text: str) -> str:
    """Lower-case, accents and punctuation removed, whitespace collapsed: `"Country!"` → `"country"`."""
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in text if not unicodedata.combining(ch))
    return " ".join(text.split())


def needle_score(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when a normalised answer occurs in the normalised prediction as whole words, else 0.0."""
    said = f" {normalize(prediction)} "
    return float(any(normalize(a) and f" {normalize(a)} " in said for a in answers))


def kept_share(evidence: list[dict], start_s: float, end_s: float) -> float:
    """The share of [start_s, end_s] covered by the kept spans of the (only) speech clip."""
    spans = evidence[0]["spans"] if evidence else []
    covered = sum(max(0.0, min(end_s, e) - max(start_s, s)) for s, e in spans)
    return round(covered / (end_s - start_s), 4) if end_s > start_s else 0.0


# ---------------------------------------------------------------------------------------------------
# The grid


@dataclass
class NeedleGrid:
    spec: NeedleSpec
    cells: list[NeedleCell]
    extract: str | None
    needle_s: float

    def table(self, field_name: str) -> list[list[Any]]:
        """[length][depth] of one cell field."""
        by_key = {(c.length_s, c.depth): getattr(c, field_name) for c in self.cells}
        return [[by_key.get((length, depth)) for depth in self.spec.depths] for length in self.spec.lengths_s]

    def to_json(self, **context: Any) -> dict[str, Any]:
        scores = [c.score for c in self.cells]
        return {
            **context, "question": self.spec.question, "answers": list(self.spec.answers), "extract": self.extract,
            "needle_s": round(self.needle_s, 3), "lengths_s": list(self.spec.lengths_s),
            "depths": list(self.spec.depths),
            "scores": self.table("score"), "predictions": self.table("prediction"),
            "prompt_tokens": self.table("prompt_tokens"), "kept_tokens": self.table("kept_tokens"),
            "needle_kept": self.table("needle_kept"), "needle_start_s": self.table("needle_start_s"),
            "seconds": self.table("seconds"), "mean_score": sum(scores) / len(scores) if scores else None,
            "cells": [asdict(c) for c in self.cells],
        }  # fmt: skip


def run_needle(
    engine: Any,
    haystack: Sequence[np.ndarray],
    needle: np.ndarray,
    spec: NeedleSpec,
    *,
    sampling: Any,
    extractor: Any = None,
    extract_label: str | None = None,
    on_cell: CellCallback | None = None,
) -> NeedleGrid:
    """Ask the question about every (length, depth) recording; one `NeedleCell` per grid cell."""
    cells = []
    asking = _Asking(engine, sampling, extractor)
    total = len(spec.lengths_s) * len(spec.depths)
    with tempfile.TemporaryDirectory(prefix="lyra-needle-") as work:
        for length_s in spec.lengths_s:
            for depth in spec.depths:
                cell = _cell(asking, haystack, needle, spec, length_s, depth, Path(work))
                cells.append(cell)
                if on_cell is not None:
                    on_cell(len(cells), total, cell)
    return NeedleGrid(spec, cells, extract_label, needle.size / SAMPLE_RATE_HZ)


@dataclass(frozen=True)
class _Asking:
    """The same question, decoding and extractor for every recording of the grid."""

    engine: Any
    sampling: Any
    extractor: Any = None

    def ask(self, part: Any, question: str) -> Any:
        from lyra_cli.engine.run.prompt import Conversation, TextPart

        return self.engine.generate(Conversation(), [part, TextPart(question)], self.sampling,
                                    extractor=self.extractor)  # fmt: skip


def _cell(asking: _Asking, haystack: Sequence[np.ndarray], needle: np.ndarray, spec: NeedleSpec, length_s: float,
          depth: float, work: Path) -> NeedleCell:  # fmt: skip
    import soundfile as sf

    from lyra_cli.engine.run.longspeech import LongSpeechSettings, RecordingEncoder

    recording, start_s = compose(haystack, needle, length_s, depth)
    path = work / f"needle-{length_s:g}s-{depth:g}.wav"
    sf.write(path, recording, SAMPLE_RATE_HZ, subtype=WAV_SUBTYPE)
    began = time.perf_counter()
    part, _ = RecordingEncoder(asking.engine, LongSpeechSettings(use_cache=False), cache=None).encode(path)
    path.unlink()
    done = asking.ask(part, spec.question)
    end_s = start_s + needle.size / SAMPLE_RATE_HZ
    return NeedleCell(
        length_s=length_s, depth=depth, needle_start_s=round(start_s, 3), prediction=done.text,
        score=needle_score(done.text, spec.answers), prompt_tokens=done.prompt_tokens, kept_tokens=done.kept_tokens,
        needle_kept=kept_share(done.evidence, start_s, end_s) if _enabled(asking.extractor) else None,
        seconds=round(time.perf_counter() - began, 3),
    )  # fmt: skip


def _enabled(extractor: Any) -> bool:
    return extractor is not None and extractor.enabled


# ---------------------------------------------------------------------------------------------------
# The heat map (Pillow only: no plotting library to install)

CELL_W, CELL_H = 96, 48
MARGIN_LEFT, MARGIN_TOP, MARGIN_RIGHT, MARGIN_BOTTOM = 110, 64, 96, 72
LEGEND_W = 18
TITLE_PAD = 24  # pixels either side of the title
FONT_SIZE, TITLE_SIZE = 14, 17
BACKGROUND, INK, GRID_LINE = (255, 255, 255), (30, 30, 30), (255, 255, 255)
# score 0 → red, 0.5 → amber, 1 → green (the palette of the usual needle-in-a-haystack plots)
COLOR_STOPS = ((0.0, (214, 62, 62)), (0.5, (240, 196, 70)), (1.0, (58, 160, 90)))


def score_color(score: float | None) -> tuple[int, int, int]:
    if score is None or math.isnan(score):
        return (200, 200, 200)
    score = min(1.0, max(0.0, score))
    for (s0, c0), (s1, c1) in zip(COLOR_STOPS, COLOR_STOPS[1:]):
        if score <= s1:
            t = (score - s0) / (s1 - s0)
            return tuple(round(a + t * (b - a)) for a, b in zip(c0, c1))  # type: ignore[return-value]
    return COLOR_STOPS[-1][1]


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def length_label(length_s: float) -> str:
    return f"{length_s / 60:.2f}".rstrip("0").rstrip(".")


def draw_heatmap(grid: NeedleGrid, title: str) -> Any:
    """Rows: depth (0 % at the top); columns: recording length in minutes; colour and number: the score."""
    from PIL import Image, ImageDraw

    n_cols, n_rows = len(grid.spec.lengths_s), len(grid.spec.depths)
    font, title_font = _font(FONT_SIZE), _font(TITLE_SIZE)
    plot_w = MARGIN_LEFT + n_cols * CELL_W + MARGIN_RIGHT
    width = max(plot_w, int(title_font.getlength(title)) + 2 * TITLE_PAD)  # a long title widens the image
    left = MARGIN_LEFT + (width - plot_w) // 2  # … and the plot stays centred under it
    image = Image.new("RGB", (width, MARGIN_TOP + n_rows * CELL_H + MARGIN_BOTTOM), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((width / 2, MARGIN_TOP / 2), title, fill=INK, font=title_font, anchor="mm")
    _cells(draw, font, grid, left)
    _axes(image, draw, font, grid, left)
    _legend(draw, font, left + n_cols * CELL_W + 30, MARGIN_TOP, n_rows * CELL_H)
    return image


def _cells(draw: Any, font: Any, grid: NeedleGrid, left: int) -> None:
    scores = grid.table("score")  # [length][depth]
    for col in range(len(grid.spec.lengths_s)):
        for row in range(len(grid.spec.depths)):
            x0, y0 = left + col * CELL_W, MARGIN_TOP + row * CELL_H
            score = scores[col][row]
            draw.rectangle((x0, y0, x0 + CELL_W, y0 + CELL_H), fill=score_color(score), outline=GRID_LINE, width=2)
            text = "–" if score is None else f"{score:.2f}".rstrip("0").rstrip(".")
            draw.text((x0 + CELL_W / 2, y0 + CELL_H / 2), text, fill=INK, font=font, anchor="mm")


def _axes(image: Any, draw: Any, font: Any, grid: NeedleGrid, left: int) -> None:
    n_cols, n_rows = len(grid.spec.lengths_s), len(grid.spec.depths)
    bottom = MARGIN_TOP + n_rows * CELL_H
    for col, length_s in enumerate(grid.spec.lengths_s):
        draw.text((left + (col + 0.5) * CELL_W, bottom + 14), length_label(length_s), fill=INK, font=font, anchor="mm")
    for row, depth in enumerate(grid.spec.depths):
        y = MARGIN_TOP + (row + 0.5) * CELL_H
        draw.text((left - 10, y), f"{depth * 100:g} %", fill=INK, font=font, anchor="rm")
    draw.text((left + n_cols * CELL_W / 2, bottom + 44), "recording length (minutes)", fill=INK, font=font, anchor="mm")
    _vertical_text(image, "needle depth", (left - MARGIN_LEFT + 22, MARGIN_TOP + n_rows * CELL_H // 2), font)


def _vertical_text(image: Any, text: str, center: tuple[int, int], font: Any) -> None:
    """Text turned 90° (reading bottom to top), centred on `center`: the y-axis label."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(text)
    label = Image.new("RGB", (right - left + 4, bottom - top + 4), BACKGROUND)
    ImageDraw.Draw(label).text((2 - left, 2 - top), text, fill=INK, font=font)
    label = label.rotate(90, expand=True)
    image.paste(label, (center[0] - label.width // 2, center[1] - label.height // 2))


def _legend(draw: Any, font: Any, x0: int, y0: int, height: int) -> None:
    """A vertical colour bar from score 1 (top) to 0 (bottom)."""
    for dy in range(height):
        draw.line((x0, y0 + dy, x0 + LEGEND_W, y0 + dy), fill=score_color(1 - dy / max(1, height - 1)))
    draw.text((x0 + LEGEND_W + 6, y0), "1", fill=INK, font=font, anchor="lt")
    draw.text((x0 + LEGEND_W + 6, y0 + height), "0", fill=INK, font=font, anchor="lb")
    draw.text((x0 + LEGEND_W / 2, y0 + height + 14), "score", fill=INK, font=font, anchor="mm")
