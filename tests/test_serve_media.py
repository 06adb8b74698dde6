"""`lyra serve`'s media: OpenAI content parts -> decoded media (limits checked before decoding, the command
line's decoders and messages) -> the engine's parts, long recordings through the long-speech path."""

from __future__ import annotations

import base64
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import lyra_cli.engine as api
from lyra_cli.audio.cache import SpeechTokenCache
from lyra_cli.audio.frontend import AudioFrontEnd
from lyra_cli.engine.adapters import Adapter
from lyra_cli.engine.pipeline import DecodedImage, DecodedSpeech, DecodedVideo, speech_tokens
from lyra_cli.serve import media
from lyra_cli.serve.errors import ApiError
from lyra_cli.serve.media import DecodedContent, MediaLimits, MediaOptions, Recording, decode_content, encode_content

PARAM = "messages[0].content"


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> api.Engine:
    return api.load(tiny_dir)


@pytest.fixture(autouse=True)
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Temporary files of the code under test go to a folder of this test's own, to count what is left."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def audio_part(path: Path, audio_format: str) -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(path), "format": audio_format}}


def url_part(kind: str, path: Path, media_type: str) -> dict:
    return {"type": kind, kind: {"url": f"data:{media_type};base64,{b64(path)}"}}


def refused(content: object, limits: MediaLimits = MediaLimits(), **options: object) -> ApiError:
    with pytest.raises(ApiError) as caught:
        decode_content(content, limits, param=PARAM, **options)
    return caught.value


def never_called(*args: object, **kwargs: object) -> None:
    raise AssertionError("decoded although a limit refuses the part")


# -- parts ----------------------------------------------------------------------------------------------


def test_a_string_is_one_text_part() -> None:
    with decode_content("What is unusual here?", MediaLimits(), param=PARAM) as decoded:
        assert decoded.items == [api.TextPart("What is unusual here?")]


def test_every_kind_of_part_in_order_decodes_as_the_command_line_does(real: Path, private_tmp: Path) -> None:
    content = [
        url_part("image_url", real / "extreme_ironing.jpg", "image/jpeg"),
        {"type": "text", "text": "and"},
        audio_part(real / "extreme_ironing.mp3", "mp3"),
        audio_part(real / "jfk.flac", "flac"),
        url_part("video_url", real / "movement.mp4", "video/mp4"),
    ]
    with decode_content(content, MediaLimits(), param=PARAM) as decoded:
        image, text, question, jfk, video = decoded.items
    assert isinstance(image, DecodedImage) and isinstance(video, DecodedVideo)
    assert text == api.TextPart("and")
    assert isinstance(question, DecodedSpeech) and isinstance(jfk, DecodedSpeech)
    np.testing.assert_array_equal(jfk.wav, api.read_media("speech", real / "jfk.flac").wav)
    np.testing.assert_array_equal(np.asarray(image.image), np.asarray(api.read_media("image", real / "extreme_ironing.jpg").image))
    np.testing.assert_array_equal(video.frames, api.read_media("video", real / "movement.mp4").frames)
    # sources name the request field, never a temporary path
    assert jfk.source == f"{PARAM}[3].input_audio.data" and image.source == f"{PARAM}[0].image_url.url"
    assert not any(private_tmp.iterdir())  # all in memory: the files are gone already


def test_official_audio_selects_the_authors_front_end(real: Path) -> None:
    options = MediaOptions.from_request({"official_audio": True})
    with decode_content([audio_part(real / "jfk.flac", "flac")], MediaLimits(), param=PARAM, options=options) as d:
        wav = d.items[0].wav
    np.testing.assert_array_equal(wav, api.read_media("speech", real / "jfk.flac", AudioFrontEnd.official()).wav)
    assert not np.array_equal(wav, api.read_media("speech", real / "jfk.flac").wav)  # channel 0, not the mean
    with pytest.raises(ApiError) as caught:
        MediaOptions.from_request({"official_audio": "yes"})
    assert caught.value.status == 400 and caught.value.param == "lyra.official_audio"


