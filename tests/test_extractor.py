"""The latent multi-modality extractor (docs/authors-behaviour.md#latent-multi-modality-extractor) against a
brute-force eager reference.

Contracts: `--extract` parsing and the authors' drop layers and keep counts; the query set; ratio 1 changes
nothing; the kept set equals a full-attention-matrix computation of the authors' score; after pruning,
decoding on the reduced caches equals recomputing every block from scratch on the kept tokens at their
original positions; the drop layer's cache keeps every token, deeper ones only the survivors; kept speech
tokens map to merged spans of seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lyra_cli.commands.common import flag_for
from lyra_cli.engine.model.config import ExtractorConfig, TextModelConfig
from lyra_cli.engine.model.kvcache import KVCache
from lyra_cli.engine.model.network import LyraTextModel
from lyra_cli.engine.model.vision import image_positions
from lyra_cli.engine.run.extractor import (
    MIN_KEEP_TOKENS,
    attention_scores,
    compress_layers,
    evidence_spans,
    format_spans,
    keep_count,
    parse_extract,
    query_mask,
    speech_clips,
    suggested_extract,
)
from lyra_cli.engine.run.prefill import PrefillPlan, PrefillResult, prefill
from lyra_cli.engine.run.prompt import TokenKind
from lyra_cli.errors import UsageError

CONFIG = TextModelConfig(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_layers=6,
    num_heads=4,
    num_kv_heads=2,  # head_dim 16, GQA groups of 2
    mrope_section=(2, 3, 3),
)
EXTRACTOR = ExtractorConfig(compress_gap=2, keep_rate=0.7)  # drops after layers 1 and 3 of 6
# system text, an image (12x16 patches -> 6x8 merged tokens), speech, question and template tail
PROMPT = [("text", 6), ("image", (1, 12, 16)), ("text", 2), ("speech", 90), ("text", 12)]
N_DECODE_STEPS = 3
DECODE_ATOL = 1e-5
WEIGHT_STD = 0.15  # large enough that attention is peaked and the top-k has no near ties


def build_prompt(pieces: list[tuple[str, object]]) -> tuple[Tensor, Tensor, int]:
    """-> positions (3, 1, T), kinds (T,), next position; the running-maximum rule of
    docs/authors-behaviour.md#m-rope-positions."""
    positions, kinds, next_pos = [], [], 0
    for kind, size in pieces:
        if kind == "image":
            pos, token_kind = image_positions(size, start=next_pos), TokenKind.IMAGE  # type: ignore[arg-type]
        else:
            pos = (torch.arange(size) + next_pos).expand(3, -1)  # type: ignore[arg-type]
            token_kind = TokenKind.SPEECH if kind == "speech" else TokenKind.TEXT
        positions.append(pos)
        kinds.append(torch.full((pos.shape[1],), int(token_kind)))
        next_pos = int(pos.max()) + 1
    return torch.cat(positions, dim=1)[:, None], torch.cat(kinds), next_pos


def random_model(seed: int = 0) -> tuple[LyraTextModel, nn.Linear]:
    gen = torch.Generator().manual_seed(seed)
    model, lm_head = LyraTextModel(CONFIG).eval(), nn.Linear(CONFIG.hidden_size, CONFIG.vocab_size, bias=False)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *lm_head.named_parameters()]:
            is_norm = name.endswith("norm.weight")
            p.copy_((1.0 if is_norm else 0.0) + WEIGHT_STD * torch.randn(p.shape, generator=gen))
    return model, lm_head


@pytest.fixture(scope="module")
def setup() -> tuple[LyraTextModel, nn.Linear, Tensor, Tensor, Tensor, int]:
    model, lm_head = random_model()
    positions, kinds, next_pos = build_prompt(PROMPT)
    embeds = torch.randn(1, kinds.shape[0], CONFIG.hidden_size, generator=torch.Generator().manual_seed(1))
    return model, lm_head, embeds, positions, kinds, next_pos


