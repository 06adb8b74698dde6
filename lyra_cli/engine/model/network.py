"""The Lyra network: the Qwen2-VL language model (text decoder) with our own decoder loop and KV cache, and
the module tree around it, named so that its state dict matches the release checkpoint keys.

    lm_head                                   Linear(H, vocab)
    model.embed_tokens / layers.{i} / norm    our Qwen2-VL text decoder (this module, top half)
    model.vision_tower.vision_tower.*         transformers' Qwen2-VL ViT with its patch merger (output width H)
    model.speech_tower.speech_tower.*         transformers' Whisper encoder
    model.mm_speech_projector.linear{1,2}.*   concat-k MLP speech projector

The decoder reads top to bottom: RMSNorm -> MRoPE (3-D rotary positions) -> Attention (GQA, SDPA) -> MLP ->
DecoderLayer -> LyraTextModel; the cache each layer appends to is `engine.model.kvcache.KVCache`. Module names
match the checkpoint keys (docs/release-format.md#weight-shards-and-key-names) and transformers'
`Qwen2VLTextModel`, so a state dict loads into either with `strict=True`. Then `LyraForCausalLM` puts the
towers and the speech projector around it.

We own this loop (DESIGN.md decision 2) because the latent multi-modality extractor needs per-layer control
of the token set and of the KV cache: each layer's cache may hold a different number of tokens.
`engine.run.prefill` drives the layers block by block through `LyraTextModel.forward_layer` and shrinks the
token set between blocks; decoding is the plain `forward`, each layer attending over its own cache. The
towers are transformers modules: they are frozen in every training stage and equal their public weights, so
there is nothing to gain from owning them (DESIGN.md decision 2).

Shapes: B batch, T new tokens, L tokens in a layer's cache (past + new), H hidden, nh query heads,
nkv key/value heads, hs head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lyra_cli.engine.model.config import LyraConfig, SpeechConfig, TextModelConfig
from lyra_cli.engine.model.kvcache import KVCache

# Qwen2's initializer_range: used only for random (tiny / test) models.
INIT_STD = 0.02
N_ROPE_AXES = 3  # M-RoPE position rows: temporal, height, width

Rope = tuple[Tensor, Tensor]  # (cos, sin), each (B, T, hs)


class RMSNorm(nn.Module):
    """Qwen2's RMSNorm: normalise in fp32 for stability, cast back, then scale."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# ---------------------------------------------------------------------------------------------- rotary


def rope_inv_freq(config: TextModelConfig) -> Tensor:
    """Inverse frequencies of standard RoPE, always fp32: (hs/2,)."""
    exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim
    return 1.0 / (config.rope_theta**exponents)


class MRoPE(nn.Module):
    """Qwen2-VL's multimodal rotary embedding.

    The hs/2 frequencies are split into three sections (`mrope_section`, e.g. 16/24/24): the first section
    rotates by the temporal position, the second by the height position, the third by the width position.
    For text all three rows are equal, which reduces to ordinary 1-D RoPE.
    """

    def __init__(self, config: TextModelConfig) -> None:
        super().__init__()
        self.config = config
        # Which position row (0=t, 1=h, 2=w) drives each frequency: (hs/2,)
        axis = torch.repeat_interleave(torch.arange(N_ROPE_AXES), torch.tensor(config.mrope_section))
        self.register_buffer("axis_of_freq", axis, persistent=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # A model-wide `.to(bfloat16)` would round the frequencies; rebuild them in fp32 on the new device.
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        return self

    @torch.no_grad()
    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> Rope:
        """position_ids (3, B, T) -> (cos, sin), each (B, T, hs) in `dtype`."""
        positions = position_ids.permute(1, 2, 0)[..., self.axis_of_freq]  # (B, T, hs/2)
        freqs = positions.float() * self.inv_freq  # (B, T, hs/2), fp32 like transformers
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hs): both halves of rotate_half share frequencies
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """x (B, h, T, hs) rotated by its positions; cos/sin (B, T, hs) broadcast over heads."""
    cos, sin = (r.unsqueeze(1) for r in rope)  # (B, 1, T, hs)
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------------------------------------- attention


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> Tensor:
    """Bool mask (T, L) for a query block that comes after `kv_len - q_len` cached keys.

    Query i sits at absolute index kv_len - q_len + i and sees every key up to itself. (SDPA's `is_causal`
    aligns the triangle top-left, which is only right when q_len == kv_len.)
    """
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=kv_len - q_len)


