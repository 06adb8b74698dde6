"""Prefill: run the prompt through the decoder into the KV cache, in chunks and with the extractor.

The layers are processed block by block; a block is the run of layers between two extractor drops (or
every layer when the extractor is off). Within a block the live tokens go through the block's layers
`chunk_tokens` at a time, each chunk attending causally to what that layer has cached plus itself, so
attention and MLP activations are bounded by the chunk; only the hidden states at block boundaries are
kept for every live token (T×H). At the end of a block that is followed by a drop, the extractor scores
the multimodal tokens with the query tokens' queries at that layer against all of its cached keys, and
only the survivors (hidden states, original positions, kinds) enter the next block. The dropping layer's
own cache keeps every token; deeper layers only ever see the survivors, as in the authors' code
(official-lyra.md §3). Decoding afterwards is an ordinary `model(embeds, positions, cache)` step at the
original-numbering position: each layer attends over its own cache length.

Shapes: T prompt tokens, T' live tokens of a block, H hidden, C chunk tokens, Q query tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lyra_cli.engine.config import ExtractorConfig
from lyra_cli.engine.extractor import (
    attention_scores,
    compress_layers,
    context_mask,
    keep_count,
    query_mask,
    select_kept,
)
from lyra_cli.engine.llm import KVCache, LyraTextModel

# on_progress(done, total), in token-layers: one token through one decoder layer. With the extractor the
# deeper blocks hold fewer tokens, so this (not a token count) is what makes a progress bar move evenly.
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class DropRecord:
    """One extractor drop: after `layer` (0-based), live tokens went from n_before to n_after."""

    layer: int
    n_before: int
    n_after: int


@dataclass(frozen=True)
class PrefillResult:
    last_hidden: Tensor  # (1, H) final-normed state of the last prompt token: predicts the first new token
    kept_index: Tensor  # (T_final,) prompt indices that survived every drop, ascending (CPU, long)
    drops: list[DropRecord]


@dataclass
class LiveTokens:
    """The prompt tokens still in play, with everything gathered by the same index when some are dropped."""

    hidden: Tensor  # (1, T', H) at the current block boundary
    positions: Tensor  # (3, 1, T') original M-RoPE positions
    original_index: Tensor  # (T',) index into the prompt
    is_context: Tensor  # (T',) bool: image/speech tokens, droppable
    is_query: Tensor  # (T',) bool: fixed once from the full prompt, like the authors' text_labels

    @property
    def n_tokens(self) -> int:
        return self.hidden.shape[1]

    def take(self, index: Tensor) -> LiveTokens:
        return LiveTokens(
            hidden=self.hidden.index_select(1, index),
            positions=self.positions.index_select(2, index),
            original_index=self.original_index[index],
            is_context=self.is_context[index],
            is_query=self.is_query[index],
        )


@torch.no_grad()
def prefill(
    model: LyraTextModel,
    inputs_embeds: Tensor,
    position_ids: Tensor,
    cache: KVCache,
    *,
    kinds: Tensor | None = None,
    extractor: ExtractorConfig | None = None,
    chunk_tokens: int | None = None,
    on_progress: ProgressFn | None = None,
) -> PrefillResult:
    """Fill `cache` with the prompt inputs_embeds (1, T, H) at position_ids (3, 1, T).

    kinds (T,) TokenKind is needed by the extractor (which tokens are image/speech, which are queries).
    chunk_tokens bounds the tokens one layer call processes (None: all at once). Without chunking and
    without drops this is exactly `model(inputs_embeds, position_ids, cache)[:, -1]`. on_progress(done,
    total) is called after every chunk, in token-layers (the total is known up front, drops included).
    Inference only: runs without autograd.
    """
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    n_tokens, n_layers = inputs_embeds.shape[1], len(model.layers)
    live = _live_tokens(inputs_embeds, position_ids, kinds)
    drop_layers = _drop_layers(extractor, n_layers, live)
    keep_rate = extractor.keep_rate if extractor is not None else 1.0
    progress = _Progress(on_progress, _planned_work(live, drop_layers, n_layers, keep_rate))
    if not drop_layers and chunk_tokens is None:  # the plain path, shared with every other caller
        last_hidden = model(inputs_embeds, position_ids, cache)[:, -1]
        progress.advance(n_tokens * n_layers)
        return PrefillResult(last_hidden, live.original_index.cpu(), [])
    *dropping_blocks, last_block = _blocks(drop_layers, n_layers)
    drops: list[DropRecord] = []
    for block_start, block_stop in dropping_blocks:
        layers = range(block_start, block_stop)
        live.hidden, query_inputs = _run_block(model, layers, live, cache, chunk_tokens, progress, keep_all=True)
        live, record = _drop(model, layers[-1], live, query_inputs, cache, keep_rate)
        drops.append(record)
        for deeper in range(block_stop, n_layers):
            cache.reserve_fewer(deeper, record.n_before - record.n_after)
    hidden, _ = _run_block(model, range(*last_block), live, cache, chunk_tokens, progress, keep_all=False)
    last_hidden = model.norm(hidden[:, -1:])[:, -1]  # (1, H)
    return PrefillResult(last_hidden, live.original_index.cpu(), drops)


def _live_tokens(inputs_embeds: Tensor, position_ids: Tensor, kinds: Tensor | None) -> LiveTokens:
    n_tokens, device = inputs_embeds.shape[1], inputs_embeds.device
    if kinds is None:
        no_tokens = torch.zeros(n_tokens, dtype=torch.bool, device=device)
        is_context, is_query = no_tokens, no_tokens
    else:
        kinds = kinds.to(device)
        is_context, is_query = context_mask(kinds), query_mask(kinds)
    index = torch.arange(n_tokens, device=device)
    return LiveTokens(inputs_embeds, position_ids, index, is_context, is_query)


def _drop_layers(extractor: ExtractorConfig | None, n_layers: int, live: LiveTokens) -> list[int]:
    """Where drops happen: none without the extractor, without kinds, or without anyone asking (no queries)."""
    if extractor is None or not bool(live.is_query.any()) or not bool(live.is_context.any()):
        return []
    if live.hidden.shape[0] != 1:
        raise ValueError(f"the extractor prefills one sequence at a time, got a batch of {live.hidden.shape[0]}")
    return compress_layers(extractor, n_layers)


def _blocks(drop_layers: list[int], n_layers: int) -> list[tuple[int, int]]:
    """[start, stop) layer ranges, each ending after a drop layer; the last one ends with the model."""
    stops = [layer + 1 for layer in drop_layers] + [n_layers]
    return list(zip([0, *stops[:-1]], stops))


def _planned_work(live: LiveTokens, drop_layers: list[int], n_layers: int, keep_rate: float) -> int:
    """Token-layers the whole prefill will process; the kept counts are known before any scoring."""
    n_ctx, work = int(live.is_context.sum()), 0
    n_text = live.n_tokens - n_ctx
    for start, stop in _blocks(drop_layers, n_layers):
        work += (n_text + n_ctx) * (stop - start)
        n_ctx = keep_count(n_ctx, keep_rate)
    return work


class _Progress:
    def __init__(self, callback: ProgressFn | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def advance(self, work: int) -> None:
        self.done += work
        if self.callback is not None:
            self.callback(self.done, self.total)


def _run_block(
    model: LyraTextModel,
    layers: range,
    live: LiveTokens,
    cache: KVCache,
    chunk_tokens: int | None,
    progress: _Progress,
    *,
    keep_all: bool,
) -> tuple[Tensor, Tensor]:
    """Run every live token through `layers`, chunk by chunk, filling their caches.

    Returns the block's output, (1, T', H) when `keep_all` (a drop follows) or else only the last chunk's
    (1, C, H), and, when `keep_all`, the inputs (1, Q, H) of the block's last layer at the query tokens,
    which the drop scores with.
    """
    n_live = live.n_tokens
    step = chunk_tokens or n_live
    out = torch.empty_like(live.hidden) if keep_all else None  # (1, T', H): the next block's input
    query_inputs = []
    for start in range(0, n_live, step):
        stop = min(start + step, n_live)
        x = live.hidden[:, start:stop]  # (1, C, H)
        rope = model.rotary(live.positions[..., start:stop], x.dtype)
        for i in layers:
            if keep_all and i == layers[-1]:
                query_inputs.append(x[:, live.is_query[start:stop]])  # (1, Q_chunk, H)
            x, rope = model.forward_layer(i, x, rope, cache)
        if out is not None:
            out[:, start:stop] = x
        progress.advance((stop - start) * len(layers))
    queries = torch.cat(query_inputs, dim=1) if query_inputs else x[:, :0]
    return (out if out is not None else x), queries  # without a drop to follow, only the last row matters


def _drop(
    model: LyraTextModel, layer: int, live: LiveTokens, query_inputs: Tensor, cache: KVCache, keep_rate: float
) -> tuple[LiveTokens, DropRecord]:
    """Score the live context tokens at `layer` and keep the top ones (all other tokens stay)."""
    decoder_layer = model.layers[layer]
    query_rope = model.rotary(live.positions[..., live.is_query], query_inputs.dtype)
    # the same q the layer computed in its forward, recomputed for the Q query rows only
    q, _, _ = decoder_layer.self_attn.project(decoder_layer.input_layernorm(query_inputs), query_rope)
    keys, _ = cache.get(layer)  # (1, nkv, S, hs): any earlier turns' tokens, then all live tokens
    n_earlier = keys.shape[2] - live.n_tokens
    context = live.is_context.nonzero().squeeze(1)  # (n_ctx,)
    scores = attention_scores(q, keys, context + n_earlier)  # (n_ctx,)
    kept = select_kept(scores, live.is_context, keep_rate)
    return live.take(kept), DropRecord(layer, live.n_tokens, kept.shape[0])