def test_parts_encode_to_the_engines_parts(engine: api.Engine, real: Path) -> None:
    content = [url_part("image_url", real / "extreme_ironing.jpg", "image/jpeg"),
               audio_part(real / "extreme_ironing.mp3", "mp3"), {"type": "text", "text": "?"}]  # fmt: skip
    with decode_content(content, MediaLimits(), param=PARAM) as decoded:
        image, speech, text = encode_content(engine, decoded)
    assert isinstance(image, api.VisualPart) and image.kind == "image"
    assert isinstance(speech, api.SpeechPart) and speech.n_windows == 1 and speech.frames is not None
    assert speech.source == f"{PARAM}[1].input_audio.data" and text == api.TextPart("?")
    done = engine.generate(api.Conversation(), [image, speech, text], engine.sampling(max_new_tokens=2))
    assert done.adapter == "speech"


# -- malformed requests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("part", "param", "words"),
    [
        ({"type": "file", "file": {}}, f"{PARAM}[0].type", "`file`"),
        ({"text": "no type"}, f"{PARAM}[0].type", "no type"),
        ("a bare string", f"{PARAM}[0].type", "no type"),
        ({"type": "text", "text": 3}, f"{PARAM}[0].text", "must be a string"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA"}}, f"{PARAM}[0].input_audio.format", "a string"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "pcm16"}}, f"{PARAM}[0].input_audio.format",
         "`wav`"),
        ({"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}},
         f"{PARAM}[0].input_audio.data", "not valid base64"),
        ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, f"{PARAM}[0].image_url.url",
         "never fetches"),
        ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, f"{PARAM}[0].image_url.url",
         "never fetches"),
        ({"type": "video_url", "video_url": {"url": "/etc/passwd"}}, f"{PARAM}[0].video_url.url", "never fetches"),
        ({"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}, f"{PARAM}[0].image_url.url",
         "base64 `data:` URL"),
        ({"type": "image_url", "image_url": "data:image/png;base64,AAAA"}, f"{PARAM}[0].image_url", "an object"),
    ],
)  # fmt: skip
def test_malformed_parts_are_400_naming_the_field(part: object, param: str, words: str, private_tmp: Path) -> None:
    error = refused([part])
    assert error.status == 400 and error.param == param and words in error.message, error.message
    assert not any(private_tmp.iterdir())


def test_content_that_is_neither_string_nor_list() -> None:
    error = refused({"type": "text", "text": "hi"})
    assert error.status == 400 and error.param == PARAM


