"""`lyra serve`'s speech out: streamed `delta.audio` (pcm16 at 24 kHz) joined equals the answer's audio
resampled at once, transcripts join to the answer text, files in every format decode, the answer store."""

from __future__ import annotations

import base64
import io
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import lyra_cli.engine as api
from lyra_cli.audio.io import load_audio
from lyra_cli.serve.errors import ApiError
from lyra_cli.serve.speech import FORMATS, STREAM_RATE_HZ, AudioRequest, AudioStore, SpokenAnswer, encode_audio


@pytest.fixture(scope="module")
def speaking(tiny_dir: Path) -> api.Engine:
    return api.load(tiny_dir, voice=api.VoiceConfig(chunk_units=7))  # small chunks: several per answer


def pcm(data: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype="<i2")


def chunks_of(wav: np.ndarray, sizes: list[int], rate_hz: int = 16_000) -> list[api.AudioChunk]:
    bounds = np.cumsum([0, *sizes])
    return [api.AudioChunk(wav[a:b], rate_hz, a / rate_hz) for a, b in pairwise(bounds) if b > a]


def stream(answer: SpokenAnswer, events: list[object]) -> list[dict]:
    deltas = []
    for event in events:
        if isinstance(event, api.TextDelta):
            answer.on_text(event.text)
        elif isinstance(event, api.AudioChunk):
            delta = answer.on_audio(event)
            deltas += [delta] if delta is not None else []
    return deltas + answer.finish()


def test_streamed_deltas_join_to_the_answer_resampled_at_once(real: Path) -> None:
    wav, rate = sf.read(real / "pred_round0.wav", dtype="float32")  # speech of Lyra's own vocoder, 16 kHz
    sizes = [3200, 1, 2, 12800, 7, 12800, 5000, 12800] * 8  # the first chunk small, odd sizes between
    events: list[object] = []
    for i, chunk in enumerate(chunks_of(wav, sizes, rate)):
        events += [api.TextDelta(f"word{i} "), chunk]
    events.append(api.TextDelta("end."))
    streamed = SpokenAnswer(AudioStore(), "pcm16")
    deltas = stream(streamed, events)
    whole = SpokenAnswer(AudioStore(), "pcm16")
    stream(whole, events)
    audio = whole.message_audio()
    joined = pcm("".join(d.get("data", "") for d in deltas))  # as SDK helpers join them: one base64 string
    np.testing.assert_array_equal(joined, np.concatenate([pcm(d["data"]) for d in deltas if "data" in d]))
    expected = pcm(audio["data"])
    assert len(joined) == len(expected) == round(len(wav) * STREAM_RATE_HZ / rate)
    assert np.abs(joined.astype(int) - expected).max() <= 1  # equal up to int16 rounding
    assert "".join(d.get("transcript", "") for d in deltas) == "".join(e.text for e in events if isinstance(e, api.TextDelta))
    assert all(len(base64.b64decode(d["data"])) % 6 == 0 for d in deltas[:-2])  # joinable base64
    assert deltas[0]["id"] == streamed.id and all("id" not in d for d in deltas[1:])
    assert deltas[-1] == {"expires_at": streamed.expires_at}
    assert streamed.store.transcript(streamed.id, param="x") == streamed.transcript


def test_the_openai_sdk_accumulates_the_deltas_into_the_whole_answer(real: Path) -> None:
    """The SDK's stream helper joins each string field of successive deltas: one id, one decodable base64."""
    deltas_module = pytest.importorskip("openai.lib.streaming._deltas")
    wav, rate = sf.read(real / "pred_round1.wav", dtype="float32")
    events = [event for chunk in chunks_of(wav, [1001, 3333, 7, 20000, 20000, 40000], rate)
              for event in (api.TextDelta("la "), chunk)]  # fmt: skip
    answer = SpokenAnswer(AudioStore(), "pcm16")
    accumulated: dict = {}
    for delta in stream(answer, events):
        accumulated = deltas_module.accumulate_delta(accumulated, {"audio": delta})
    audio = accumulated["audio"]
    assert audio["id"] == answer.id and audio["transcript"] == "la " * 6 and audio["expires_at"] == answer.expires_at
    assert len(pcm(audio["data"])) == round(len(wav) * STREAM_RATE_HZ / rate)


