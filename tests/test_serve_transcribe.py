"""`lyra serve`'s transcriptions: the eval's LibriSpeech prompt and budget on an uploaded file, OpenAI's
response formats, the media limits."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import lyra_cli.engine as api
from lyra_cli.engine.eval.runner import decode_pieces
from lyra_cli.engine.eval.suites import ASR_INSTRUCTION, ASR_MAX_NEW_TOKENS, SPEECH_MODE, EvalItem, get_suite
from lyra_cli.engine.prompt import Conversation, Turn, render
from lyra_cli.serve import media
from lyra_cli.serve.errors import ApiError
from lyra_cli.serve.media import MediaLimits
from lyra_cli.serve.transcribe import check_response_format, decode_upload, response_body, transcribe


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> api.Engine:
    return api.load(tiny_dir)


@pytest.fixture
def asked(engine: api.Engine, monkeypatch: pytest.MonkeyPatch) -> list:
    """Each `generate` call's (parts, sampling, options), run with 3 new tokens at most to keep tests short."""
    calls = []
    generate = engine.generate

    def spy(conversation, parts, sampling, **options):
        calls.append((list(parts), sampling, options))
        return generate(conversation, parts, replace(sampling, max_new_tokens=min(3, sampling.max_new_tokens)),
                        **options)  # fmt: skip

    monkeypatch.setattr(engine, "generate", spy)
    return calls


def test_the_prompt_and_sampling_are_the_librispeech_evals(engine: api.Engine, real: Path, asked: list) -> None:
    from lyra_cli.commands.eval import eval_sampling

    path = real / "jfk.flac"
    with decode_upload(path.read_bytes(), "jfk.flac", MediaLimits()) as decoded:
        result = transcribe(engine, decoded)
    speech, instruction = result.parts
    assert isinstance(speech, api.SpeechPart) and instruction == api.TextPart(ASR_INSTRUCTION)
    # the eval's own turn for the same file renders to the same prompt, and decodes to the same audio
    item = EvalItem(id="jfk", index=0, question=None, image=None, speech=path)
    eval_media = decode_pieces(get_suite("librispeech").layouts[SPEECH_MODE](item))
    eval_parts = [engine.encode(m) if not isinstance(m, str) else api.TextPart(m) for m in eval_media]
    texts = [[s for s in render(Conversation(turns=[Turn(parts)])) if isinstance(s, str)]
             for parts in (result.parts, eval_parts)]  # fmt: skip
    assert texts[0] == texts[1] and texts[0][1].startswith(f"\n{ASR_INSTRUCTION}<|im_end|>")
    assert np.array_equal(speech.frames.numpy(), eval_parts[0].frames.numpy())
    (parts, sampling, options), = asked
    assert parts == result.parts and options == {"voice": None}  # a transcription never speaks
    assert sampling == eval_sampling(engine.loaded.model_dir, ASR_MAX_NEW_TOKENS, {})  # greedy, the eval's budget
    done = result.done
    assert done.adapter == "speech" and done.units == [] and result.text == done.text
    assert result.duration_s == pytest.approx(11.0, abs=0.01)


def test_response_formats(engine: api.Engine, real: Path, asked: list) -> None:
    with decode_upload((real / "Hi.mp3").read_bytes(), "recording", MediaLimits()) as decoded:  # no suffix: sniffed
        result = transcribe(engine, decoded)
    assert response_body(result, "json") == {"text": result.text}
    assert response_body(result, "text") == result.text
    verbose = response_body(result, check_response_format("verbose_json"), language="en")
    assert verbose == {"task": "transcribe", "language": "en", "duration": pytest.approx(3.6, abs=0.05),
                       "text": result.text}  # fmt: skip
    assert check_response_format(None) == "json"
    for bad, words in (("srt", "timestamps"), ("vtt", "timestamps"), ("xml", "`json`")):
        with pytest.raises(ApiError) as caught:
            check_response_format(bad)
        assert caught.value.status == 400 and caught.value.param == "response_format" and words in caught.value.message


def test_a_long_upload_gets_the_budget_of_each_window(engine: api.Engine, real: Path, tmp_path: Path,
                                                      asked: list) -> None:  # fmt: skip
    wav = np.concatenate([api.read_media("speech", real / "jfk.flac").wav] * 6)  # 66 s: three windows
    path = tmp_path / "long.wav"
    sf.write(path, wav, 16_000, subtype="PCM_16")
    with decode_upload(path.read_bytes(), "long.wav", MediaLimits()) as decoded:
        assert isinstance(decoded.items[0], media.Recording)
        result = transcribe(engine, decoded)
    assert asked[0][1].max_new_tokens == 3 * ASR_MAX_NEW_TOKENS and asked[0][1].temperature == 0
    assert result.done.adapter == "long_speech" and result.parts[0].n_windows == 3


def test_uploads_are_held_to_the_media_limits(real: Path, engine: api.Engine) -> None:
    data = (real / "jfk.flac").read_bytes()
    for limits, words in ((MediaLimits(max_audio_s=5), "--max-audio-s"), (MediaLimits(max_part_bytes=1000), "--max-media-mb")):
        with pytest.raises(ApiError) as caught:
            decode_upload(data, "jfk.flac", limits)
        assert caught.value.status == 400 and caught.value.param == "file" and words in caught.value.message
    for bad, words in ((b"", "is empty"), (b"not audio at all" * 100, "could not be decoded as audio")):
        with pytest.raises(ApiError) as caught:
            decode_upload(bad, "clip.wav", MediaLimits())
        assert caught.value.param == "file" and words in caught.value.message and "lyra-serve" not in caught.value.message
    with decode_upload(data, "jfk.flac", MediaLimits()) as decoded, pytest.raises(ApiError) as caught:
        transcribe(engine, decoded, temperature=-1.0)
    assert caught.value.status == 400 and caught.value.param == "temperature"
