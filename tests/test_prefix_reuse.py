"""Follow-up prompts reuse the previous prompt's KV cache for their shared beginning, with equal results."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lyra_cli.audio.io import load_audio
from lyra_cli.engine.model.kvcache import KVCache
from lyra_cli.engine.model.loader import load_model
from lyra_cli.engine.model.runtime import RuntimeRequest, resolve_runtime
from lyra_cli.engine.run.generate import SamplingConfig
from lyra_cli.engine.run.pipeline import DecodedSpeech, Engine
from lyra_cli.engine.run.prompt import Conversation, TextPart

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


def test_with_the_extractor_follow_ups_reuse_block_one(engines, real: Path) -> None:  # noqa: ANN001
    """The drops depend on the question, so only the layers before the first drop are reused; the answers,
    kept counts and evidence equal those of an engine that prefills everything again."""
    from lyra_cli.engine.run.extractor import parse_extract

    reusing, fresh = engines
    extractor = parse_extract("2x0.5", reusing.model.config.text.num_layers)
    clip = reusing.encode(DecodedSpeech(load_audio(real / "jfk.flac"), "jfk.flac"))
    questions = ["What is said?", "Who said it, and when?", "Say it again, slowly."]
    results = {}
    for engine in (reusing, fresh):
        results[engine.reuse_prefix] = [
            list(engine.respond(Conversation(), [clip, TextPart(q)], SAMPLING, extractor=extractor))[-1]
            for q in questions
        ]
    for done, ref in zip(results[True], results[False], strict=True):
        assert (done.text, done.kept_tokens, done.evidence) == (ref.text, ref.kept_tokens, ref.evidence)
        assert ref.reused_tokens == 0 and done.kept_tokens < done.prompt_tokens  # it dropped tokens
    assert results[True][0].reused_tokens == 0
    assert all(done.reused_tokens > 300 for done in results[True][1:])  # block 1 of the recording, twice in a row
    # a question without the extractor after one with it starts over: the deeper layers hold survivors
    plain = _ask(reusing, Conversation(), [clip, TextPart("What is said?")])
    assert plain.reused_tokens == 0 and plain.text == _ask(fresh, Conversation(), [clip, TextPart("What is said?")]).text


def _interrupt_layer_call(monkeypatch: pytest.MonkeyPatch, layer: torch.nn.Module, at_call: int) -> None:
    """Ctrl-C arriving inside `layer` on its `at_call`-th call (1-based), as a KeyboardInterrupt would."""
    original, calls = layer.forward, [0]

    def forward(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls[0] += 1
        if calls[0] == at_call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(layer, "forward", forward)


@pytest.mark.parametrize("at_call", [1, 3], ids=["during-prefill", "during-decode"])
def test_an_interrupted_turn_never_leaves_a_broken_cache(engines, real: Path, monkeypatch: pytest.MonkeyPatch,
                                                         at_call: int) -> None:  # fmt: skip
    """Ctrl-C inside the last layer, in the prefill or in a decode step: the next question still gets the
    answer a fresh engine gives, reusing the recording only when its prefill had completed."""
    reusing, fresh = engines
    clip = reusing.encode(DecodedSpeech(load_audio(real / "jfk.flac"), "jfk.flac"))
    _ask(reusing, Conversation(), [TextPart("warm up")])  # a previous prompt to reuse, if the cache allowed it
    with monkeypatch.context() as patch:
        _interrupt_layer_call(patch, reusing.model.model.layers[-1], at_call)
        with pytest.raises(KeyboardInterrupt):
            _ask(reusing, Conversation(), [clip, TextPart("What is said?")])
    done = _ask(reusing, Conversation(), [clip, TextPart("Who said it?")])
    assert done.text == _ask(fresh, Conversation(), [clip, TextPart("Who said it?")]).text
    assert (done.reused_tokens > 300) == (at_call > 1)  # the recording's prefill completed only when decoding