def test_a_file_the_decoders_refuse_gets_their_message_naming_the_field(tmp_path: Path, private_tmp: Path) -> None:
    (tmp_path / "noise.wav").write_bytes(b"RIFF not really a wav file at all" * 10)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16_000, dtype=np.float32), 16_000)
    for path, words in ((tmp_path / "noise.wav", "could not be decoded as audio"), (silent, "is silent")):
        error = refused([{"type": "text", "text": "hi"}, audio_part(path, "wav")])
        assert error.status == 400 and error.code == "InputError" and words in error.message, error.message
        assert error.param == f"{PARAM}[1].input_audio.data" and f"`{error.param}`" in error.message
        assert str(private_tmp) not in error.message and "lyra-serve" not in error.message
    error = refused([{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(silent)}"}}])
    assert "is not an image file" in error.message and error.param == f"{PARAM}[0].image_url.url"
    assert not any(private_tmp.iterdir())  # removed on every error


# -- limits, before decoding ------------------------------------------------------------------------------


def test_a_part_over_the_byte_limit_is_refused_before_base64_decoding(real: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(media, "_b64decode", never_called)
    size = (real / "jfk.flac").stat().st_size
    limits = MediaLimits(max_part_bytes=size - 1)
    for part in (audio_part(real / "jfk.flac", "flac"), url_part("image_url", real / "jfk.flac", "image/png")):
        error = refused([part], limits)
        assert error.status == 400 and error.code == media.MEDIA_TOO_LARGE and "--max-media-mb" in error.message
    monkeypatch.undo()
    with decode_content([audio_part(real / "jfk.flac", "flac")], MediaLimits(max_part_bytes=size), param=PARAM):
        pass  # exactly at the limit: taken (the length arithmetic is exact)


def test_audio_over_the_duration_limit_is_refused_from_its_header(real: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(media, "_read_media", never_called)
    for name, audio_format in (("jfk.flac", "flac"), ("Hi.mp3", "mp3")):  # libsndfile's header, FFmpeg's
        error = refused([audio_part(real / name, audio_format)], MediaLimits(max_audio_s=1.5))
        assert error.status == 400 and error.code == media.MEDIA_TOO_LARGE and "--max-audio-s" in error.message
        assert error.param == f"{PARAM}[0].input_audio.data"


def test_audio_without_a_stated_length_is_counted_and_cut_at_the_limit(real: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lyra_cli.audio.io import AudioStream

    opened = AudioFrontEnd().open_stream
    streams: list[AudioStream] = []

    def no_length(path: Path) -> AudioStream:
        stream = opened(path, block_seconds=1.0)
        stream.duration_s = None  # as a header-less stream says
        streams.append(stream)
        return stream

    monkeypatch.setattr(AudioFrontEnd, "open_stream", lambda self, path: no_length(path))
    monkeypatch.setattr(media, "_read_media", never_called)
    error = refused([audio_part(real / "jfk.flac", "flac")], MediaLimits(max_audio_s=5))
    assert error.code == media.MEDIA_TOO_LARGE and "--max-audio-s" in error.message
    assert 5 < streams[0].position_s < 7  # stopped at the limit, not decoded to the end (11 s)
    monkeypatch.undo()
    monkeypatch.setattr(AudioFrontEnd, "open_stream", lambda self, path: no_length(path))
    with decode_content([audio_part(real / "jfk.flac", "flac")], MediaLimits(max_audio_s=12), param=PARAM) as d:
        assert d.items[0].duration_s == pytest.approx(streams[1].position_s)  # under it: counted, then decoded


def claiming(monkeypatch: pytest.MonkeyPatch, duration_s: float) -> None:
    """Every audio header claims `duration_s` (as an mp3's estimate may, far from the truth)."""
    opened = AudioFrontEnd.open_stream

    def claim(self: AudioFrontEnd, path: Path, **kwargs: object) -> object:
        stream = opened(self, path, **kwargs)
        stream.duration_s = duration_s
        return stream

    monkeypatch.setattr(AudioFrontEnd, "open_stream", claim)


def test_audio_longer_than_its_header_says_is_still_held_to_the_limit(real: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    claiming(monkeypatch, 2.0)
    error = refused([audio_part(real / "jfk.flac", "flac")], MediaLimits(max_audio_s=5))
    assert error.code == media.MEDIA_TOO_LARGE and "`00:00:11`" in error.message


def test_a_recording_shorter_than_its_header_says_is_encoded_as_a_clip(engine: api.Engine, real: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    claiming(monkeypatch, 45.0)
    with decode_content([audio_part(real / "jfk.flac", "flac")], MediaLimits(), param=PARAM) as decoded:
        assert isinstance(decoded.items[0], Recording)
        (part,) = encode_content(engine, decoded)
    clip = engine.encode(api.read_media("speech", real / "jfk.flac"))
    assert part.n_windows == 1 and part.adapter is None and torch.equal(part.frames, clip.frames)
    assert part.source == f"{PARAM}[0].input_audio.data"  # frames: any later turn's adapter can project it


def test_images_and_videos_over_their_limits_are_refused_from_the_header(real: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(media, "_read_media", never_called)
    image = [url_part("image_url", real / "extreme_ironing.jpg", "image/jpeg")]
    error = refused(image, MediaLimits(max_image_pixels=570 * 380 - 1))
    assert "`570×380` px" in error.message and "--max-image-pixels" in error.message
    video = [url_part("video_url", real / "movement.mp4", "video/mp4")]
    error = refused(video, MediaLimits(max_video_frames=102))
    assert "`103` frames" in error.message and "--max-video-frames" in error.message
    error = refused(video, MediaLimits(max_video_s=1.0))
    assert "of video" in error.message and "--max-video-s" in error.message


def test_default_limits_are_derived_from_the_engine() -> None:
    from dataclasses import fields

    from lyra_cli.audio.io import SAMPLE_RATE_HZ
    from lyra_cli.audio.windows import WINDOW_SECONDS
    from lyra_cli.engine.config import TextModelConfig
    from lyra_cli.engine.longspeech import longest_fitting_s

    positions = next(f.default for f in fields(TextModelConfig) if f.name == "max_position_embeddings")
    assert media.DEFAULT_MAX_AUDIO_S == longest_fitting_s(positions) == 54 * 60 + 30
    assert (media.SAMPLE_RATE_HZ, media.WINDOW_SECONDS) == (SAMPLE_RATE_HZ, WINDOW_SECONDS)
    assert set(media.LIMIT_FLAGS) == set(MediaLimits.__dataclass_fields__)


# -- long recordings --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_recording(real: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 3 minutes of real speech: jfk.flac and the spoken questions, again and again, as a 16 kHz wav."""
    names = ["jfk.flac", "Hi.mp3", "movement.mp3", "extreme_ironing.mp3", "Chinese_painting.mp3"] * 8
    wav = np.concatenate([api.read_media("speech", real / name).wav for name in names])
    path = tmp_path_factory.mktemp("long") / "long.wav"
    sf.write(path, wav, 16_000, subtype="PCM_16")
    return path


def test_a_long_recording_takes_the_long_speech_path(engine: api.Engine, long_recording: Path, tmp_path: Path,
                                                     private_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    content = [audio_part(long_recording, "wav"), {"type": "text", "text": "Summarize."}]
    with monkeypatch.context() as patched:
        patched.setattr(media, "_read_media", never_called)  # not decoded on the request thread
        decoded = decode_content(content, MediaLimits(), param=PARAM)
    with decoded:
        (recording, _), folder = decoded.items, decoded.folder
        assert isinstance(recording, Recording) and recording.duration_s > media.LONG_SPEECH_MIN_S
        assert folder is not None and recording.path.parent == folder and recording.path.is_file()
        cache = SpeechTokenCache(tmp_path / "cache")
        part, _text = encode_content(engine, decoded, cache=cache)
        again, _ = encode_content(engine, decoded, cache=cache)  # the same audio resent: from the cache
    assert not folder.exists() and not any(private_tmp.iterdir())
    assert part.adapter is Adapter.LONG_SPEECH and part.frames is None and part.n_windows == math.ceil(sf.info(long_recording).duration / 30) == 7
    assert part.source == f"{PARAM}[0].input_audio.data"
    assert len(list((tmp_path / "cache").iterdir())) == 1 and torch.equal(again.tokens, part.tokens)
    # the same tokens as the in-memory path projected by the long-speech adapter's projector
    clip = engine.encode(api.read_media("speech", long_recording))
    projector = engine.loaded.adapters.projector(Adapter.LONG_SPEECH)
    torch.testing.assert_close(part.tokens, speech_tokens(clip, Adapter.LONG_SPEECH, projector))
    done = engine.generate(api.Conversation(), [part, api.TextPart("Summarize.")], engine.sampling(max_new_tokens=2))
    assert done.adapter == "long_speech"


def test_a_recording_beyond_the_models_positions_needs_the_extractor(engine: api.Engine, tmp_path: Path) -> None:
    recording = Recording(tmp_path / "never-read.wav", 4000.0, AudioFrontEnd(), f"{PARAM}[0].input_audio.data")
    with pytest.raises(ApiError) as caught:
        encode_content(engine, DecodedContent(items=[recording]))
    error = caught.value
    assert error.status == 400 and error.code == "context_length_exceeded" and "lyra.extract" in error.message
    assert error.param == recording.source and "`00:54:30`" in error.message


def test_the_temporary_folder_goes_when_encoding_fails(engine: api.Engine, long_recording: Path,
                                                      private_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    decoded = decode_content([audio_part(long_recording, "wav")], MediaLimits(), param=PARAM)
    monkeypatch.setattr(media, "_encode_recording", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError), decoded:
        encode_content(engine, decoded)
    assert not any(private_tmp.iterdir())


def test_the_media_speech_and_transcription_modules_import_no_torch() -> None:
    """`lyra serve --help` reads the limits' defaults: importing them must not load torch (or numpy)."""
    import subprocess
    import sys

    code = ("import sys, lyra_cli.serve.media, lyra_cli.serve.speech, lyra_cli.serve.transcribe; "
            "print(sorted({'torch', 'numpy'} & set(sys.modules)))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