# ---------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "spec, gap, rate",
    [("4x0.7", 7, 0.7), ("4X0.8", 7, 0.8), (" 2 x 0.99 ", 14, 0.99), ("28x.5", 1, 0.5), ("2x0.9", 14, 0.9)],
)
def test_parse_extract(spec: str, gap: int, rate: float) -> None:
    assert parse_extract(spec, num_layers=28) == ExtractorConfig(compress_gap=gap, keep_rate=rate)


@pytest.mark.parametrize("spec", ["4", "x0.7", "4x", "0x0.7", "29x0.5", "4x0", "4x1.5", "4x-0.1", "ax0.7", "4x0.7x1"])
def test_parse_extract_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(UsageError) as error:
        parse_extract(spec, num_layers=28)
    assert "BLOCKSxRATIO" in (error.value.hint or "")


@pytest.mark.parametrize("spec", ["1x0.7", "4x1", "4x1.0", " 2 x 1 "])
def test_an_extract_that_can_drop_nothing_is_refused(spec: str) -> None:
    """One block never drops (no drop after the last layer), and a ratio of 1 keeps every token."""
    with pytest.raises(UsageError, match="drops nothing") as error:
        parse_extract(spec, num_layers=28)
    assert error.value.setting == "extract" and "leave extract out" in (error.value.hint or "")  # a library's words
    assert "leave --extract out" in (error.value.render(flag_for)[1] or "")  # the command line's


@pytest.mark.parametrize("layers, spec", [(28, "4x0.7"), (4, "4x0.7"), (3, "3x0.7"), (2, "2x0.7"), (1, None)])
def test_the_suggested_extract_parses_and_drops_on_that_model(layers: int, spec: str | None) -> None:
    assert suggested_extract(layers) == spec
    if spec is not None:
        assert compress_layers(parse_extract(spec, layers), layers)  # at least one drop


def test_compress_layers_follow_the_official_condition() -> None:
    assert compress_layers(parse_extract("4x0.7", 28), 28) == [6, 13, 20]  # never after the last layer
    assert compress_layers(ExtractorConfig(compress_gap=7, keep_rate=1.0), 28) == []  # ratio 1: off
    assert compress_layers(ExtractorConfig(), 28) == []  # the released configs: gap 33, rate 1
    assert compress_layers(ExtractorConfig(compress_gap=1, keep_rate=0.5), 4) == [0, 1, 2]


@pytest.mark.parametrize(
    "n_ctx, rate, kept",
    [(0, 0.5, 0), (10, 0.1, 10), (31, 0.5, 31), (32, 0.5, 32), (40, 0.5, 32), (100, 0.7, 70), (1000, 0.75, 750),
     (100, 0.57, 56)],  # 100 * 0.57 == 56.99999999999999: the authors' float floor, kept
)  # fmt: skip
def test_keep_count(n_ctx: int, rate: float, kept: int) -> None:
    assert keep_count(n_ctx, rate) == kept


def test_query_mask_is_text_after_the_first_multimodal_token() -> None:
    T, I, S = TokenKind.TEXT, TokenKind.IMAGE, TokenKind.SPEECH
    kinds = torch.tensor([T, T, I, I, T, S, S, T, T])
    assert query_mask(kinds).tolist() == [False, False, False, False, True, False, False, True, True]
    assert not query_mask(torch.tensor([T, T, T])).any()  # nothing to extract, nobody asks


# ---------------------------------------------------------------------------------- brute-force reference


def eager_layer(layer: nn.Module, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """One decoder layer with a materialised causal attention matrix -> (output, q, expanded k)."""
    attn = layer.self_attn
    q, k, v = attn.project(layer.input_layernorm(x), rope)  # (1, nh, T, hs), (1, nkv, T, hs) x2
    group = attn.num_heads // attn.num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (1, nh, T, hs)
    logits = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)  # (1, nh, T, T)
    T = x.shape[1]
    logits = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(1, T, -1)
    x = x + attn.o_proj(y)
    return x + layer.mlp(layer.post_attention_layernorm(x)), q, k