def test_a_spoken_answer_streams_as_the_engine_speaks(speaking: api.Engine) -> None:
    events = list(speaking.respond(api.Conversation(), [api.TextPart("tell me a story")],
                                   speaking.sampling(max_new_tokens=30), voice=speaking.voice))  # fmt: skip
    done = events[-1]
    chunks = [e for e in events if isinstance(e, api.AudioChunk)]
    assert len(chunks) >= 2, "the tiny voice speaks in several chunks"
    store = AudioStore()
    answer = SpokenAnswer(store, "pcm16")
    order: list[str] = []
    for event in events:
        if isinstance(event, api.TextDelta):
            answer.on_text(event.text)
            order.append("text")
        elif isinstance(event, api.AudioChunk):
            delta = answer.on_audio(event)
            assert delta is not None, "every chunk is sent as it arrives"
            order.append("audio")
    deltas_end = answer.finish()
    assert order.index("audio") < len(order) - 1 - order[::-1].index("text")  # audio before the last text
    wav = sf.read(io.BytesIO(base64.b64decode(SpokenAnswer_from(events, store, "wav")["data"])), dtype="float32")
    samples, rate = wav
    assert rate == speaking.voice.sample_rate_hz and len(samples) == sum(len(c.samples) for c in chunks)
    np.testing.assert_allclose(samples, np.concatenate([c.samples for c in chunks]), atol=1 / 32767)
    assert answer.transcript == done.text and deltas_end[-1]["expires_at"] == answer.expires_at
    assert store.transcript(answer.id, param="messages[2].audio.id") == done.text


def SpokenAnswer_from(events: list[object], store: AudioStore, audio_format: str) -> dict:
    answer = SpokenAnswer(store, audio_format)
    for event in events:
        if isinstance(event, api.TextDelta):
            answer.on_text(event.text)
        elif isinstance(event, api.AudioChunk):
            answer.on_audio(event)
    return answer.message_audio()


def test_an_answer_without_audio_still_gets_its_id_and_text() -> None:
    answer = SpokenAnswer(AudioStore(), "pcm16")
    answer.on_text("Hello")
    deltas = answer.finish()
    assert deltas[0] == {"id": answer.id, "data": "", "transcript": "Hello"} and "expires_at" in deltas[1]
    message = SpokenAnswer(AudioStore(), "wav").message_audio()
    assert sf.read(io.BytesIO(base64.b64decode(message["data"])))[0].size == 0


@pytest.mark.parametrize("audio_format", sorted(FORMATS))
def test_every_format_decodes_to_the_answer(audio_format: str, real: Path, tmp_path: Path) -> None:
    wav, rate = sf.read(real / "pred_round1.wav", dtype="float32")
    data = encode_audio(wav, rate, audio_format)
    if audio_format == "pcm16":
        assert len(data) == 2 * round(len(wav) * STREAM_RATE_HZ / rate)
        return
    path = tmp_path / f"answer.{audio_format}"
    path.write_bytes(data)
    decoded = load_audio(path)  # lyra's own decoder, back at 16 kHz
    # aac adds its 1,024 priming samples and pads to whole frames of 1,024; the others keep the length
    extra = (0, 2 * 1024) if audio_format == "aac" else (0, 0)
    assert extra[0] <= len(decoded) - len(wav) <= extra[1]
    if audio_format in ("wav", "flac"):
        assert sf.info(path).samplerate == rate and sf.info(path).subtype == "PCM_16"
        np.testing.assert_allclose(decoded, wav, atol=1 / 32767)


# -- the request's audio object ---------------------------------------------------------------------------


def test_every_openai_voice_is_lyras_voice_and_others_are_refused() -> None:
    assert AudioRequest.from_request({"voice": "nova", "format": "mp3"}, stream=False) == AudioRequest("nova", "mp3")
    assert AudioRequest.from_request(None, stream=True).format == "pcm16"
    assert AudioRequest.from_request({"voice": "alloy"}, stream=False).format == "wav"
    for audio, stream_, param in (({"voice": "bob"}, False, "audio.voice"), ({"format": "ogg"}, False, "audio.format"),
                                  ({"format": "wav"}, True, "audio.format")):  # fmt: skip
        with pytest.raises(ApiError) as caught:
            AudioRequest.from_request(audio, stream=stream_)
        assert caught.value.status == 400 and caught.value.param == param


# -- the store --------------------------------------------------------------------------------------------


def test_the_store_forgets_answers_when_they_expire_and_beyond_its_size() -> None:
    now = [1_000.0]
    store = AudioStore(ttl_s=60, max_answers=2, clock=lambda: now[0])
    first, second, third = store.new_id(), store.new_id(), store.new_id()
    assert len({first, second, third}) == 3 and first.startswith("audio_")
    assert store.put(first, "one") == 1_060
    store.put(second, "two")
    assert store.transcript(first, param="p") == "one"
    store.put(third, "three")  # over its size: the oldest goes
    with pytest.raises(ApiError) as caught:
        store.transcript(first, param="messages[1].audio.id")
    assert caught.value.status == 400 and caught.value.param == "messages[1].audio.id"
    assert caught.value.code == "audio_not_found"
    now[0] = 1_059.0
    assert store.transcript(third, param="p") == "three"
    now[0] = 1_060.0  # expired
    for audio_id in (second, third, "audio_unknown", None):
        with pytest.raises(ApiError):
            store.transcript(audio_id, param="p")
    assert len(store) == 0
