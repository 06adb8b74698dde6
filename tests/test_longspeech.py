"""`lyra longspeech` end to end on the tiny model, with a 10-minute recording made of real clips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lyra_cli.audio.io import SAMPLE_RATE_HZ, load_audio
from lyra_cli.commands.longspeech import check_length, parse_duration
from lyra_cli.engine.model.config import ExtractorConfig
from lyra_cli.errors import LyraError, UsageError
from lyra_cli.main import run

TEN_MINUTES_S = 600


@pytest.fixture(scope="module")
def ten_minutes(real: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real clips, one after another with short pauses, repeated to 10 minutes (FLAC, 16 kHz)."""
    pause = np.zeros(SAMPLE_RATE_HZ // 2, dtype=np.float32)
    clips = [load_audio(real / name) for name in ("jfk.flac", "extreme_ironing.mp3", "Hi.mp3", "movement.mp3",
                                                  "Chinese_painting.mp3", "pred_round0.wav")]  # fmt: skip
    cycle = np.concatenate([x for clip in clips for x in (clip, pause)])
    n = TEN_MINUTES_S * SAMPLE_RATE_HZ
    audio = np.tile(cycle, n // len(cycle) + 1)[:n]
    path = tmp_path_factory.mktemp("long") / "ten_minutes.flac"
    sf.write(path, audio, SAMPLE_RATE_HZ)
    return path


def test_ten_minute_recording_end_to_end_with_cache(ten_minutes: Path, tiny_dir: Path, capsys) -> None:  # noqa: ANN001
    args = ["longspeech", str(ten_minutes), "--ask", "summarize", "--ask", "who speaks first?", "--json",
            "--max-new-tokens", "4", "--extract", "2x0.5"]  # fmt: skip
    assert run(args) == 0
    out, err = capsys.readouterr()
    first = [json.loads(line) for line in out.splitlines()]
    assert [r["question"] for r in first] == ["summarize", "who speaks first?"]
    assert all(r["adapter"] == "long_speech" for r in first)
    assert first[0]["prompt_tokens"] > 20 * 300  # 20 windows of 300 speech tokens, plus the template
    assert first[0]["kept_tokens"] < first[0]["prompt_tokens"]
    spans = first[0]["evidence"][0]["spans"]
    assert spans and all(0 <= s < e <= TEN_MINUTES_S for s, e in spans)
    assert "20 window(s), 6,000 speech tokens, encoded" in err
    assert run(args) == 0  # the same file again: straight from the cache, same answers
    out, err = capsys.readouterr()
    assert "from the cache" in err
    assert [json.loads(line)["answer"] for line in out.splitlines()] == [r["answer"] for r in first]


def test_corrupt_cache_entry_is_rebuilt(ten_minutes: Path, tiny_dir: Path, capsys, tmp_path: Path,  # noqa: ANN001
                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("LYRA_CACHE_DIR", str(tmp_path))
    args = ["longspeech", str(ten_minutes), "--ask", "q", "--max-new-tokens", "2", "--max-audio", "65", "-q"]
    assert run(args) == 0
    entry = next((tmp_path / "speech").glob("*.safetensors"))
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))
    assert run([*args[:-1]]) == 0
    _, err = capsys.readouterr()
    assert "encoded at" in err and "from the cache" not in err  # rebuilt, not used
    assert "3 window(s)" in err  # --max-audio 65 s → 3 windows


def test_short_clip_uses_the_speech_adapter(real: Path, tiny_dir: Path, capsys) -> None:  # noqa: ANN001
    assert run(["longspeech", str(real / "Hi.mp3"), "--ask", "hi?", "--json", "--max-new-tokens", "2",
                "--no-cache", "-q"]) == 0  # fmt: skip
    record = json.loads(capsys.readouterr().out)
    assert record["adapter"] == "speech" and record["evidence"] == []  # extractor off: no evidence


def test_too_long_without_extractor_is_refused_with_options() -> None:
    with pytest.raises(LyraError, match="beyond the model's 32,768 positions") as info:
        check_length(72_064, 32_768, None, 28)
    assert "--extract 4x0.7" in info.value.hint and "--max-audio 00:54:30" in info.value.hint
    check_length(72_064, 32_768, ExtractorConfig(compress_gap=7, keep_rate=0.7), 28)  # allowed with the extractor
    check_length(6_064, 32_768, None, 28)
    with pytest.raises(LyraError) as small:  # the suggested spec must parse on the model at hand
        check_length(72_064, 32_768, None, 2)
    assert "--extract 2x0.7" in small.value.hint


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("45m", 2700), ("1.5h", 5400), ("1:30", 90),
                                          ("1:02:03", 3723)])  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "-5", "0", "1:2:3:4"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(UsageError):
        parse_duration(text)