def brute_force_keep(q: Tensor, k: Tensor, is_context: Tensor, is_query: Tensor, rate: float) -> Tensor:
    """The authors' score with the whole probability matrix: softmax over all keys, no mask, in fp32."""
    probs = (q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)  # (1, nh, T, T)
    scores = probs[0][:, is_query][:, :, is_context].mean(0).mean(0)  # (n_ctx,)
    n_ctx = int(is_context.sum())
    k_keep = n_ctx if n_ctx < MIN_KEEP_TOKENS else max(MIN_KEEP_TOKENS, math.floor(n_ctx * rate))
    keep = ~is_context
    keep[is_context.nonzero().squeeze(1)[scores.topk(k_keep).indices]] = True
    return keep


def reference_forward(
    model: LyraTextModel, embeds: Tensor, positions: Tensor, kinds: Tensor, kept_sets: list[set[int]] | None
) -> tuple[Tensor, list[set[int]]]:
    """No cache: the first block on all tokens, each later block on the survivors at original positions.

    Tokens past len(kinds) are generated ones: never dropped. With `kept_sets` (original indices per drop)
    the drops are replayed instead of scored, as decoding replays the prefill's choice.
    """
    n_prompt = kinds.shape[0]
    is_context = torch.cat([kinds != TokenKind.TEXT, torch.zeros(embeds.shape[1] - n_prompt, dtype=torch.bool)])
    is_query = torch.cat([query_mask(kinds), torch.zeros(embeds.shape[1] - n_prompt, dtype=torch.bool)])
    x, pos, index, found = embeds, positions, torch.arange(embeds.shape[1]), []
    for i, layer in enumerate(model.layers):
        x, q, k = eager_layer(layer, x, model.rotary(pos, x.dtype))
        if i not in compress_layers(EXTRACTOR, CONFIG.num_layers):
            continue
        if kept_sets is None:
            keep = brute_force_keep(q, k, is_context, is_query, EXTRACTOR.keep_rate)
        else:
            keep = torch.tensor([int(j) in kept_sets[len(found)] or j >= n_prompt for j in index])
        found.append({int(j) for j in index[keep] if j < n_prompt})
        x, pos, index, is_context, is_query = x[:, keep], pos[..., keep], index[keep], is_context[keep], is_query[keep]
    return model.norm(x), found


def decode(model: LyraTextModel, lm_head: nn.Linear, cache: KVCache, first: PrefillResult, next_pos: int) -> Tensor:
    """Greedy steps on the cache after `first`: logits (1 + N_DECODE_STEPS, V)."""
    hidden, logits = first.last_hidden, []
    for step in range(N_DECODE_STEPS + 1):
        logits.append(lm_head(hidden)[0])
        if step == N_DECODE_STEPS:
            break
        embeds = model.embed_tokens(logits[-1].argmax().view(1, 1))
        hidden = model(embeds, torch.full((3, 1, 1), next_pos + step), cache)[:, -1]
    return torch.stack(logits)


# ---------------------------------------------------------------------------------- contracts


@torch.no_grad()
def test_ratio_one_changes_nothing(setup) -> None:
    model, lm_head, embeds, positions, kinds, next_pos = setup
    runs = []
    for extractor in (None, ExtractorConfig(compress_gap=2, keep_rate=1.0)):
        cache = KVCache.empty(CONFIG)
        result = prefill(model, embeds, positions, PrefillPlan(cache, extractor=extractor), kinds=kinds)
        runs.append(decode(model, lm_head, cache, result, next_pos))
        assert result.drops == [] and result.kept_index.tolist() == list(range(kinds.shape[0]))
    assert torch.equal(runs[0], runs[1])


@torch.no_grad()
def test_drop_that_keeps_everything_matches_no_extractor(setup) -> None:
    """Fewer than MIN_KEEP_TOKENS multimodal tokens: blocks run, nothing is dropped, nothing changes."""
    model, lm_head = setup[:2]
    positions, kinds, next_pos = build_prompt([("text", 5), ("speech", MIN_KEEP_TOKENS - 1), ("text", 4)])
    embeds = torch.randn(1, kinds.shape[0], CONFIG.hidden_size, generator=torch.Generator().manual_seed(2))
    runs = []
    for extractor in (None, EXTRACTOR):
        cache = KVCache.empty(CONFIG)
        result = prefill(model, embeds, positions, PrefillPlan(cache, extractor=extractor), kinds=kinds)
        runs.append(decode(model, lm_head, cache, result, next_pos))
    assert [(d.n_before, d.n_after) for d in result.drops] == [(kinds.shape[0], kinds.shape[0])] * 2
    assert (runs[0] - runs[1]).abs().max().item() <= 1e-6


