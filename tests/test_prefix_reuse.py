"""Follow-up prompts reuse the previous prompt's KV cache for their shared beginning, with equal results."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lyra_cli.audio.io import load_audio
from lyra_cli.engine.generate import SamplingConfig
from lyra_cli.engine.llm import KVCache
from lyra_cli.engine.loader import load_model
from lyra_cli.engine.pipeline import DecodedSpeech, Engine
from lyra_cli.engine.prompt import Conversation, TextPart
from lyra_cli.engine.runtime import RuntimeRequest, resolve_runtime

SAMPLING = SamplingConfig(max_new_tokens=6, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def engines(tiny_dir: Path) -> tuple[Engine, Engine]:
    loaded = load_model(tiny_dir, resolve_runtime(RuntimeRequest(device="cpu")))
    return Engine(loaded), Engine(loaded, reuse_prefix=False)


def _ask(engine: Engine, conv: Conversation, parts: list):
    return list(engine.respond(conv, parts, SAMPLING))[-1]


def test_follow_up_questions_reuse_the_recording_prefix(engines, real: Path) -> None:  # noqa: ANN001
    reusing, fresh = engines
    clip = reusing.encode(DecodedSpeech(load_audio(real / "jfk.flac"), "jfk.flac"))
    answers = {}
    for engine in (reusing, fresh):
        first = _ask(engine, Conversation(), [clip, TextPart("What is said?")])
        second = _ask(engine, Conversation(), [clip, TextPart("Who said it, and when?")])
        answers[engine.reuse_prefix] = (first, second)
    (first, second), (first_ref, second_ref) = answers[True], answers[False]
    assert first.reused_tokens == 0 and second.reused_tokens > 300  # system + user header + 300 speech tokens
    assert second_ref.reused_tokens == 0
    assert (first.text, second.text) == (first_ref.text, second_ref.text)


def test_next_chat_turn_reuses_the_conversation(engines) -> None:  # noqa: ANN001
    reusing, _ = engines
    conv = Conversation()
    _ask(reusing, conv, [TextPart("hello there")])
    done = _ask(reusing, conv, [TextPart("and again")])
    assert done.reused_tokens > 10


def test_truncated_cache_equals_a_fresh_prefill(engines) -> None:  # noqa: ANN001
    engine, _ = engines
    model = engine.model.model
    torch.manual_seed(0)
    embeds = torch.randn(1, 20, model.embed_tokens.weight.shape[1])
    positions = torch.arange(20).expand(3, 1, 20)
    cache = KVCache.empty(engine.model.config.text)
    model(embeds, positions, cache)  # an older prompt of 20 tokens
    cache.truncate(12)  # keep its first 12, then continue with different tokens
    other = torch.randn(1, 8, embeds.shape[2])
    reused = model(other, positions[:, :, 12:], cache)
    reference = model(torch.cat([embeds[:, :12], other], dim=1), positions, None)[:, 12:]
    torch.testing.assert_close(reused, reference, atol=1e-5, rtol=1e-5)
