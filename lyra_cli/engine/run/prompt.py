"""Chat template, placeholder splicing and 3-D M-RoPE positions (docs/authors-behaviour.md#prompt-template,
docs/authors-behaviour.md#tokenisation, docs/authors-behaviour.md#m-rope-positions).

A conversation renders to a flat list of segments: text strings and media items. Text strings are
tokenised one by one (so BPE never merges across a placeholder, docs/authors-behaviour.md#tokenisation), media items
contribute their encoded tokens, and positions follow the official rule: text and speech advance one per token,
an image or video occupies a (t, h, w) grid starting at the running position, and whatever follows
starts at the grid's maximum + 1. Any number and order of images, videos and speech clips is allowed
(the authors' code takes at most one image followed by one speech clip).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch

from lyra_cli.engine.model.adapters import Adapter
from lyra_cli.engine.model.vision import image_positions

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"


class TokenKind(IntEnum):
    """What each prompt position holds; the extractor scores IMAGE and SPEECH tokens."""

    TEXT = 0
    IMAGE = 1
    SPEECH = 2


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True, eq=False)
class VisualPart:
    """An encoded image or video: `tokens` (n, H) from the ViT merger, `grid_thw` (3,) before merging."""

    tokens: torch.Tensor
    grid_thw: tuple[int, int, int]
    kind: str  # "image" | "video"
    source: str


@dataclass(frozen=True, eq=False)
class SpeechPart:
    """An encoded speech clip, in one shape whichever path encoded it (`pipeline.encode_speech`).

    `frames` (n_windows, 1500, E) are the Whisper frames of a clip held in memory: every turn projects
    them with the projector of the adapter it routes to, and training projects them with autograd.
    `tokens` (n_windows·300, H) were projected by `adapter`'s projector: a streamed recording keeps only
    those, since frames for hours of audio would not fit in memory, and `adapters.route` sends a
    multi-window clip to the long-speech adapter in every turn anyway. `pipeline.speech_tokens` is the one
    place that turns a part into tokens for a turn's adapter.
    """

    n_windows: int
    duration_s: float
    source: str
    frames: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    adapter: Adapter | None = None  # whose projector made `tokens`


Part = TextPart | VisualPart | SpeechPart
Segment = str | VisualPart | SpeechPart


@dataclass
class Turn:
    user: list[Part]
    answer: str | None = None


@dataclass
class Conversation:
    system: str = DEFAULT_SYSTEM_PROMPT
    turns: list[Turn] = field(default_factory=list)

    def speech_parts(self) -> list[SpeechPart]:
        return [p for t in self.turns for p in t.user if isinstance(p, SpeechPart)]

    def reset(self) -> None:
        self.turns.clear()


def render_user(parts: Sequence[Part]) -> list[Segment]:
    """One user turn: `<|vision_start|>[visual]<|vision_end|>` per visual item, `[speech]` per clip,
    and a newline between a speech clip and text that follows it — the official layouts
    (`<|vision_start|><image><|vision_end|><speech>`, `<speech>\\n{text}`) as special cases."""
    segments: list[Segment] = []
    for i, part in enumerate(parts):
        if isinstance(part, VisualPart):
            segments += [VISION_START, part, VISION_END]
        elif isinstance(part, SpeechPart):
            segments.append(part)
            if i + 1 < len(parts) and isinstance(parts[i + 1], TextPart):
                segments.append("\n")
        else:
            segments.append(part.text)
    return segments


def render(conversation: Conversation) -> list[Segment]:
    """The whole conversation, ending with the assistant header of the turn to answer."""
    segments: list[Segment] = [f"{IM_START}system\n{conversation.system}{IM_END}\n"]
    for turn in conversation.turns:
        segments += [f"{IM_START}user\n", *render_user(turn.user), f"{IM_END}\n{IM_START}assistant\n"]
        if turn.answer is not None:
            segments.append(f"{turn.answer}{IM_END}\n")
    return _merge_text(segments)


def _merge_text(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for seg in segments:
        if isinstance(seg, str) and merged and isinstance(merged[-1], str):
            merged[-1] += seg
        else:
            merged.append(seg)
    return merged


@dataclass
class PromptInputs:
    """Everything prefill needs. `positions` (3, 1, T); `kinds` (T,) TokenKind; `embeds` (1, T, H).

    `clip_index` / `token_in_clip` (T,) say which speech clip (in prompt order) each speech token belongs
    to and which of its tokens it is (-1 elsewhere): the extractor's evidence maps kept tokens to seconds.
    """

    embeds: torch.Tensor
    positions: torch.Tensor
    kinds: torch.Tensor
    next_position: int  # the first decode step's position: max(positions) + 1
    clip_index: torch.Tensor
    token_in_clip: torch.Tensor
    speech_sources: list[tuple[str, float]]  # (source, duration_s) per speech clip, in prompt order

    @property
    def n_tokens(self) -> int:
        return self.embeds.shape[1]


def encode_chunk(tokenizer: Any, text: str) -> list[int]:
    """Token ids of one text chunk, no special tokens added (each chunk is encoded on its own,
    docs/authors-behaviour.md#tokenisation).

    Special-token strings inside the chunk (`<|im_start|>` …) still map to their single ids.
    """
    return list(tokenizer.encode(text, add_special_tokens=False))


def build_inputs(
    segments: Sequence[Segment],
    *,
    encode_text: Callable[[str], list[int]],
    embed_ids: Callable[[torch.Tensor], torch.Tensor],
    project_speech: Callable[[SpeechPart], torch.Tensor],
) -> PromptInputs:
    """Splice text embeddings and media tokens; assign positions with a running maximum."""
    embeds, positions, kinds, clips, offsets, sources = [], [], [], [], [], []
    next_pos = 0
    for seg in segments:
        if isinstance(seg, str):
            ids = torch.tensor(encode_text(seg), dtype=torch.long)
            if ids.numel() == 0:
                continue
            emb, kind = embed_ids(ids), TokenKind.TEXT
            pos = (torch.arange(ids.numel()) + next_pos).expand(3, -1)
        elif isinstance(seg, VisualPart):
            emb, kind = seg.tokens, TokenKind.IMAGE
            pos = image_positions(torch.tensor(seg.grid_thw), start=next_pos)
        else:
            emb, kind = project_speech(seg), TokenKind.SPEECH
            pos = (torch.arange(emb.shape[0]) + next_pos).expand(3, -1)
        n = emb.shape[0]
        embeds.append(emb)
        positions.append(pos)
        kinds.append(torch.full((n,), int(kind), dtype=torch.long))
        is_speech = kind is TokenKind.SPEECH
        clips.append(torch.full((n,), len(sources) if is_speech else -1, dtype=torch.long))
        offsets.append(torch.arange(n) if is_speech else torch.full((n,), -1, dtype=torch.long))
        if is_speech:
            sources.append((seg.source, seg.duration_s))  # type: ignore[union-attr]
        next_pos = int(pos.max()) + 1
    target = embeds[0]
    return PromptInputs(
        embeds=torch.cat([e.to(device=target.device, dtype=target.dtype) for e in embeds])[None],
        positions=torch.cat(positions, dim=1)[:, None, :].to(target.device),
        kinds=torch.cat(kinds),
        next_position=next_pos,
        clip_index=torch.cat(clips),
        token_in_clip=torch.cat(offsets),
        speech_sources=sources,
    )
