"""Chunked prefill (`engine.run.prefill`) against one-shot prefill, with and without the extractor.

Contracts: the plain path is exactly `model(...)`; any chunk size gives the same last hidden state, the same
kept set and the same per-layer cache lengths as one shot; decoding afterwards is the same; progress is
counted in token-layers and ends at its announced total.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lyra_cli.engine.model.config import ExtractorConfig, TextModelConfig
from lyra_cli.engine.model.kvcache import CACHE_BLOCK_TOKENS, KVCache
from lyra_cli.engine.model.network import LyraTextModel
from lyra_cli.engine.run.prefill import PrefillPlan, PrefillResult, prefill
from lyra_cli.engine.run.prompt import TokenKind

CONFIG = TextModelConfig(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    mrope_section=(2, 3, 3),
)
EXTRACTOR = ExtractorConfig(compress_gap=1, keep_rate=0.7)  # drops after layers 0, 1, 2
# (kind, tokens): system text, speech, a gap of text, speech again, question
PROMPT = [(TokenKind.TEXT, 5), (TokenKind.SPEECH, 60), (TokenKind.TEXT, 3), (TokenKind.SPEECH, 50), (TokenKind.TEXT, 9)]
N_TOKENS = sum(n for _, n in PROMPT)
CHUNK_SIZES = [1, 7, 64, N_TOKENS, 1000]
CHUNKED_ATOL = 1e-5
N_DECODE_STEPS = 3
WEIGHT_STD = 0.15


@pytest.fixture(scope="module")
def setup() -> tuple[LyraTextModel, nn.Linear, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    model, lm_head = LyraTextModel(CONFIG).eval(), nn.Linear(CONFIG.hidden_size, CONFIG.vocab_size, bias=False)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *lm_head.named_parameters()]:
            p.copy_(float(name.endswith("norm.weight")) + WEIGHT_STD * torch.randn(p.shape, generator=gen))
    kinds = torch.cat([torch.full((n,), int(kind)) for kind, n in PROMPT])
    positions = torch.arange(N_TOKENS).expand(3, 1, -1)  # text and speech: one position per token
    embeds = torch.randn(1, N_TOKENS, CONFIG.hidden_size, generator=gen)
    return model, lm_head, embeds, positions, kinds


def run(setup, extractor: ExtractorConfig | None, chunk_tokens: int | None) -> tuple[PrefillResult, Tensor, KVCache]:
    """Prefill, then greedy decode steps: (result, logits (1 + N_DECODE_STEPS, V), cache)."""
    model, lm_head, embeds, positions, kinds = setup
    cache = KVCache.empty(CONFIG, capacity=N_TOKENS + N_DECODE_STEPS)
    with torch.no_grad():
        result = prefill(model, embeds, positions, PrefillPlan(cache, extractor=extractor, chunk_tokens=chunk_tokens), kinds=kinds)
        hidden, logits = result.last_hidden, [lm_head(result.last_hidden)[0]]
        for step in range(N_DECODE_STEPS):
            token = model.embed_tokens(logits[-1].argmax().view(1, 1))
            hidden = model(token, torch.full((3, 1, 1), N_TOKENS + step), cache)[:, -1]
            logits.append(lm_head(hidden)[0])
    return result, torch.stack(logits), cache


def test_plain_prefill_is_exactly_the_model(setup) -> None:
    model, _, embeds, positions, kinds = setup
    with torch.no_grad():
        expected = model(embeds, positions, KVCache.empty(CONFIG), n_out=1)[:, -1]
        result = prefill(model, embeds, positions, PrefillPlan(KVCache.empty(CONFIG)), kinds=kinds)
    assert torch.equal(result.last_hidden, expected)
    assert result.kept_index.tolist() == list(range(N_TOKENS)) and result.drops == []


@pytest.mark.parametrize("n_out", [0, 1, 5])
def test_last_layer_computes_only_the_rows_read_and_caches_every_row(setup, n_out: int) -> None:
    """n_out skips the last layer's attention and MLP for rows nobody reads: the same last rows as the full
    forward, and the same cache (every layer, every token), so decoding afterwards is unchanged."""
    model, _, embeds, positions, _ = setup
    full_cache, cache = KVCache.empty(CONFIG), KVCache.empty(CONFIG)
    with torch.no_grad():
        full = model(embeds, positions, full_cache)
        last_rows = model(embeds, positions, cache, n_out=n_out)
    assert last_rows.shape == (1, n_out, CONFIG.hidden_size)
    torch.testing.assert_close(last_rows, full[:, N_TOKENS - n_out :], rtol=0, atol=1e-5)
    for layer in range(CONFIG.num_layers):
        assert all(torch.equal(a, b) for a, b in zip(cache.get(layer), full_cache.get(layer)))


@pytest.mark.parametrize("extractor", [None, EXTRACTOR], ids=["plain", "extractor"])
@pytest.mark.parametrize("chunk_tokens", CHUNK_SIZES)
def test_chunked_prefill_equals_one_shot(setup, extractor: ExtractorConfig | None, chunk_tokens: int) -> None:
    one_shot, one_shot_logits, one_shot_cache = run(setup, extractor, chunk_tokens=None)
    chunked, chunked_logits, chunked_cache = run(setup, extractor, chunk_tokens=chunk_tokens)
    assert torch.equal(chunked.kept_index, one_shot.kept_index)
    assert chunked.drops == one_shot.drops
    assert (chunked.last_hidden - one_shot.last_hidden).abs().max().item() <= CHUNKED_ATOL
    assert (chunked_logits - one_shot_logits).abs().max().item() <= CHUNKED_ATOL  # decoding after it, too
    lengths = [chunked_cache.layer_length(i) for i in range(CONFIG.num_layers)]
    assert lengths == [one_shot_cache.layer_length(i) for i in range(CONFIG.num_layers)]
    assert chunked_cache.seq_length == N_TOKENS + N_DECODE_STEPS


def test_extractor_prunes_deeper_caches(setup) -> None:
    result, _, cache = run(setup, EXTRACTOR, chunk_tokens=16)
    n_text = sum(n for kind, n in PROMPT if kind == TokenKind.TEXT)
    expected = [N_TOKENS, n_text + 77, n_text + 53, n_text + 37]  # 110 speech tokens -> 77 -> 53 -> 37
    assert [d.n_after for d in result.drops] == expected[1:]
    assert [cache.layer_length(i) - N_DECODE_STEPS for i in range(CONFIG.num_layers)] == expected
    kinds = setup[4]
    assert (kinds[result.kept_index] == TokenKind.TEXT).sum() == n_text  # text is never dropped


@pytest.mark.parametrize("extractor", [None, EXTRACTOR], ids=["plain", "extractor"])
@pytest.mark.parametrize("chunk_tokens", [None, 16])
def test_progress_counts_token_layers_to_the_total(setup, extractor, chunk_tokens) -> None:
    model, _, embeds, positions, kinds = setup
    calls: list[tuple[int, int]] = []

    def on_progress(done: int, total: int) -> None:
        calls.append((done, total))

    with torch.no_grad():
        result = prefill(model, embeds, positions, PrefillPlan(KVCache.empty(CONFIG), extractor=extractor,
                         chunk_tokens=chunk_tokens), kinds=kinds, on_progress=on_progress)  # fmt: skip
    dones, totals = [c[0] for c in calls], {c[1] for c in calls}
    # (live tokens, layers) per block: one block of every layer, or (EXTRACTOR) one block per layer
    blocks = [(N_TOKENS, 1)] + [(d.n_after, 1) for d in result.drops] if extractor else [(N_TOKENS, CONFIG.num_layers)]
    assert totals == {sum(n * layers for n, layers in blocks)}
    assert dones == sorted(dones) and dones[-1] == sum(n * layers for n, layers in blocks)
    if chunk_tokens is not None:
        assert len(calls) == sum(-(-n // chunk_tokens) for n, _ in blocks)  # once per chunk


def test_rejects_bad_chunk_size(setup) -> None:
    model, _, embeds, positions, _ = setup
    with pytest.raises(ValueError, match="chunk_tokens"):
        prefill(model, embeds, positions, PrefillPlan(KVCache.empty(CONFIG), chunk_tokens=0))


def test_prefill_after_an_earlier_turn(setup) -> None:
    """A prompt appended to a filled cache: chunked equals one shot, scores see the earlier keys too."""
    model, _, embeds, positions, kinds = setup
    results = []
    for chunk_tokens in (None, 9):
        cache = KVCache.empty(CONFIG)
        with torch.no_grad():
            model(embeds[:, :20], positions[..., :20], cache)  # an earlier turn
            results.append(prefill(model, embeds, positions + 20, PrefillPlan(cache, extractor=EXTRACTOR,
                                   chunk_tokens=chunk_tokens), kinds=kinds))  # fmt: skip
    assert torch.equal(results[0].kept_index, results[1].kept_index)
    assert (results[0].last_hidden - results[1].last_hidden).abs().max().item() <= CHUNKED_ATOL


def test_pruned_layers_reserve_only_their_tokens(setup) -> None:
    """The capacity hint (prompt + new tokens) shrinks by what was dropped before a layer is filled."""
    model, _, embeds, positions, kinds = setup
    capacity = CACHE_BLOCK_TOKENS + 14  # layer 0 needs two storage blocks; after 33 dropped, one is enough
    cache = KVCache.empty(CONFIG, capacity=capacity)
    with torch.no_grad():
        prefill(model, embeds, positions, PrefillPlan(cache, extractor=EXTRACTOR), kinds=kinds)
    assert [cache._keys[i].shape[2] for i in range(CONFIG.num_layers)] == [2 * CACHE_BLOCK_TOKENS] + [
        CACHE_BLOCK_TOKENS] * 3  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# A follow-up question reusing block 1 of the previous prompt (FirstBlock / resume)
# ---------------------------------------------------------------------------------------------------------

N_SHARED = N_TOKENS - 9  # everything but the first prompt's question
N_NEW_QUESTION = 14


def _follow_up(setup) -> tuple[Tensor, Tensor, Tensor]:  # noqa: ANN001
    """The first prompt's beginning (system, speech, text, speech) with another, longer question."""
    _, _, embeds, positions, kinds = setup
    question = torch.randn(1, N_NEW_QUESTION, CONFIG.hidden_size, generator=torch.Generator().manual_seed(7))
    n = N_SHARED + N_NEW_QUESTION
    return (torch.cat([embeds[:, :N_SHARED], question], dim=1), torch.arange(n).expand(3, 1, -1),
            torch.cat([kinds[:N_SHARED], torch.full((N_NEW_QUESTION,), int(TokenKind.TEXT))]))  # fmt: skip


