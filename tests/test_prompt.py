"""Prompt rendering, splicing and 3-D M-RoPE positions (docs/authors-behaviour.md#m-rope-positions)."""

from __future__ import annotations

import torch

from lyra_cli.engine.run.prompt import (
    Conversation,
    SpeechPart,
    TextPart,
    TokenKind,
    Turn,
    VisualPart,
    build_inputs,
    render,
)

HIDDEN = 4


def _visual(t: int, h: int, w: int) -> VisualPart:
    n = t * h * w // 4
    return VisualPart(torch.ones(n, HIDDEN), (t, h, w), "image", "img.jpg")


def _speech(windows: int) -> SpeechPart:
    return SpeechPart(windows, 30.0 * windows, "q.mp3", frames=torch.zeros(windows, 1500, 8))


def _build(segments):
    """Each character is one token, so positions are easy to count by hand."""
    return build_inputs(
        segments,
        encode_text=lambda text: [ord(c) for c in text],
        embed_ids=lambda ids: torch.zeros(len(ids), HIDDEN),
        project_speech=lambda part: torch.full((part.n_windows * 300, HIDDEN), 2.0),
    )


def test_official_image_speech_layout() -> None:
    visual, speech = _visual(1, 4, 6), _speech(1)
    conv = Conversation(turns=[Turn([visual, speech])])
    assert render(conv) == [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>",
        visual,
        "<|vision_end|>",
        speech,
        "<|im_end|>\n<|im_start|>assistant\n",
    ]


def test_speech_then_text_has_newline_and_history_is_kept() -> None:
    speech = _speech(1)
    conv = Conversation(system="S", turns=[Turn([speech, TextPart("what?")], answer="A"), Turn([TextPart("more")])])
    assert render(conv) == [
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n",
        speech,
        "\nwhat?<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n",
    ]


def test_positions_text_image_speech_text() -> None:
    visual, speech = _visual(1, 4, 6), _speech(1)  # merged grid 2×3 = 6 tokens
    inputs = _build(["ab", visual, "c", speech, "de"])
    pos = inputs.positions[:, 0]  # (3, T)
    assert inputs.n_tokens == 2 + 6 + 1 + 300 + 2
    assert pos[:, :2].tolist() == [[0, 1]] * 3
    grid = pos[:, 2:8]
    assert grid[0].tolist() == [2] * 6  # t
    assert grid[1].tolist() == [2, 2, 2, 3, 3, 3]  # h
    assert grid[2].tolist() == [2, 3, 4, 2, 3, 4]  # w
    assert pos[:, 8].tolist() == [5, 5, 5]  # text resumes at the grid's max + 1
    assert pos[:, 9:309].tolist() == [list(range(6, 306))] * 3  # speech is 1-D, like text
    assert pos[:, 309:].tolist() == [[306, 307]] * 3
    assert inputs.next_position == 308
    kinds = inputs.kinds.tolist()
    assert kinds.count(TokenKind.IMAGE) == 6 and kinds.count(TokenKind.SPEECH) == 300


def test_any_number_and_order_of_media() -> None:
    first, second = _speech(2), _visual(2, 2, 2)  # video-like grid t=2
    inputs = _build([first, "x", second, _speech(1)])
    assert inputs.n_tokens == 600 + 1 + 2 + 300
    assert inputs.positions[0, 0, 601:603].tolist() == [601, 602]  # t = 0, 1 of the video grid
    assert inputs.next_position == 601 + 2 + 300
