"""Our decoder (`engine.model.network`) against transformers' Qwen2VLTextModel on the same random weights.

Contracts: identical state-dict keys; identical logits for prefill and cached decode steps under the three
position layouts Lyra produces (text, image grid, speech block; docs/authors-behaviour.md#m-rope-positions); chunked
prefill equals one-shot prefill; `KVCache.select` and growth keep the right rows.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

from lyra_cli.engine.model.config import TextModelConfig
from lyra_cli.engine.model.kvcache import CACHE_BLOCK_TOKENS, KVCache
from lyra_cli.engine.model.network import LyraTextModel

CONFIG = TextModelConfig(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,  # head_dim 16, GQA groups of 2
    rope_theta=1e6,
    mrope_section=(2, 3, 3),
)
LOGITS_ATOL = 1e-4
CHUNKED_ATOL = 1e-5
N_DECODE_STEPS = 4
IMAGE_GRID_THW = (1, 4, 6)  # after the 2x2 spatial merge: 24 visual tokens
N_SPEECH_TOKENS = 30


def hf_config(config: TextModelConfig, attn: str) -> Qwen2VLTextConfig:
    hf = Qwen2VLTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={
            "rope_type": "default",
            "mrope_section": list(config.mrope_section),
            "rope_theta": config.rope_theta,
        },
        bos_token_id=None,
        eos_token_id=None,
    )
    hf._attn_implementation = attn
    return hf


def randomize_(model: nn.Module, seed: int) -> None:
    """Every parameter random (biases and norm weights too, so loading them is actually checked)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def models(request: pytest.FixtureRequest) -> tuple[LyraTextModel, Qwen2VLTextModel, nn.Linear]:
    torch.manual_seed(0)
    theirs = Qwen2VLTextModel(hf_config(CONFIG, request.param)).eval()
    randomize_(theirs, seed=1)
    ours = LyraTextModel(CONFIG).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    lm_head = nn.Linear(CONFIG.hidden_size, CONFIG.vocab_size, bias=False)
    return ours, theirs, lm_head


# ---------------------------------------------------------------------------------- positions
# (docs/authors-behaviour.md#m-rope-positions)


def text_positions(n: int, start: int) -> Tensor:
    return (torch.arange(n) + start).expand(3, n)  # (3, n): t = h = w


def grid_positions(t: int, h: int, w: int, start: int) -> Tensor:
    t_idx = torch.arange(t).repeat_interleave(h * w)
    h_idx = torch.arange(h).repeat_interleave(w).repeat(t)
    w_idx = torch.arange(w).repeat(t * h)
    return torch.stack([t_idx, h_idx, w_idx]) + start  # (3, t*h*w)


def build_positions(pieces: list[tuple[str, object]]) -> Tensor:
    """Positions (3, 1, T) for a sequence of ("text", n) / ("image", (t,h,w)) / ("speech", n) pieces."""
    rows, next_pos = [], 0
    for kind, size in pieces:
        if kind == "text":
            rows.append(text_positions(size, next_pos))  # type: ignore[arg-type]
            next_pos += size  # type: ignore[operator]
            continue
        if kind == "image":
            block = grid_positions(*size, start=next_pos)  # type: ignore[misc]
        else:  # speech: 1-D like text, but the next piece starts at max + 1
            block = text_positions(size, next_pos)  # type: ignore[arg-type]
        rows.append(block)
        next_pos = int(block.max()) + 1
    return torch.cat(rows, dim=1)[:, None, :]


LAYOUTS = {
    "text": [("text", 37)],
    "image": [("text", 5), ("image", IMAGE_GRID_THW), ("text", 7)],
    "speech": [("text", 4), ("speech", N_SPEECH_TOKENS), ("text", 6)],
}