@torch.no_grad()
def test_kept_set_and_decoding_match_brute_force(setup) -> None:
    model, lm_head, embeds, positions, kinds, next_pos = setup
    n_ctx = int((kinds != TokenKind.TEXT).sum())
    assert n_ctx >= 100
    _, kept_sets = reference_forward(model, embeds, positions, kinds, kept_sets=None)

    cache = KVCache.empty(CONFIG)
    result = prefill(model, embeds, positions, PrefillPlan(cache, extractor=EXTRACTOR), kinds=kinds)
    assert set(result.kept_index.tolist()) == kept_sets[-1]
    n_text = kinds.shape[0] - n_ctx
    first, second = keep_count(n_ctx, 0.7), keep_count(keep_count(n_ctx, 0.7), 0.7)
    assert [(d.layer, d.n_before, d.n_after) for d in result.drops] == [
        (1, kinds.shape[0], n_text + first), (3, n_text + first, n_text + second)]  # fmt: skip
    # the drop layer's own cache keeps every token; deeper layers hold only the survivors
    assert [cache.layer_length(i) for i in range(CONFIG.num_layers)] == [kinds.shape[0]] * 2 + [
        n_text + first] * 2 + [n_text + second] * 2  # fmt: skip

    ours = decode(model, lm_head, cache, result, next_pos)
    reference, tokens = [], embeds
    ref_positions = positions
    for step in range(N_DECODE_STEPS + 1):
        hidden, _ = reference_forward(model, tokens, ref_positions, kinds, kept_sets)
        reference.append(lm_head(hidden[:, -1])[0])
        next_embed = model.embed_tokens(ours[step].argmax().view(1, 1))  # the same greedy tokens as ours
        tokens = torch.cat([tokens, next_embed], dim=1)
        ref_positions = torch.cat([ref_positions, torch.full((3, 1, 1), next_pos + step)], dim=2)
    assert (ours - torch.stack(reference)).abs().max().item() <= DECODE_ATOL


@torch.no_grad()
def test_prefill_after_an_earlier_turn_scores_against_every_key(setup) -> None:
    """A prompt appended to a cache holding an earlier turn: the softmax runs over the earlier keys too, as
    for the authors, whose scores see the whole cache. Reference: the whole conversation at once."""
    model, lm_head, embeds, positions, kinds, _ = setup
    n_earlier = 20
    earlier = torch.randn(1, n_earlier, CONFIG.hidden_size, generator=torch.Generator().manual_seed(4))
    cache = KVCache.empty(CONFIG)
    model(earlier, torch.arange(n_earlier).expand(3, 1, -1), cache)
    result = prefill(model, embeds, positions + n_earlier, PrefillPlan(cache, extractor=EXTRACTOR), kinds=kinds)

    whole_kinds = torch.cat([torch.full((n_earlier,), int(TokenKind.TEXT)), kinds])
    whole_positions = torch.cat([torch.arange(n_earlier).expand(3, 1, -1), positions + n_earlier], dim=2)
    hidden, kept_sets = reference_forward(model, torch.cat([earlier, embeds], 1), whole_positions, whole_kinds, None)
    assert set((result.kept_index + n_earlier).tolist()) == kept_sets[-1] - set(range(n_earlier))
    assert (lm_head(result.last_hidden) - lm_head(hidden[:, -1])).abs().max().item() <= DECODE_ATOL


