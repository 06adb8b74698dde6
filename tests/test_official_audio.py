"""`--official-audio` through the commands: the authors' front end reaches the model, the cache and the records.

The resampler's numbers are tested in test_resample.py; here, that each command passes the front end down.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.eval_fixtures import build_all

from lyra_cli.audio.frontend import AudioFrontEnd
from lyra_cli.audio.io import load_audio
from lyra_cli.audio.mic import FileSource
from lyra_cli.engine.model.adapters import Adapter
from lyra_cli.engine.run import pipeline
from lyra_cli.engine.run.longspeech import LongSpeechSettings
from lyra_cli.main import run

FAST = ["--max-new-tokens", "2"]
OFFICIAL_HEADER = "audio front end: channel 0, sinc resampling (official)"


def lyra(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def decoded_speech(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every speech input the engine decodes during the test, with the front end it was decoded with."""
    seen: list = []
    original = pipeline.read_media

    def spy(kind, path, front_end=AudioFrontEnd()):  # noqa: ANN001, ANN202
        media = original(kind, path, front_end)
        if kind == "speech":
            seen.append((front_end, media.wav))
        return media

    monkeypatch.setattr(pipeline, "read_media", spy)
    return seen


def test_chat_official_audio_feeds_channel_zero_through_the_sinc(real, tiny_dir, capsys, decoded_speech):  # noqa: ANN001
    jfk = real / "jfk.flac"  # stereo 44.1 kHz: both halves of the flag change the samples
    code, _, err = lyra(capsys, "chat", "--speech", str(jfk), "--official-audio", *FAST)
    assert code == 0, err
    assert OFFICIAL_HEADER in err
    [(front_end, wav)] = decoded_speech
    assert front_end == AudioFrontEnd.official()
    np.testing.assert_array_equal(wav, load_audio(jfk, channel_mix="first", resampler="sinc"))
    code, _, err = lyra(capsys, "chat", "--speech", str(jfk), *FAST)  # the default stays ours
    assert code == 0 and OFFICIAL_HEADER not in err
    assert decoded_speech[1][0] == AudioFrontEnd()
    assert np.abs(decoded_speech[1][1] - wav).max() > 0.01


def test_longspeech_official_audio_has_its_own_cache_entry(real, tiny_dir, capsys, tmp_path, monkeypatch):  # noqa: ANN001
    monkeypatch.setenv("LYRA_CACHE_DIR", str(tmp_path))
    args = ["longspeech", str(real / "jfk.flac"), "--ask", "who?", *FAST]
    assert lyra(capsys, *args)[0] == 0
    code, _, err = lyra(capsys, *args, "--official-audio")
    assert code == 0 and "encoded at" in err and "from the cache" not in err  # not the default run's tokens
    assert OFFICIAL_HEADER in err
    code, _, err = lyra(capsys, *args, "--official-audio")
    assert code == 0 and "from the cache" in err
    assert len(list((tmp_path / "speech").glob("*.safetensors"))) == 2


def test_longspeech_cache_key_names_the_front_end():
    ours = LongSpeechSettings().key_settings(Adapter.SPEECH, torch.float32)
    official = LongSpeechSettings(front_end=AudioFrontEnd.official()).key_settings(Adapter.SPEECH, torch.float32)
    assert (ours["channel_mix"], ours["resampler"]) == ("mean", "soxr")
    assert (official["channel_mix"], official["resampler"]) == ("first", "sinc")


def test_eval_official_audio_is_recorded_and_not_resumed_into_a_default_run(real, tiny_dir, capsys, tmp_path):  # noqa: ANN001
    data = build_all(real, tmp_path / "Lyra_Eval")
    out = tmp_path / "run.jsonl"
    base = ["eval", "chartqa-s", "--data", str(data), "--out", str(out), "--limit", "1", *FAST]
    code, _, err = lyra(capsys, *base, "--official-audio")
    assert code == 0, err
    assert OFFICIAL_HEADER in err
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert "skipped" not in record
    assert (record["settings"]["channel_mix"], record["settings"]["resampler"]) == ("first", "sinc")
    code, _, err = lyra(capsys, *base)
    assert code == 2 and "another run" in err and "resampler" in err


def test_listen_official_audio_decodes_the_input_file(real):
    jfk = real / "jfk.flac"
    with FileSource(jfk, trailing_silence_s=0.0, front_end=AudioFrontEnd.official()) as source:
        joined = np.concatenate(list(source))
    official = AudioFrontEnd.official().load(jfk)
    np.testing.assert_array_equal(joined[: len(official)], official)


def test_listen_official_audio_needs_an_input_file(capsys):
    code, _, err = lyra(capsys, "listen", "--official-audio")
    assert code == 2 and "--input-file" in err


def test_predictions_written_before_the_front_end_was_recorded_count_as_the_default_one() -> None:
    from lyra_cli.engine.eval.runner import recorded_settings

    old = {"id": "1", "settings": {"model": "tiny", "seed": None}}
    assert recorded_settings(old) == {"channel_mix": "mean", "resampler": "soxr", "model": "tiny", "seed": None}
    official = {"settings": {"channel_mix": "first", "resampler": "sinc"}}
    assert recorded_settings(official) == {"channel_mix": "first", "resampler": "sinc"}