def test_missing_recording_fails_before_loading(capsys, tmp_path: Path) -> None:  # noqa: ANN001
    assert run(["longspeech", str(tmp_path / "none.mp3"), "--ask", "q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "none.mp3" in err and "loaded in" not in err


@pytest.mark.parametrize("seconds,text", [(0, "00:00:00"), (59.6, "00:01:00"), (3725, "01:02:05"), (-3, "00:00:00")])
def test_clock(seconds: float, text: str) -> None:
    from lyra_cli.timefmt import clock

    assert clock(seconds) == text


def test_cache_info_and_clear(real: Path, tiny_dir: Path, tmp_path: Path, capsys,  # noqa: ANN001
                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("LYRA_CACHE_DIR", str(tmp_path))
    assert run(["longspeech", str(real / "Hi.mp3"), "--ask", "q", "--max-new-tokens", "1", "-q"]) == 0
    capsys.readouterr()
    assert run(["cache", "info"]) == 0
    assert "1 entries" in capsys.readouterr().out
    assert run(["cache", "clear"]) == 0
    assert "removed 1" in capsys.readouterr().err
    assert list((tmp_path / "speech").glob("*.safetensors")) == []


def test_encode_batch_is_windows_per_encoder_call(ten_minutes: Path, tiny_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from lyra_cli.engine.model import speech_encoder as speech

    per_call: list[int] = []  # windows in each encoder call (one log-mel batch per call)
    mel = speech.log_mel_spectrogram

    def counting(windows, **kwargs):  # noqa: ANN001, ANN003, ANN202
        per_call.append(len(windows))
        return mel(windows, **kwargs)

    monkeypatch.setattr(speech, "log_mel_spectrogram", counting)
    args = ["longspeech", str(ten_minutes), "--ask", "q", "--max-new-tokens", "1", "--extract", "2x0.5",
            "--encode-batch", "16", "--no-cache", "-q"]  # fmt: skip
    assert run(args) == 0
    assert per_call == [16, 4]  # 20 windows: one encoder call of 16, then the 4 left


def test_prefill_progress_follows_the_chunks_to_the_end(ten_minutes: Path, tiny_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The prefill bar is fed chunk by chunk in token-layers, drops included, and ends exactly at its total."""
    from lyra_cli import console

    reports: list[tuple[int, int]] = []
    update = console.PrefillProgress.update
    monkeypatch.setattr(console.PrefillProgress, "update", lambda self, d, t: (reports.append((d, t)), update(self, d, t)))
    args = ["longspeech", str(ten_minutes), "--ask", "q", "--max-new-tokens", "1", "--extract", "2x0.5",
            "--chunk-tokens", "1000", "-q"]  # fmt: skip
    assert run(args) == 0
    done, totals = [d for d, _ in reports], {t for _, t in reports}
    assert len(totals) == 1 and done == sorted(done) and done[-1] == totals.pop()
    # 6,035 tokens through block 1 (layers 0–1) in 7 chunks, then 3,035 survivors through block 2 in 4
    assert len(reports) == 7 + 4