def test_attention_scores_bound_memory_and_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scoring a few query rows at a time gives the same scores as all at once."""
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 9, 16, generator=gen), torch.randn(1, 2, 50, 16, generator=gen)
    context = torch.arange(5, 45)
    whole = attention_scores(q, k, context)
    monkeypatch.setattr("lyra_cli.engine.run.extractor.SCORE_CHUNK_ELEMENTS", 3 * 50)  # 3 rows at a time
    assert (attention_scores(q, k, context) - whole).abs().max().item() <= 1e-7
    reference = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) / 4).softmax(-1)[0, :, :, context]
    assert (whole - reference.mean((0, 1))).abs().max().item() <= 1e-7


# ---------------------------------------------------------------------------------- evidence


def test_evidence_spans_merge_near_tokens_per_clip() -> None:
    T, S = TokenKind.TEXT, TokenKind.SPEECH
    # text, clip 0 of 40 tokens, text, clip 1 of 30 tokens, text
    kinds = torch.tensor([T] * 3 + [S] * 40 + [T] * 2 + [S] * 30 + [T])
    clip0 = [0, 1, 2, 5, 16, 30, 31]  # gaps: 0.2 s (merge), exactly 1.0 s (merge), 1.3 s (split)
    clip1 = [29]
    kept = torch.tensor(list(range(3)) + [3 + j for j in clip0] + [45 + j for j in clip1] + [75])
    spans = evidence_spans(kept, kinds)
    assert spans == {0: [(0.0, 1.7), (3.0, 3.2)], 1: [(2.9, 3.0)]}
    assert format_spans(spans[0]) == "00:00:00–00:00:02, 00:00:03–00:00:04"
    assert evidence_spans(kept[:3], kinds) == {0: [], 1: []}  # clips that lost everything are still listed


def test_evidence_spans_take_the_callers_clip_numbering() -> None:
    """Two clips back to back look like one run of speech; the caller's indices tell them apart."""
    kinds = torch.full((20,), int(TokenKind.SPEECH))
    clip_index, token_in_clip = torch.tensor([0] * 8 + [1] * 12), torch.tensor(list(range(8)) + list(range(12)))
    kept = torch.tensor([7, 8])
    assert evidence_spans(kept, kinds) == {0: [(0.7, 0.9)]}  # one run: adjacent tokens
    assert evidence_spans(kept, kinds, clip_index, token_in_clip) == {0: [(0.7, 0.8)], 1: [(0.0, 0.1)]}
    assert [t.tolist() for t in speech_clips(torch.tensor([0, 2, 2, 0, 2]))] [:1] == [[-1, 0, 0, 0, 1]]
    assert speech_clips(torch.tensor([0, 2, 2, 0, 2]))[1][[1, 2, 4]].tolist() == [0, 1, 0]


def test_format_spans_uses_hours_minutes_seconds() -> None:
    assert format_spans([(65.0, 130.2), (3900.0, 3912.5)]) == "00:01:05–00:02:11, 01:05:00–01:05:13"
    assert format_spans([]) == ""


def _clock_s(text: str) -> float:
    hours, minutes, seconds = text.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def test_format_spans_never_prints_separate_spans_as_touching() -> None:
    """Kept stretches over 1 s apart stay visibly apart: a boundary that whole seconds would merge prints tenths."""
    assert format_spans([(190.0, 242.2), (243.4, 250.0)]) == "00:03:10–00:04:02.2, 00:04:03.4–00:04:10"
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):  # random spans as evidence_spans makes them: 0.1 s steps, gaps over SPAN_MERGE_GAP_S
        steps = torch.randint(1, 40, (12,), generator=generator).tolist()
        edges, t = [], 0
        for i, step in enumerate(steps):
            t += step + 10 if i % 2 == 0 else step  # a gap of over 10 tokens (1.0 s), then a span of `step`
            edges.append(round(t * 0.1, 6))
        spans = list(zip(edges[0::2], edges[1::2]))
        printed = [tuple(_clock_s(x) for x in span.split("–")) for span in format_spans(spans).split(", ")]
        assert all(start <= s and end >= e for (start, end), (s, e) in zip(printed, spans))  # outward: nothing hidden
        assert all(printed[i][1] < printed[i + 1][0] for i in range(len(printed) - 1))  # never touching
