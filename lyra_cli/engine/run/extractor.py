"""The latent multi-modality extractor (LMME, docs/authors-behaviour.md#latent-multi-modality-extractor): which image
and speech tokens survive.

After every block of `compress_gap` decoder layers (never after the last layer), each multimodal (image or
speech) token is scored by the attention the text-query tokens pay it at that block's last layer: the
softmax of their post-RoPE queries against *all* keys of the layer (no causal mask, as the authors do),
averaged over heads and query tokens. The top `keep_rate` of the multimodal tokens (at least
`MIN_KEEP_TOKENS`, images and speech pooled in one ranking) go on to the deeper layers with their original
positions; text is always kept. This runs during prefill only: `engine.run.prefill` drives it.

Unlike the authors' flash-attention patch we never build an attention matrix for all queries: only the
query rows are scored, one kv-head group and a bounded number of rows at a time, so it works with any SDPA
kernel and with very long inputs.

This module also says what was kept in terms a user can check: for speech, which seconds of each clip.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from lyra_cli.audio.features import TOKEN_SECONDS
from lyra_cli.engine.model.config import ExtractorConfig
from lyra_cli.engine.run.prompt import TokenKind
from lyra_cli.errors import UsageError, setting
from lyra_cli.timefmt import clock, clock_tenths

# The authors never keep fewer multimodal tokens than this per drop (and do not drop below it at all).
MIN_KEEP_TOKENS = 32
# Kept speech tokens closer than this are reported as one span of the recording.
SPAN_MERGE_GAP_S = 1.0
# fp32 attention logits held at once while scoring (256 MiB): bounds memory for very long prompts.
SCORE_CHUNK_ELEMENTS = 1 << 26

# What hints suggest: the authors' long-speech setting (4 blocks, keep 70 %).
SUGGESTED_BLOCKS = 4
SUGGESTED_RATIO = 0.7

EXTRACT_SPEC = re.compile(r"^\s*(\d+)\s*[xX×]\s*([0-9]*\.?[0-9]+)\s*$")
EXTRACT = setting("extract")
EXTRACT_HINT = f"use {EXTRACT} BLOCKSxRATIO, e.g. `4x0.7`: 4 blocks of layers, keep 70% of image/speech tokens per block"

Span = tuple[float, float]  # (start_s, end_s) of a recording


# ---------------------------------------------------------------------------------------------- settings


def parse_extract(spec: str, num_layers: int) -> ExtractorConfig:
    """`--extract BLOCKSxRATIO` -> ExtractorConfig(compress_gap=num_layers // BLOCKS, keep_rate=RATIO).

    The gap is the authors' block length: a drop follows every `gap` layers, never the last one, so 4 blocks
    over 28 layers drop after layers 6, 13 and 20. When BLOCKS does not divide `num_layers` the model ends
    up with ceil(num_layers / gap) blocks, the last one shorter.
    """
    match = EXTRACT_SPEC.match(spec)
    if match is None:
        raise UsageError(f"cannot read {EXTRACT} `{spec}`", EXTRACT_HINT)
    blocks, keep_rate = int(match.group(1)), float(match.group(2))
    if not 1 <= blocks <= num_layers:
        raise UsageError(f"{EXTRACT} `{spec}` asks for `{blocks}` blocks of a {num_layers}-layer model",
                         f"BLOCKS must be between 2 and {num_layers}; {EXTRACT_HINT}")  # fmt: skip
    if not 0 < keep_rate <= 1:
        raise UsageError(f"{EXTRACT} `{spec}` keeps a ratio of `{keep_rate}`",
                         f"RATIO must be in (0, 1); {EXTRACT_HINT}")  # fmt: skip
    # Settings that can never drop a token are refused rather than run as a silent no-op.
    if blocks == 1:
        raise UsageError(f"{EXTRACT} `{spec}` drops nothing: one block has no drop (never after the last layer)",
                         f"BLOCKS must be between 2 and {num_layers}; leave {EXTRACT} out to keep every token")  # fmt: skip
    if keep_rate == 1:
        raise UsageError(f"{EXTRACT} `{spec}` drops nothing: a ratio of 1 keeps every image/speech token",
                         f"RATIO must be below 1, e.g. `{suggested_extract(num_layers)}`; leave {EXTRACT} out to keep "
                         "every token")  # fmt: skip
    return ExtractorConfig(compress_gap=num_layers // blocks, keep_rate=keep_rate)


def suggested_extract(num_layers: int) -> str | None:
    """The `--extract` value hints suggest, valid for this model: the authors' `4x0.7`, fewer blocks on a model
    with under 4 layers, None for a 1-layer model (nothing to drop between layers)."""
    if num_layers < 2:
        return None
    return f"{min(SUGGESTED_BLOCKS, num_layers)}x{SUGGESTED_RATIO}"


def compress_layers(cfg: ExtractorConfig, num_layers: int) -> list[int]:
    """0-based layers after which tokens are dropped (official condition, qwen2vl_top_attn.py:359)."""
    if not cfg.enabled:
        return []
    return [i for i in range(num_layers) if (i + 1) % cfg.compress_gap == 0 and i + 1 < num_layers]


def keep_count(n_ctx: int, keep_rate: float) -> int:
    """How many of `n_ctx` multimodal tokens a drop keeps (the authors' float floor, kept bit for bit)."""
    if n_ctx < MIN_KEEP_TOKENS:
        return n_ctx
    return max(MIN_KEEP_TOKENS, math.floor(n_ctx * keep_rate))


# ---------------------------------------------------------------------------------------------- token sets


def context_mask(kinds: Tensor) -> Tensor:
    """kinds (T,) TokenKind -> (T,) bool: the tokens the extractor may drop (every image/speech token)."""
    return kinds != TokenKind.TEXT


def query_mask(kinds: Tensor) -> Tensor:
    """kinds (T,) -> (T,) bool: text tokens after the first multimodal token.

    At inference there are no labels, so these are the authors' `text_labels`: the question and the
    chat-template tail, never the system prompt before the media.
    """
    is_context = context_mask(kinds)
    if not bool(is_context.any()):
        return torch.zeros_like(is_context)
    first = int(is_context.int().argmax())
    after_first = torch.arange(kinds.shape[0], device=kinds.device) > first
    return after_first & ~is_context


# ---------------------------------------------------------------------------------------------- scoring


def attention_scores(q_query: Tensor, k_all: Tensor, context_index: Tensor) -> Tensor:
    """How much attention the query tokens pay each context token, in fp32.

    q_query (1, nh, Q, hs) post-RoPE queries of the query tokens; k_all (1, nkv, S, hs) post-RoPE keys of
    every token of the layer; context_index (n_ctx,) columns of k_all to score -> (n_ctx,).

    softmax(q·kᵀ/√hs) over all S keys (no causal mask, as the authors), mean over heads and query rows.
    Query heads that share a kv head are scored together, `rows` query rows at a time, so memory stays
    at SCORE_CHUNK_ELEMENTS fp32 logits however long the prompt is; keys are never expanded per head.
    """
    B, nh, Q, hs = q_query.shape
    _, nkv, S, _ = k_all.shape
    if B != 1:
        raise ValueError(f"the extractor scores one sequence at a time, got a batch of {B}")
    group = nh // nkv
    # (nkv, group*Q, hs): head h = kv*group + g, the same grouping as the GQA attention itself
    q = q_query[0].float().reshape(nkv, group * Q, hs) * hs**-0.5
    rows = max(1, SCORE_CHUNK_ELEMENTS // S)
    total = torch.zeros(context_index.shape[0], dtype=torch.float32, device=q.device)
    for kv_head in range(nkv):
        keys = k_all[0, kv_head].float()  # (S, hs)
        for start in range(0, group * Q, rows):
            probs = (q[kv_head, start : start + rows] @ keys.T).softmax(dim=-1)  # (rows, S)
            total += probs.index_select(1, context_index).sum(dim=0)  # (n_ctx,)
    return total / (nh * Q)


def select_kept(scores: Tensor, is_context: Tensor, keep_rate: float) -> Tensor:
    """scores (n_ctx,) of the context tokens of is_context (T,) -> kept token indices (T',), ascending.

    Every non-context token stays; of the context tokens, the top keep_count by score, in original order.
    """
    context = is_context.nonzero().squeeze(1)  # (n_ctx,)
    k = keep_count(context.shape[0], keep_rate)
    keep = ~is_context
    keep[context[scores.topk(k).indices]] = True
    return keep.nonzero().squeeze(1)


# ---------------------------------------------------------------------------------------------- evidence


def speech_clips(kinds: Tensor) -> tuple[Tensor, Tensor]:
    """kinds (T,) -> (clip_index (T,), token_in_clip (T,)), one clip per contiguous run of speech tokens.

    Right for prompts where text or an image separates clips; a caller that puts two clips back to back
    knows their lengths and should pass its own indices to `evidence_spans`. Values at non-speech tokens
    are meaningless.
    """
    is_speech = (kinds == TokenKind.SPEECH).long()
    starts = is_speech.clone()
    starts[1:] = (is_speech[1:] - is_speech[:-1]).clamp(min=0)  # 1 where a run of speech begins
    clip_index = starts.cumsum(0) - 1
    index = torch.arange(kinds.shape[0], device=kinds.device)
    run_start = torch.where(starts.bool(), index, torch.zeros_like(index)).cummax(0).values
    return clip_index, index - run_start


def evidence_spans(
    kept_index: Tensor,
    kinds: Tensor,
    clip_index: Tensor | None = None,
    token_in_clip: Tensor | None = None,
    *,
    max_gap_s: float = SPAN_MERGE_GAP_S,
) -> dict[int, list[Span]]:
    """Which seconds of each speech clip the extractor kept: {clip: [(start_s, end_s), ...]}.

    kept_index (T',) prompt indices that survived every drop (`PrefillResult.kept_index`); kinds (T,);
    clip_index and token_in_clip (T,) say which clip each speech token belongs to and which of its tokens
    it is (default: `speech_clips(kinds)`). Token j of a clip covers [j, j+1)·TOKEN_SECONDS. Kept tokens
    at most `max_gap_s` apart merge into one span. Every clip of the prompt is a key, with [] when none of
    it was kept.
    """
    if clip_index is None or token_in_clip is None:
        clip_index, token_in_clip = speech_clips(kinds)
    is_speech = (kinds == TokenKind.SPEECH).cpu()
    clip_index, token_in_clip = clip_index.cpu(), token_in_clip.cpu()
    kept = kept_index.cpu()
    kept = kept[is_speech[kept]]
    spans: dict[int, list[Span]] = {int(c): [] for c in clip_index[is_speech].unique()}
    for clip in spans:
        tokens = token_in_clip[kept[clip_index[kept] == clip]].sort().values
        spans[clip] = _merge_tokens(tokens, max_gap_s)
    return spans


def _merge_tokens(tokens: Tensor, max_gap_s: float) -> list[Span]:
    """Sorted token numbers (n,) of one clip -> merged (start_s, end_s) spans."""
    if tokens.numel() == 0:
        return []
    max_gap_tokens = round(max_gap_s / TOKEN_SECONDS)  # integer arithmetic: no float drift at the edge
    silent = tokens[1:] - tokens[:-1] - 1  # tokens not kept between neighbours
    breaks = (silent > max_gap_tokens).nonzero().squeeze(1)
    firsts = torch.cat([tokens[:1], tokens[breaks + 1]]).tolist()
    lasts = torch.cat([tokens[breaks], tokens[-1:]]).tolist()
    return [(_seconds(first), _seconds(last + 1)) for first, last in zip(firsts, lasts)]


def _seconds(n_tokens: int) -> float:
    return round(n_tokens * TOKEN_SECONDS, 6)  # 3 * 0.1 is 0.30000000000000004


def format_spans(spans: list[Span]) -> str:
    """[(65.0, 130.2)] -> "00:01:05–00:02:11"; start rounded down, end up, so no kept audio is hidden.

    Spans are more than `SPAN_MERGE_GAP_S` apart, but rounding outward can make neighbours look touching
    (an end at 130.2 s and a start at 131.3 s both print as 00:02:11); such a boundary prints in tenths of a
    second instead (`00:02:10.2–…, 00:02:11.3–…`), so a gap never disappears from the text."""
    texts = []
    for i, (start, end) in enumerate(spans):
        touches_previous = i > 0 and math.floor(start) <= math.ceil(spans[i - 1][1])
        touches_next = i + 1 < len(spans) and math.ceil(end) >= math.floor(spans[i + 1][0])
        first = clock_tenths(start) if touches_previous else clock(math.floor(start))
        last = clock_tenths(end) if touches_next else clock(math.ceil(end))
        texts.append(f"{first}–{last}")
    return ", ".join(texts)
