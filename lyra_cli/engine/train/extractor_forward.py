"""The latent multi-modality extractor in a training forward
(docs/authors-behaviour.md#latent-multi-modality-extractor, paper §3.2).

`prefill.prefill` drops tokens while filling an inference KV cache; training has no cache and needs
gradients, so this is the same rule on a plain layer-by-layer forward:

    x = embeds -> layers of block 1 -> score the context tokens with the query tokens' attention at the
    block's last layer (no_grad) -> keep the top ones (index_select: differentiable for the survivors)
    -> layers of block 2 ... -> final norm

Scores, the kept count and the query set are the authors' (`extractor.attention_scores`, `select_kept`,
`keep_count`); in training the query set also excludes supervised (answer) tokens, as the authors'
`text_labels` do. Survivors keep their original M-RoPE positions. Deeper layers process fewer tokens,
which is where the paper's 40-50 % training-time saving comes from.

Shapes: T prompt tokens, T' surviving tokens, H hidden, Q query tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lyra_cli.engine.model.config import ExtractorConfig
from lyra_cli.engine.model.network import LyraTextModel
from lyra_cli.engine.run.extractor import attention_scores, select_kept
from lyra_cli.engine.run.prefill import DropRecord, planned_drops


@dataclass(frozen=True)
class ExtractedForward:
    hidden: Tensor  # (1, T', H) final-normed states of the surviving tokens
    kept_index: Tensor  # (T',) prompt indices of the survivors, ascending
    drops: list[DropRecord]


def forward_extracting(
    model: LyraTextModel,
    inputs_embeds: Tensor,
    position_ids: Tensor,
    *,
    is_context: Tensor,
    is_query: Tensor,
    extractor: ExtractorConfig | None,
) -> ExtractedForward:
    """inputs_embeds (1, T, H), position_ids (3, 1, T), is_context / is_query (T,) bool -> the survivors'
    final hidden states. Without drops (extractor off, nothing to drop, or nobody asking) this is exactly
    `model(inputs_embeds, position_ids)`; gradient checkpointing applies per layer as there."""
    n_tokens, device = inputs_embeds.shape[1], inputs_embeds.device
    kept_index = torch.arange(n_tokens, device=device)
    is_context, is_query = is_context.to(device), is_query.to(device)
    drop_layers = set(planned_drops(extractor, len(model.layers), is_context, is_query))
    if drop_layers and inputs_embeds.shape[0] != 1:
        raise ValueError(f"the extractor trains on one sequence at a time, got {inputs_embeds.shape[0]}")
    x, positions = inputs_embeds, position_ids
    rope = model.rotary(positions, x.dtype)
    drops: list[DropRecord] = []
    for i in range(len(model.layers)):
        layer_input = x
        x, rope = model.forward_layer(i, x, rope, None)
        if i not in drop_layers:
            continue
        assert extractor is not None
        kept = _keep(model, i, layer_input, positions, is_context, is_query, extractor.keep_rate)
        drops.append(DropRecord(i, x.shape[1], kept.shape[0]))
        x, positions = x.index_select(1, kept), positions.index_select(2, kept)
        kept_index, is_context, is_query = kept_index[kept], is_context[kept], is_query[kept]
        rope = model.rotary(positions, x.dtype)
    return ExtractedForward(model.norm(x), kept_index, drops)


@torch.no_grad()
def _keep(
    model: LyraTextModel,
    layer_index: int,
    layer_input: Tensor,
    positions: Tensor,
    is_context: Tensor,
    is_query: Tensor,
    keep_rate: float,
) -> Tensor:
    """The token indices (ascending) that survive the drop after `layer_index`, scored as at inference:
    the query tokens' post-RoPE queries against every token's post-RoPE keys of that layer."""
    layer = model.layers[layer_index]
    normed = layer.input_layernorm(layer_input)  # (1, T', H): what the layer's attention saw
    keys = layer.self_attn.keys(normed, model.rotary(positions, normed.dtype))  # (1, nkv, T', hs)
    query_rows = normed[:, is_query]  # (1, Q, H)
    q, _, _ = layer.self_attn.project(query_rows, model.rotary(positions[..., is_query], normed.dtype))
    context = is_context.nonzero().squeeze(1)
    scores = attention_scores(q, keys, context)
    return select_kept(scores, is_context, keep_rate)
