"""Prefill: run the prompt through the decoder into the KV cache, in chunks and with the extractor.

The layers are processed block by block; a block is the run of layers between two extractor drops (or
every layer when the extractor is off). Within a block the live tokens go through the block's layers
`chunk_tokens` at a time, each chunk attending causally to what that layer has cached plus itself, so
attention and MLP activations are bounded by the chunk; only the hidden states at block boundaries are
kept for every live token (T×H). At the end of a block that is followed by a drop, the extractor scores
the multimodal tokens with the query tokens' queries at that layer against all of its cached keys, and
only the survivors (hidden states, original positions, kinds) enter the next block. The dropping layer's
own cache keeps every token; deeper layers only ever see the survivors, as in the authors' code
(docs/authors-behaviour.md#latent-multi-modality-extractor). Decoding afterwards is an ordinary `model(embeds,
positions, cache)` step at the original-numbering position: each layer attends over its own cache length.

Shapes: T prompt tokens, T' live tokens of a block, H hidden, C chunk tokens, Q query tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lyra_cli.engine.model.config import ExtractorConfig
from lyra_cli.engine.model.kvcache import KVCache
from lyra_cli.engine.model.network import LyraTextModel
from lyra_cli.engine.run.extractor import (
    attention_scores,
    compress_layers,
    context_mask,
    keep_count,
    query_mask,
    select_kept,
)

# on_progress(done, total), in token-layers: one token through one decoder layer. With the extractor the
# deeper blocks hold fewer tokens, so this (not a token count) is what makes a progress bar move evenly.
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Chunking:
    """How a long prompt goes through the decoder: at most `tokens` at a time through each layer (bounds
    attention and MLP activations; None: all at once), reporting `on_progress(done, total)` in token-layers."""

    tokens: int | None = None
    on_progress: ProgressFn | None = None


@dataclass(frozen=True)
class DropRecord:
    """One extractor drop: after `layer` (0-based), live tokens went from n_before to n_after."""

    layer: int
    n_before: int
    n_after: int


@dataclass(frozen=True)
class FirstBlock:
    """Block 1 of an extractor prefill, kept for a later prompt that shares this one's beginning.

    Tokens attend only to earlier tokens, so block 1 (the layers before the first drop, which keep every
    token) computes the same for a shared prefix whatever follows it; only the drops depend on the question.
    A follow-up question about the same recording then runs only its own tokens through block 1."""

    n_layers: int  # layers in block 1; their caches hold every token of the prompt
    boundary: Tensor  # (1, T, H) every token's hidden state after block 1: the next block's input
    text_index: Tensor  # (n_text,) prompt indices of the text (non-context) tokens, ascending
    text_inputs: Tensor  # (1, n_text, H) their inputs to block 1's last layer: the drop scores with these


@dataclass(frozen=True)
class PrefillResult:
    last_hidden: Tensor  # (1, H) final-normed state of the last prompt token: predicts the first new token
    kept_index: Tensor  # (T_final,) prompt indices that survived every drop, ascending (CPU, long)
    drops: list[DropRecord]
    first_block: FirstBlock | None = None  # with `PrefillPlan.keep_first_block`, after block 1 of the whole prompt


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


@dataclass(frozen=True)
class PrefillPlan:
    """How one prompt is prefilled, decided once per turn: where it goes, what it reuses, what it keeps.

    `cache` already holds this prompt's first `reused_tokens` (a previous prompt's prefix, see
    `KVCache.truncate`/`keep_first_block`); only the rest is computed. With the extractor only block 1 of
    those tokens can be reused: `resume` is that block's state from the earlier prompt, and the rest of
    the prompt then runs through block 1 while the whole prompt continues past it. `keep_first_block`
    asks for this prompt's block 1 (`PrefillResult.first_block`), for the next prompt to resume from."""

    cache: KVCache
    reused_tokens: int = 0
    resume: FirstBlock | None = None
    extractor: ExtractorConfig | None = None
    chunk_tokens: int | None = None  # tokens one layer call processes at most (None: all at once)
    keep_first_block: bool = False

    @property
    def computed_from(self) -> int:
        """The first prompt token the prefill takes as input: resuming, block 1 sees the rest itself."""
        return 0 if self.resume is not None else self.reused_tokens


