"""`lyra eval needle`: recordings built right, the scoring rule, and the grid (JSON + PNG heat map) on the
tiny model, with and without the extractor. Haystack and needle are real clips: the needle is JFK's
"ask not what your country can do for you", the expected answer "country"."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lyra_cli.audio.io import SAMPLE_RATE_HZ, load_audio
from lyra_cli.engine.eval.needle import (
    CELL_H,
    MARGIN_BOTTOM,
    MARGIN_TOP,
    NEEDLE_PAD_S,
    compose,
    kept_share,
    needle_score,
    score_color,
)
from lyra_cli.main import run

HAYSTACK = ("movement.mp3", "Chinese_painting.mp3", "pred_round0.wav")


def test_the_needle_sits_at_its_depth_in_a_recording_of_the_asked_length() -> None:
    hay = [np.full(SAMPLE_RATE_HZ, 0.1, dtype=np.float32), np.full(SAMPLE_RATE_HZ // 2, 0.2, dtype=np.float32)]
    needle = np.full(3 * SAMPLE_RATE_HZ, 0.9, dtype=np.float32)
    pad = round(NEEDLE_PAD_S * SAMPLE_RATE_HZ)
    for depth in (0.0, 0.25, 1.0):
        recording, start_s = compose(hay, needle, 40.0, depth)
        assert recording.shape == (40 * SAMPLE_RATE_HZ,)
        n_hay = recording.size - needle.size - 2 * pad
        assert start_s * SAMPLE_RATE_HZ == round(depth * n_hay) + pad
        at = round(start_s * SAMPLE_RATE_HZ)
        assert (recording[at : at + needle.size] == 0.9).all() and (recording[at - pad : at] == 0).all()
    assert (compose(hay, needle, 40.0, 1.0)[0][: 3 * SAMPLE_RATE_HZ // 2 * 2] > 0).all()  # haystack tiled from the start


def test_scoring_rule_is_whole_words_after_normalisation() -> None:
    assert needle_score("Ask what you can do for your COUNTRY!", ["country"]) == 1.0
    assert needle_score("the countryside", ["country"]) == 0.0  # a word, not a substring
    assert needle_score("your country", ["my country", "your country"]) == 1.0
    assert needle_score("", ["country"]) == 0.0


def test_kept_share_of_the_needle() -> None:
    evidence = [{"spans": [[0.0, 5.0], [12.0, 20.0]]}]
    assert kept_share(evidence, 10.0, 20.0) == pytest.approx(0.8)
    assert kept_share([], 10.0, 20.0) == 0.0


def test_colours_go_from_red_to_green() -> None:
    red, amber, green = score_color(0.0), score_color(0.5), score_color(1.0)
    assert red[0] > red[1] and green[1] > green[0] and amber[0] > 200 and amber[1] > 150


@pytest.mark.parametrize("extract", [None, "2x0.5"])
def test_needle_grid_on_the_tiny_model(extract: str | None, real: Path, tmp_path: Path, tiny_dir: Path,  # noqa: ARG001
                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "needle"
    args = ["eval", "needle", *[a for name in HAYSTACK for a in ("--haystack", str(real / name))],
            "--needle", str(real / "jfk.flac"), "--question", "What should you ask?", "--answer", "country",
            "--lengths", "40s,70s", "--depths", "0,1", "--out", str(out), "--max-new-tokens", "3", "-q"]  # fmt: skip
    if extract:
        args += ["--extract", extract]
    assert run(args) == 0
    printed = json.loads(capsys.readouterr().out)
    grid = json.loads((out / "needle.json").read_text())
    assert grid["lengths_s"] == [40.0, 70.0] and grid["depths"] == [0.0, 1.0] and grid["extract"] == extract
    assert np.array(grid["scores"]).shape == (2, 2)
    assert printed["scores"] == grid["scores"] and printed["png"] == str(out / "needle.png")
    prompt, kept = np.array(grid["prompt_tokens"]), np.array(grid["kept_tokens"])
    assert (prompt[1] - prompt[0] == 300).all()  # 70 s is one 30 s window (300 tokens) more than 40 s
    if extract:
        assert (kept < prompt).all() and all(0 <= share <= 1 for share in np.ravel(grid["needle_kept"]))
    else:
        assert (kept == prompt).all() and np.ravel(grid["needle_kept"]).tolist() == [None] * 4
    needle_s = load_audio(real / "jfk.flac").size / SAMPLE_RATE_HZ
    assert grid["needle_start_s"][0] == [NEEDLE_PAD_S, pytest.approx(40.0 - NEEDLE_PAD_S - needle_s, abs=1e-3)]
    with Image.open(out / "needle.png") as png:
        png.verify()
    with Image.open(out / "needle.png") as png:
        assert png.format == "PNG" and png.height == MARGIN_TOP + 2 * CELL_H + MARGIN_BOTTOM and png.width > 300
        # a cell's colour is the score's: red for 0 (the tiny model never finds the needle)
        colors = png.convert("RGB").getcolors(1 << 16)
        assert any(c == score_color(float(grid["scores"][0][0])) for _, c in colors)


def test_lengths_shorter_than_the_needle_are_refused(real: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr("lyra_cli.engine.run.pipeline.Engine.load", lambda *a: pytest.fail("loaded the model"))
    code = run(["eval", "needle", "--haystack", str(real / "Hi.mp3"), "--needle", str(real / "jfk.flac"),
                "--question", "q", "--answer", "a", "--lengths", "10s,1m", "--out", str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "10s" in err and "cannot hold" in err
    code = run(["eval", "needle", "--haystack", str(real / "Hi.mp3"), "--needle", str(real / "jfk.flac"),
                "--question", "q", "--answer", "a", "--depths", "0,1.5", "--out", str(tmp_path)])  # fmt: skip
    assert code == 2 and "1.5" in capsys.readouterr().err