def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal GQA attention of new queries over all keys of the layer.

    q (B, nh, T, hs); k, v (B, nkv, L, hs) with the T new keys last -> (B, nh, T, hs).
    """
    B, nh, T, hs = q.shape
    nkv, L = k.shape[1], k.shape[2]
    if T == 1:
        # Decode: one query sees every key, so no mask. Fold each kv head's query group into the query
        # axis, (B, nkv, nh/nkv, hs): one plain SDPA call, no copies of k/v (faster than enable_gqa).
        y = F.scaled_dot_product_attention(q.reshape(B, nkv, nh // nkv, hs), k, v)
        return y.reshape(B, nh, 1, hs)
    if T == L:  # prefill into an empty cache (or no cache): SDPA's own causal path, no mask to build
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nh != nkv)
    mask = causal_mask(T, L, q.device)  # chunked prefill
    if nh != nkv and q.device.type != "cpu":
        # On CUDA, enable_gqa with a mask falls back to the math kernel; expanded k/v keep the fast kernels.
        k, v = (t.repeat_interleave(nh // nkv, dim=1) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=nh != nkv)


class Attention(nn.Module):
    def __init__(self, config: TextModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        hidden, kv_width = config.hidden_size, config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(hidden, config.num_heads * config.head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, kv_width, bias=True)
        self.v_proj = nn.Linear(hidden, kv_width, bias=True)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, hidden, bias=False)

    def project(self, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, H) -> q (B, nh, T, hs), k and v (B, nkv, T, hs); q and k rotated (post-RoPE)."""
        return self.queries(x, rope), self.keys(x, rope), self.values(x)

    def queries(self, x: Tensor, rope: Rope) -> Tensor:
        """x (B, T, H) -> post-RoPE queries (B, nh, T, hs)."""
        B, T, _ = x.shape
        return apply_rope(self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2), rope)

    def keys(self, x: Tensor, rope: Rope) -> Tensor:
        """x (B, T, H) -> post-RoPE keys (B, nkv, T, hs), without computing queries or values."""
        B, T, _ = x.shape
        return apply_rope(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2), rope)

    def values(self, x: Tensor) -> Tensor:
        """x (B, T, H) -> values (B, nkv, T, hs)."""
        B, T, _ = x.shape
        return self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, rope: Rope, cache: KVCache | None = None, n_out: int | None = None) -> Tensor:
        """x (B, T, H) -> (B, T, H); appends this layer's new keys/values to `cache`.

        n_out: return only the last n_out rows (B, n_out, H). Every row's keys and values are still cached,
        but only the rows whose output someone reads pay for queries, attention and the output projection.
        """
        B, T, _ = x.shape
        k, v = self.keys(x, rope), self.values(x)
        if cache is not None:
            k, v = cache.append(self.layer_idx, k, v)  # (B, nkv, L, hs)
        first = 0 if n_out is None else T - n_out
        if first == T:
            return x[:, :0]
        q = self.queries(x[:, first:], _rope_rows(rope, first))  # (B, nh, T - first, hs)
        y = attend(q, k, v)  # the last rows' causal view: each sees the keys up to itself
        return self.o_proj(y.transpose(1, 2).reshape(B, T - first, self.num_heads * self.head_dim))


def _rope_rows(rope: Rope, first: int) -> Rope:
    """The rotary tables of rows first.. (B, T - first, hs)."""
    return rope if first == 0 else (rope[0][:, first:], rope[1][:, first:])


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: TextModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: TextModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, rope: Rope, cache: KVCache | None = None, n_out: int | None = None) -> Tensor:
        """x (B, T, H) -> (B, T, H), or only its last n_out rows (every row still cached): the last layer of a
        prefill computes just the row that predicts the next token."""
        attended = self.self_attn(self.input_layernorm(x), rope, cache, n_out)
        x = x[:, x.shape[1] - attended.shape[1] :] + attended
        return x + self.mlp(self.post_attention_layernorm(x))


# -------------------------------------------------------------------------------------------- decoder


