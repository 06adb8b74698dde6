"""`lyra serve`'s cache of encoded media (`--cached-media`): a conversation's earlier image and audio clip are
encoded once, later turns answer exactly as without the cache, with prefix reuse intact; the key holds every
option that changes an encoding; the least recently used part goes first and is encoded again."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from helpers.serving import RunningServer, running_server  # noqa: E402

from lyra_cli.serve import media  # noqa: E402
from lyra_cli.serve.app import ServeConfig  # noqa: E402
from lyra_cli.serve.media import MediaLimits, decode_content, encode_content  # noqa: E402
from lyra_cli.serve.media_cache import CachedMedium, MediaCache, part_bytes  # noqa: E402

TOKENS = 4
PARAM = "messages[0].content"
FOLLOW_UPS = ("What else?", "And then?")


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> Any:
    import lyra_cli.engine as api

    return api.load(tiny_dir, device="cpu")


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def image_part(path: Path) -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{b64(path)}"}}


def audio_part(path: Path) -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(path), "format": "mp3"}}


def health(server: RunningServer) -> dict:
    with urlopen(f"{server.url}/health") as response:
        return json.loads(response.read())["media_cache"]


def conversation(server: RunningServer, real: Path) -> tuple[list[str], list[int], list[dict]]:
    """Three turns about an image and a clip, each request carrying the whole conversation: the answers,
    each turn's reused prefix tokens and the cache's counters after each."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    first = [image_part(real / "extreme_ironing.jpg"), audio_part(real / "Hi.mp3"), {"type": "text", "text": "Hm?"}]
    messages: list[dict] = [{"role": "user", "content": first}]
    answers, reused, counters = [], [], []
    for follow_up in (None, *FOLLOW_UPS):
        if follow_up is not None:
            messages += [{"role": "assistant", "content": answers[-1]}, {"role": "user", "content": follow_up}]
        completion = client.chat.completions.create(model="tiny", messages=messages, max_tokens=TOKENS,
                                                    temperature=0)  # fmt: skip
        answers.append(completion.choices[0].message.content)
        reused.append(completion.usage.prompt_tokens_details.cached_tokens)
        counters.append(health(server))
    return answers, reused, counters


def test_later_turns_hit_the_cache_and_answer_as_without_it(engine: Any, real: Path) -> None:
    with running_server(engine, ServeConfig(model_id="tiny", cached_media=0)) as server:
        plain, plain_reused, plain_counters = conversation(server, real)
    with running_server(engine, ServeConfig(model_id="tiny")) as server:
        cached, cached_reused, counters = conversation(server, real)
    assert cached == plain  # the same text, token for token
    assert plain_counters[-1] == {"hits": 0, "misses": 0, "size": 0, "bytes": 0, "max_parts": 0}
    assert [(c["hits"], c["misses"], c["size"]) for c in counters] == [(0, 2, 2), (2, 2, 2), (4, 2, 2)]
    assert counters[-1]["bytes"] > 0
    assert cached_reused[0] == 0 and all(n > 0 for n in cached_reused[1:])  # the prefix cache still matches
    assert cached_reused == plain_reused


# -- the cache between decoding and encoding, without a server -------------------------------------------


def encoded(engine: Any, content: list, cache: MediaCache, **options: Any) -> list:
    with decode_content(content, MediaLimits(), param=PARAM, cache=cache, **options) as decoded:
        return encode_content(engine, decoded, media_cache=cache)


def test_a_hit_is_neither_decoded_nor_encoded_and_is_named_by_its_new_field(
    engine: Any, real: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = MediaCache(4)
    content = [image_part(real / "extreme_ironing.jpg"), audio_part(real / "Hi.mp3")]
    (image, clip) = encoded(engine, content, cache)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded or encoded although cached")

    monkeypatch.setattr(media, "_read_media", never)
    monkeypatch.setattr(engine, "encode", never)
    again = [{"type": "text", "text": "again"}, *content]
    with decode_content(again, MediaLimits(), param="messages[2].content", cache=cache) as decoded:
        assert [type(item) for item in decoded.items[1:]] == [CachedMedium, CachedMedium]
        _, image2, clip2 = encode_content(engine, decoded, media_cache=cache)
    assert image2.tokens is image.tokens and clip2.frames is clip.frames  # the stored tensors, shared
    assert image2.source == "messages[2].content[1].image_url.url"
    assert clip2.source == "messages[2].content[2].input_audio.data"
    assert (cache.hits, cache.misses) == (2, 2)


def test_another_audio_front_end_or_other_bytes_miss(engine: Any, real: Path) -> None:
    cache = MediaCache(8)
    (default,) = encoded(engine, [audio_part(real / "Hi.mp3")], cache)
    (official,) = encoded(engine, [audio_part(real / "Hi.mp3")], cache, options=media.MediaOptions(True))
    assert (cache.hits, cache.misses, len(cache._parts)) == (0, 2, 2)
    assert not torch.equal(default.frames, official.frames)  # the two front ends differ on this file
    encoded(engine, [audio_part(real / "extreme_ironing.mp3")], cache)
    (again,) = encoded(engine, [audio_part(real / "Hi.mp3")], cache, options=media.MediaOptions(True))
    assert (cache.hits, cache.misses) == (1, 3) and again.frames is official.frames


def test_the_least_recently_used_part_is_evicted_and_encoded_again(engine: Any, real: Path) -> None:
    cache = MediaCache(1)
    first = [image_part(real / "extreme_ironing.jpg")]
    (image,) = encoded(engine, first, cache)
    encoded(engine, [image_part(real / "Chinese_painting.jpg")], cache)  # evicts the first
    (again,) = encoded(engine, first, cache)
    assert (cache.hits, cache.misses, len(cache._parts)) == (0, 3, 1)
    assert again.tokens is not image.tokens and torch.equal(again.tokens, image.tokens)


def test_the_byte_bound_evicts_too_and_a_part_over_it_is_not_kept(engine: Any, real: Path) -> None:
    probe = MediaCache(8)
    (image,) = encoded(engine, [image_part(real / "extreme_ironing.jpg")], probe)
    size = part_bytes(image)
    assert size == image.tokens.nbytes > 0
    cache = MediaCache(8, max_bytes=size)
    cache.put("a", image)
    cache.put("b", image)  # two would exceed the bound: `a` goes
    assert list(cache._parts) == ["b"] and cache.stats()["bytes"] == size
    small = MediaCache(8, max_bytes=size - 1)
    small.put("c", image)
    assert small.stats()["size"] == 0


def test_a_long_recording_is_left_to_the_speech_token_cache(real: Path, tmp_path: Path) -> None:
    import numpy as np
    import soundfile as sf

    long_wav = tmp_path / "long.wav"
    sf.write(long_wav, np.zeros(16_000 * (media.LONG_SPEECH_MIN_S + 2), dtype=np.float32), 16_000)
    cache = MediaCache(8)
    part = {"type": "input_audio", "input_audio": {"data": b64(long_wav), "format": "wav"}}
    with decode_content([part], MediaLimits(), param=PARAM, cache=cache) as decoded:
        assert decoded.recordings and decoded.cache_keys == {}


def test_no_cache_is_the_plain_path(engine: Any, real: Path) -> None:
    content = [image_part(real / "extreme_ironing.jpg")]
    with decode_content(content, MediaLimits(), param=PARAM) as decoded:
        assert decoded.cache_keys == {}
        (part,) = encode_content(engine, decoded)
    assert part.source == f"{PARAM}[0].image_url.url"