@torch.no_grad()
def prefill(
    model: LyraTextModel,
    inputs_embeds: Tensor,
    position_ids: Tensor,
    plan: PrefillPlan,
    *,
    kinds: Tensor | None = None,
    on_progress: ProgressFn | None = None,
) -> PrefillResult:
    """Fill `plan.cache` with the prompt inputs_embeds (1, T, H) at position_ids (3, 1, T), as `plan` says.

    The inputs are the whole prompt; its first `plan.reused_tokens` are in the cache already and are not
    computed again. kinds (T,) TokenKind is needed by the extractor (which tokens are image/speech, which
    are queries). Without chunking, drops or reuse this is exactly `model(inputs_embeds, position_ids, cache,
    n_out=1)[:, -1]`. on_progress(done, total) is called after every chunk, in token-layers (the total is
    known up front, drops included). With `plan.resume`, block 1's layers of the cache hold the prompt's
    first `cache.layer_length(0)` tokens (see `KVCache.keep_first_block`), and only the rest runs through
    block 1. Inference only: runs without autograd.
    """
    rest = slice(plan.computed_from, None)
    inputs_embeds, position_ids = inputs_embeds[:, rest], position_ids[:, :, rest]
    kinds = kinds[rest] if kinds is not None else None
    cache, extractor, chunk_tokens, resume = plan.cache, plan.extractor, plan.chunk_tokens, plan.resume
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    n_tokens, n_layers = inputs_embeds.shape[1], len(model.layers)
    live = _live_tokens(inputs_embeds, position_ids, kinds)
    drop_layers = _drop_layers(extractor, n_layers, live)
    keep_rate = extractor.keep_rate if extractor is not None else 1.0
    if resume is not None:
        return _resume(model, live, cache, drop_layers, keep_rate, chunk_tokens, on_progress, resume)
    progress = _Progress(on_progress, _planned_work(live, drop_layers, n_layers, keep_rate))
    if not drop_layers and chunk_tokens is None:  # the plain path, shared with every other caller
        last_hidden = model(inputs_embeds, position_ids, cache, n_out=1)[:, -1]
        progress.advance(n_tokens * n_layers)
        return PrefillResult(last_hidden, live.original_index.cpu(), [])
    *dropping_blocks, last_block = _blocks(drop_layers, n_layers)
    first_block = None
    if dropping_blocks:
        fresh = cache.seq_length == 0  # block 1 then covers the whole prompt: worth keeping
        layers = range(*dropping_blocks[0])
        live.hidden, text_inputs = _run_block(model, layers, live, cache, chunk_tokens, progress, keep_all=True)
        if plan.keep_first_block and fresh:
            first_block = FirstBlock(len(layers), live.hidden, live.original_index[~live.is_context], text_inputs)
        live, drops = _drop_and_continue(model, live, text_inputs, cache, dropping_blocks, keep_rate, chunk_tokens,
                                         progress)  # fmt: skip
    else:
        drops = []
    hidden, _ = _run_block(model, range(*last_block), live, cache, chunk_tokens, progress, keep_all=False)
    last_hidden = model.final_norm(hidden[:, -1:], live.hidden.device)[:, -1]  # (1, H)
    return PrefillResult(last_hidden, live.original_index.cpu(), drops, first_block)


def _drop_and_continue(
    model: LyraTextModel,
    live: LiveTokens,
    text_inputs: Tensor,
    cache: KVCache,
    dropping_blocks: list[tuple[int, int]],
    keep_rate: float,
    chunk_tokens: int | None,
    progress: _Progress,
) -> tuple[LiveTokens, list[DropRecord]]:
    """The drop after block 1 (already run: `live.hidden` is its output), then every further dropping block
    with its drop. Returns the survivors entering the last block."""
    n_layers = len(model.layers)
    drops: list[DropRecord] = []
    for i, (block_start, block_stop) in enumerate(dropping_blocks):
        if i > 0:
            layers = range(block_start, block_stop)
            live.hidden, text_inputs = _run_block(model, layers, live, cache, chunk_tokens, progress, keep_all=True)
        live, record = _drop(model, block_stop - 1, live, text_inputs, cache, keep_rate)
        drops.append(record)
        for deeper in range(block_stop, n_layers):
            cache.reserve_fewer(deeper, record.n_before - record.n_after)
    return live, drops


def _resume(
    model: LyraTextModel,
    live: LiveTokens,
    cache: KVCache,
    drop_layers: list[int],
    keep_rate: float,
    chunk_tokens: int | None,
    on_progress: ProgressFn | None,
    resume: FirstBlock,
) -> PrefillResult:
    """Prefill a prompt whose first `cache.layer_length(0)` tokens went through block 1 for an earlier
    prompt (`resume`): the rest runs through block 1, then the whole prompt is dropped and continues."""
    n_layers, n_shared = len(model.layers), cache.layer_length(0)
    *dropping_blocks, last_block = _blocks(drop_layers, n_layers)
    if not dropping_blocks or dropping_blocks[0][1] != resume.n_layers or not 0 < n_shared < live.n_tokens:
        raise ValueError("the kept first block does not fit this prompt's extractor blocks")
    progress = _Progress(on_progress, _planned_work(live, drop_layers, n_layers, keep_rate) - n_shared * resume.n_layers)
    rest = live.take(torch.arange(n_shared, live.n_tokens, device=live.hidden.device))
    layers = range(*dropping_blocks[0])
    rest_boundary, rest_text_inputs = _run_block(model, layers, rest, cache, chunk_tokens, progress, keep_all=True)
    shared_text = resume.text_index < n_shared  # the shared tokens are identical: so are their text rows
    live.hidden = torch.cat([resume.boundary[:, :n_shared], rest_boundary], dim=1)
    shared_text_inputs = resume.text_inputs[:, shared_text.to(resume.text_inputs.device)]
    text_inputs = torch.cat([shared_text_inputs, rest_text_inputs.to(shared_text_inputs.device)], dim=1)
    first_block = FirstBlock(len(layers), live.hidden, live.original_index[~live.is_context], text_inputs)
    live, drops = _drop_and_continue(model, live, text_inputs, cache, dropping_blocks, keep_rate, chunk_tokens,
                                     progress)  # fmt: skip
    hidden, _ = _run_block(model, range(*last_block), live, cache, chunk_tokens, progress, keep_all=False)
    last_hidden = model.final_norm(hidden[:, -1:], live.hidden.device)[:, -1]
    return PrefillResult(last_hidden, live.original_index.cpu(), drops, first_block)