def test_image_layout_positions() -> None:
    pos = build_positions(LAYOUTS["image"])[:, 0]
    assert pos.shape == (3, 5 + 24 + 7)
    assert pos[:, 5].tolist() == [5, 5, 5]  # grid origin at the running max
    assert pos[:, 5 + 23].tolist() == [5, 8, 10]  # last cell: t=0, h=3, w=5
    assert pos[:, 5 + 24].tolist() == [11, 11, 11]  # text resumes at max + 1
    assert int(pos.max()) + 1 - pos.shape[1] == 11 + 7 - 36  # rope_delta is negative for images


# ---------------------------------------------------------------------------------- parity


def decode_positions(prefill_positions: Tensor, step: int) -> Tensor:
    """Qwen2-VL's decode rule: total_len - 1 + rope_delta, i.e. previous max position + 1 per token."""
    return (prefill_positions.max() + 1 + step).view(1, 1, 1).expand(3, 1, 1)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_prefill_and_decode_match_transformers(models, layout: str) -> None:
    ours, theirs, lm_head = models
    positions = build_positions(LAYOUTS[layout])  # (3, 1, T)
    ids = torch.randint(0, CONFIG.vocab_size, (1, positions.shape[-1]), generator=torch.Generator().manual_seed(2))
    cache, hf_cache = KVCache.empty(CONFIG), DynamicCache(config=theirs.config)
    with torch.no_grad():
        embeds = ours.embed_tokens(ids)
        for step in range(N_DECODE_STEPS + 1):
            pos = positions if step == 0 else decode_positions(positions, step - 1)
            ours_logits = lm_head(ours(embeds, pos, cache))
            theirs_out = theirs(inputs_embeds=embeds, position_ids=pos, past_key_values=hf_cache, use_cache=True)
            theirs_logits = lm_head(theirs_out.last_hidden_state)
            assert (ours_logits - theirs_logits).abs().max().item() <= LOGITS_ATOL, f"step {step}"
            next_id = theirs_logits[:, -1:].argmax(-1)  # greedy, fed to both
            embeds = ours.embed_tokens(next_id)
    assert cache.seq_length == hf_cache.get_seq_length() == positions.shape[-1] + N_DECODE_STEPS


def test_state_dict_keys_match_transformers(models) -> None:
    ours, theirs, _ = models
    assert list(ours.state_dict()) == list(theirs.state_dict())