class LyraTextModel(nn.Module):
    """The Qwen2-VL language model: embeddings, decoder layers, final norm (no lm_head).

    State dict keys equal transformers' `Qwen2VLTextModel` (the rotary tables are non-persistent). The
    checkpoint nests it as `model.*`; a subclass adds the vision/speech towers there, and the top-level
    model adds `lm_head`.
    """

    def __init__(self, config: TextModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = MRoPE(config)
        # Training: recompute each layer's activations in backward instead of keeping them (memory for
        # time). Only applies to cache-less forwards of layers in training mode with gradients on.
        self.gradient_checkpointing = False

    def forward(
        self, inputs_embeds: Tensor, position_ids: Tensor, cache: KVCache | None = None, n_out: int | None = None
    ) -> Tensor:
        """inputs_embeds (B, T, H), position_ids (3, B, T) -> final-normed hidden states (B, T, H).

        With a cache, the T tokens come after those already cached (prefill in one go or in chunks, or
        a decode step with T == 1); their positions are the caller's (3-D M-RoPE,
        docs/authors-behaviour.md#m-rope-positions).
        n_out: the last layer computes only the last n_out rows, (B, n_out, H) (a prefill reads one).
        """
        x = inputs_embeds
        rope = self.rotary(position_ids, x.dtype)  # once per forward, shared by all layers
        last = len(self.layers) - 1
        for i in range(len(self.layers)):
            x, rope = self.forward_layer(i, x, rope, cache, n_out if i == last else None)
        return self.final_norm(x, inputs_embeds.device)

    def final_norm(self, x: Tensor, home: torch.device) -> Tensor:
        """The final norm of the last layer's output, computed where the norm lives, returned to `home` (the
        inputs' device): with the layers spread over devices (engine/model/placement.py), callers never see it."""
        return self.norm(x.to(self.norm.weight.device)).to(home)

    def layer_device(self, i: int) -> torch.device:
        return self.layers[i].input_layernorm.weight.device

    def forward_layer(
        self, i: int, x: Tensor, rope: Rope, cache: KVCache | None, n_out: int | None = None
    ) -> tuple[Tensor, Rope]:
        """Run decoder layer i on x (B, T, H); with n_out, only its last n_out rows come out, with their rope.

        The seam for the extractor: `engine.run.prefill` runs the layers block by block through this and
        drops tokens (hidden rows, rope rows, deeper layers' caches) between blocks. x and rope move to the
        layer's device first, so the outputs are on it.
        """
        layer, device = self.layers[i], self.layer_device(i)
        if x.device != device:  # a spread model: the activations follow the layers
            x, rope = x.to(device), (rope[0].to(device), rope[1].to(device))
        if self.gradient_checkpointing and cache is None and layer.training and torch.is_grad_enabled():
            x = checkpoint(layer, x, rope, None, n_out, use_reentrant=False)
        else:
            x = layer(x, rope, cache, n_out)
        return x, _rope_rows(rope, rope[0].shape[1] - x.shape[1])

    def init_weights(self, std: float = INIT_STD) -> None:
        """Qwen2's random initialisation (normal weights, zero biases, unit norms), for tiny models."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)


# ------------------------------------------------------------------------------------ the module tree


class SpeechProjector(nn.Module):
    """Concatenate `ds_rate` consecutive encoder frames, then Linear → ReLU → Linear into the LLM width."""

    def __init__(self, speech: SpeechConfig, llm_hidden: int) -> None:
        super().__init__()
        self.ds_rate = speech.ds_rate
        self.linear1 = nn.Linear(speech.ds_rate * speech.encoder_hidden_size, speech.projector_hidden)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(speech.projector_hidden, llm_hidden)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, F, E) → tokens (B, F // ds_rate, H); trailing frames that do not fill a group are dropped."""
        batch, n_frames, width = frames.shape
        n_tokens = n_frames // self.ds_rate
        grouped = frames[:, : n_tokens * self.ds_rate].reshape(batch, n_tokens, self.ds_rate * width)
        return self.linear2(self.relu(self.linear1(grouped)))


class VisionTower(nn.Module):
    """Holds the ViT under the attribute name the checkpoint uses (`vision_tower.vision_tower.*`)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vision_tower = vit


class SpeechTower(nn.Module):
    """Holds the Whisper encoder under the attribute name the checkpoint uses (`speech_tower.speech_tower.*`)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.speech_tower = encoder


class LyraBackbone(LyraTextModel):
    """The text decoder plus the multimodal members that live under `model.` in the checkpoint."""

    def __init__(self, config: LyraConfig, vit: nn.Module | None, whisper: nn.Module | None) -> None:
        super().__init__(config.text)
        self.vision_tower = VisionTower(vit) if vit is not None else None
        self.speech_tower = SpeechTower(whisper) if whisper is not None else None
        self.mm_speech_projector = (
            SpeechProjector(config.speech, config.text.hidden_size) if config.speech is not None else None
        )


class LyraForCausalLM(nn.Module):
    def __init__(self, config: LyraConfig, vit: nn.Module | None, whisper: nn.Module | None) -> None:
        super().__init__()
        self.config = config
        self.model = LyraBackbone(config, vit, whisper)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    def tie_weights(self) -> None:
        if self.config.text.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, H) after the final norm → logits (B, T, vocab) in fp32 for stable sampling, on the
        hidden states' device (lm_head may sit on another one in a spread model)."""
        return self.lm_head(hidden.to(self.lm_head.weight.device)).float().to(hidden.device)