def _decode(setup, cache: KVCache, result: PrefillResult, n_prompt: int) -> Tensor:  # noqa: ANN001
    model, lm_head = setup[0], setup[1]
    hidden, logits = result.last_hidden, [lm_head(result.last_hidden)[0]]
    for step in range(N_DECODE_STEPS):
        token = model.embed_tokens(logits[-1].argmax().view(1, 1))
        hidden = model(token, torch.full((3, 1, 1), n_prompt + step), cache)[:, -1]
        logits.append(lm_head(hidden)[0])
    return torch.stack(logits)


@pytest.mark.parametrize("extractor", [EXTRACTOR, ExtractorConfig(compress_gap=2, keep_rate=0.6)],
                         ids=["block1=1layer", "block1=2layers"])  # fmt: skip
@pytest.mark.parametrize("chunk_tokens", [None, 16])
def test_follow_up_reusing_block_one_equals_a_fresh_prefill(setup, extractor: ExtractorConfig,
                                                            chunk_tokens: int | None) -> None:  # fmt: skip
    model, _, embeds, positions, kinds = setup
    embeds2, positions2, kinds2 = _follow_up(setup)
    n2 = embeds2.shape[1]
    with torch.no_grad():
        fresh_cache, fresh_calls = KVCache.empty(CONFIG), []
        fresh = prefill(model, embeds2, positions2, PrefillPlan(fresh_cache, extractor=extractor), kinds=kinds2,
                        on_progress=lambda done, total: fresh_calls.append((done, total)))  # fmt: skip
        fresh_logits = _decode(setup, fresh_cache, fresh, n2)

        cache = KVCache.empty(CONFIG)
        first = prefill(model, embeds, positions, PrefillPlan(cache, extractor=extractor, keep_first_block=True),
                        kinds=kinds)
        assert first.first_block is not None and first.first_block.boundary.shape[1] == N_TOKENS
        cache.keep_first_block(first.first_block.n_layers, N_SHARED)
        calls: list[tuple[int, int]] = []
        resumed = prefill(model, embeds2, positions2, PrefillPlan(cache, N_SHARED, first.first_block, extractor, chunk_tokens),
                          kinds=kinds2, on_progress=lambda done, total: calls.append((done, total)))  # fmt: skip
        resumed_logits = _decode(setup, cache, resumed, n2)
    assert torch.equal(resumed.kept_index, fresh.kept_index) and resumed.drops == fresh.drops
    assert (resumed.last_hidden - fresh.last_hidden).abs().max().item() <= CHUNKED_ATOL
    assert (resumed_logits - fresh_logits).abs().max().item() <= CHUNKED_ATOL
    assert [cache.layer_length(i) for i in range(CONFIG.num_layers)] == [
        fresh_cache.layer_length(i) for i in range(CONFIG.num_layers)]  # fmt: skip
    # only the new question went through block 1: the work counted says so, and it ends at its total
    n_first = first.first_block.n_layers
    assert calls[-1][0] == calls[-1][1] == fresh_calls[-1][1] - N_SHARED * n_first
    assert resumed.first_block is not None and resumed.first_block.boundary.shape[1] == n2  # reusable again


def test_resume_refuses_a_first_block_of_other_blocks(setup) -> None:
    model, _, embeds, positions, kinds = setup
    embeds2, positions2, kinds2 = _follow_up(setup)
    cache = KVCache.empty(CONFIG)
    with torch.no_grad():
        first = prefill(model, embeds, positions, PrefillPlan(cache, extractor=EXTRACTOR, keep_first_block=True),
                        kinds=kinds)
        cache.keep_first_block(first.first_block.n_layers, N_SHARED)
        with pytest.raises(ValueError, match="first block"):
            prefill(model, embeds2, positions2, PrefillPlan(cache, N_SHARED, first.first_block,
                    ExtractorConfig(compress_gap=2, keep_rate=0.6)), kinds=kinds2)  # fmt: skip