def can_resume(first_block: FirstBlock, kinds: Tensor, extractor: ExtractorConfig | None, n_layers: int) -> bool:
    """Whether a prompt of these kinds (T,), prefilled with `extractor`, starts with the same block 1 as
    `first_block`: it drops (it has media and a question) and its first drop follows the same layer."""
    drops = planned_drops(extractor, n_layers, context_mask(kinds), query_mask(kinds))
    return bool(drops) and drops[0] + 1 == first_block.n_layers


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
    drops = planned_drops(extractor, n_layers, live.is_context, live.is_query)
    if drops and live.hidden.shape[0] != 1:
        raise ValueError(f"the extractor prefills one sequence at a time, got a batch of {live.hidden.shape[0]}")
    return drops


def planned_drops(extractor: ExtractorConfig | None, n_layers: int, is_context: Tensor, is_query: Tensor) -> list[int]:
    """The layers after which tokens are dropped: none without the extractor, without media (is_context), or
    without anyone asking (is_query); the same rule in prefill and in training (`train/extract.py`)."""
    if extractor is None or not bool(is_query.any()) or not bool(is_context.any()):
        return []
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

    Returns the block's output, (1, T', H) when `keep_all` (a drop follows) or else (the last block) only
    the last token's (1, 1, H): the model's last layer then only caches the other rows, since nothing reads
    their output. When `keep_all`, also the inputs (1, n_text, H) of the block's last layer at the text
    (non-context) tokens: the drop scores with the query tokens' among them.
    """
    n_live = live.n_tokens
    step = chunk_tokens or n_live
    out = torch.empty_like(live.hidden) if keep_all else None  # (1, T', H): the next block's input
    text_inputs = []
    for start in range(0, n_live, step):
        stop = min(start + step, n_live)
        x = live.hidden[:, start:stop]  # (1, C, H)
        rope = model.rotary(live.positions[..., start:stop], x.dtype)
        for i in layers:
            if keep_all and i == layers[-1]:
                text_inputs.append(x[:, ~live.is_context[start:stop].to(x.device)])  # (1, n_text_chunk, H)
            n_out = None if keep_all or i != layers[-1] else int(stop == n_live)  # only the last token's
            x, rope = model.forward_layer(i, x, rope, cache, n_out)
        if out is not None:
            out[:, start:stop] = x
        progress.advance((stop - start) * len(layers))
    texts = torch.cat(text_inputs, dim=1) if text_inputs else x[:, :0]
    return (out if out is not None else x), texts


def _drop(
    model: LyraTextModel, layer: int, live: LiveTokens, text_inputs: Tensor, cache: KVCache, keep_rate: float
) -> tuple[LiveTokens, DropRecord]:
    """Score the live context tokens at `layer` and keep the top ones (all other tokens stay).

    text_inputs (1, n_text, H): the layer's inputs at the live text tokens, in order; the queries are among them.
    Scoring runs on the layer's device (where its cache is); the live tokens stay where they are."""
    decoder_layer, device = model.layers[layer], model.layer_device(layer)
    query_inputs = text_inputs.to(device)[:, live.is_query[~live.is_context].to(device)]  # (1, Q, H)
    cos, sin = model.rotary(live.positions[..., live.is_query], query_inputs.dtype)
    # the same q the layer computed in its forward, recomputed for the Q query rows only
    q = decoder_layer.self_attn.queries(decoder_layer.input_layernorm(query_inputs), (cos.to(device), sin.to(device)))
    keys, _ = cache.get(layer)  # (1, nkv, S, hs): any earlier turns' tokens, then all live tokens
    n_earlier = keys.shape[2] - live.n_tokens
    context = live.is_context.nonzero().squeeze(1)  # (n_ctx,)
    scores = attention_scores(q, keys, (context + n_earlier).to(device))  # (n_ctx,)
    kept = select_kept(scores.to(live.is_context.device), live.is_context, keep_rate)
    return live.take(kept), DropRecord(layer, live.n_tokens, kept.shape[0])
