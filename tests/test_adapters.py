"""Adapter routing per request and across turns (docs/authors-behaviour.md#adapter-switch)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lyra_cli.audio.io import load_audio
from lyra_cli.engine.model.adapters import Adapter, activate, route
from lyra_cli.engine.model.runtime import RuntimeRequest, resolve_runtime
from lyra_cli.engine.model.speech_encoder import project_frames
from lyra_cli.engine.model.vision import load_image
from lyra_cli.engine.run.generate import SamplingConfig
from lyra_cli.engine.run.pipeline import DecodedImage, DecodedSpeech, Engine
from lyra_cli.engine.run.prompt import Conversation, TextPart, Turn, build_inputs, encode_chunk, render

CPU = resolve_runtime(RuntimeRequest(device="cpu", dtype="fp32"))
SHORT = SamplingConfig(max_new_tokens=3)


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> Engine:
    return Engine.load(tiny_dir, CPU)


def test_route_by_window_count() -> None:
    assert route([]) is Adapter.NONE
    assert route([1]) is Adapter.SPEECH
    assert route([1, 1]) is Adapter.SPEECH
    assert route([1, 3]) is Adapter.LONG_SPEECH


def _last_logits(engine: Engine, conv: Conversation) -> tuple[torch.Tensor, Adapter]:
    inputs, adapter = engine.prepare(conv)
    hidden = engine.model.model(inputs.embeds, inputs.positions, None)
    return engine.model.logits(hidden[:, -1])[0], adapter


def _turn(engine: Engine, conv: Conversation, parts: list) -> str:
    events = list(engine.respond(conv, parts, SHORT))
    return events[-1].adapter


def test_adapters_switch_correctly_on_every_turn(engine: Engine, real: Path) -> None:
    short = engine.encode(DecodedSpeech(load_audio(real / "extreme_ironing.mp3"), "q.mp3"))
    long_wav = np.tile(load_audio(real / "jfk.flac"), 4)  # 44 s: two windows
    long = engine.encode(DecodedSpeech(long_wav, "long.wav"))
    image = engine.encode(DecodedImage(load_image(real / "extreme_ironing.jpg"), "x.jpg"))
    conv = Conversation()
    assert _turn(engine, conv, [image, TextPart("what is this?")]) == "none"
    assert _turn(engine, conv, [short]) == "speech"
    assert _turn(engine, conv, [TextPart("and then?")]) == "speech"  # the prompt still holds the speech
    assert _turn(engine, conv, [long, TextPart("summarize")]) == "long_speech"
    conv.reset()
    assert _turn(engine, conv, [TextPart("hello")]) == "none"  # the authors' CLI stays stuck here


def test_adapter_and_projector_change_the_logits(engine: Engine, real: Path) -> None:
    clip = engine.encode(DecodedSpeech(load_audio(real / "Hi.mp3"), "hi.mp3"))
    conv = Conversation()
    conv.turns.append(Turn([clip, TextPart("hi")]))
    with_speech, adapter = _last_logits(engine, conv)
    assert adapter is Adapter.SPEECH
    bank = engine.loaded.adapters
    assert bank.projector(Adapter.SPEECH) is not bank.projector(Adapter.NONE)
    activate(engine.model, bank, Adapter.NONE)
    embed = engine.model.model.embed_tokens
    plain = build_inputs(render(conv), encode_text=lambda t: encode_chunk(engine.loaded.tokenizer, t),
                         embed_ids=embed, project_speech=lambda p: project_frames(bank.projector(Adapter.NONE), p.frames))  # fmt: skip
    base = engine.model.logits(engine.model.model(plain.embeds, plain.positions, None)[:, -1])[0]
    assert (with_speech - base).abs().max() > 1e-3


def test_disabled_adapters_equal_the_plain_model(tiny_copy: Path) -> None:
    with_adapters = Engine.load(tiny_copy, CPU)
    for name in ("speech_lora", "long_speech_lora"):
        shutil.rmtree(tiny_copy / name)
    plain = Engine.load(tiny_copy, CPU)
    assert plain.loaded.adapters.available == ()
    conv = Conversation(turns=[Turn([TextPart("hello there")])])
    a, adapter = _last_logits(with_adapters, conv)
    b, _ = _last_logits(plain, conv)
    assert adapter is Adapter.NONE
    torch.testing.assert_close(a, b)