@pytest.mark.parametrize("chunks", [(20, 16), (9, 14, 13)])
def test_chunked_prefill_equals_one_shot(models, chunks: tuple[int, ...]) -> None:
    ours = models[0]
    positions = build_positions(LAYOUTS["image"])  # 36 tokens
    assert sum(chunks) == positions.shape[-1]
    embeds = torch.randn(1, positions.shape[-1], CONFIG.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        one_shot = ours(embeds, positions, KVCache.empty(CONFIG))
        cache, parts, start = KVCache.empty(CONFIG), [], 0
        for n in chunks:
            parts.append(ours(embeds[:, start : start + n], positions[..., start : start + n], cache))
            start += n
    assert (torch.cat(parts, dim=1) - one_shot).abs().max().item() <= CHUNKED_ATOL
    assert all(cache.layer_length(i) == start for i in range(CONFIG.num_layers))


def test_no_cache_equals_cache(models) -> None:
    ours = models[0]
    positions = build_positions(LAYOUTS["speech"])
    embeds = torch.randn(2, positions.shape[-1], CONFIG.hidden_size)
    positions = positions.expand(3, 2, -1)
    with torch.no_grad():
        assert torch.equal(ours(embeds, positions), ours(embeds, positions, KVCache.empty(CONFIG)))


def test_bf16_is_as_close_to_fp32_as_transformers() -> None:
    """In bf16 both implementations round differently; ours must not drift further from fp32 than theirs."""
    theirs = Qwen2VLTextModel(hf_config(CONFIG, "sdpa")).eval()
    randomize_(theirs, seed=4)
    ours = LyraTextModel(CONFIG).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    positions = build_positions(LAYOUTS["image"])
    embeds = torch.randn(1, positions.shape[-1], CONFIG.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = ours(embeds, positions)
        ours_bf16 = ours.to(torch.bfloat16)(embeds.bfloat16(), positions)
        theirs_bf16 = theirs.to(torch.bfloat16)(inputs_embeds=embeds.bfloat16(), position_ids=positions)
    assert ours_bf16.dtype == torch.bfloat16  # compute dtype follows the weights
    ours_error = ((ours_bf16.float() - reference).norm() / reference.norm()).item()
    theirs_error = ((theirs_bf16.last_hidden_state.float() - reference).norm() / reference.norm()).item()
    assert ours_error <= 1.25 * theirs_error + 1e-3, (ours_error, theirs_error)


def test_rope_frequencies_stay_fp32_after_cast() -> None:
    model = LyraTextModel(CONFIG).to(torch.bfloat16)
    assert model.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(model.rotary.inv_freq, LyraTextModel(CONFIG).rotary.inv_freq)


# ---------------------------------------------------------------------------------- KV cache


def token_kv(batch: int, n_tokens: int, offset: int = 0) -> Tensor:
    """(B, nkv, T, hs) whose every entry encodes its token index, so rows can be identified."""
    idx = torch.arange(offset, offset + n_tokens, dtype=torch.float32)
    return idx.view(1, 1, -1, 1).expand(batch, CONFIG.num_kv_heads, n_tokens, CONFIG.head_dim).clone()


def test_select_keeps_given_rows_of_one_layer() -> None:
    cache = KVCache.empty(CONFIG)
    for layer in range(CONFIG.num_layers):
        cache.append(layer, token_kv(1, 10), -token_kv(1, 10))
    cache.select(1, torch.tensor([0, 3, 4, 9]))
    keys, values = cache.get(1)
    assert keys[0, 0, :, 0].tolist() == [0, 3, 4, 9] and values[0, 1, :, 5].tolist() == [0, -3, -4, -9]
    assert [cache.layer_length(i) for i in range(3)] == [10, 4, 10]
    assert cache.seq_length == 10  # the uncompressed count
    keys, _ = cache.append(1, token_kv(1, 1, offset=10), token_kv(1, 1))  # a decode step after dropping
    assert keys[0, 0, :, 0].tolist() == [0, 3, 4, 9, 10]
    assert torch.equal(cache.get(2)[0], token_kv(1, 10))


def test_select_per_batch_row() -> None:
    cache = KVCache.empty(CONFIG)
    cache.append(0, token_kv(2, 6), token_kv(2, 6))
    cache.select(0, torch.tensor([[0, 2, 5], [1, 3, 4]]))
    keys, values = cache.get(0)
    assert keys[0, 1, :, 0].tolist() == [0, 2, 5] and keys[1, 0, :, 3].tolist() == [1, 3, 4]
    assert torch.equal(keys, values)


def test_cache_grows_without_losing_rows() -> None:
    cache = KVCache.empty(CONFIG)
    n_tokens = 3 * CACHE_BLOCK_TOKENS + 5  # forces several regrowths
    cache.append(0, token_kv(1, 7), token_kv(1, 7))
    for t in range(7, n_tokens):
        cache.append(0, token_kv(1, 1, offset=t), token_kv(1, 1, offset=t))
    keys, values = cache.get(0)
    assert torch.equal(keys, token_kv(1, n_tokens)) and torch.equal(values, keys)
    assert cache.seq_length == n_tokens and cache.layer_length(1) == 0


def test_capacity_hint_avoids_regrowth() -> None:
    cache = KVCache.empty(CONFIG, capacity=1000)
    cache.append(0, token_kv(1, 600), token_kv(1, 600))
    storage = cache._keys[0]
    for t in range(600, 1000):
        cache.append(0, token_kv(1, 1, offset=t), token_kv(1, 1, offset=t))
    assert cache._keys[0] is storage
