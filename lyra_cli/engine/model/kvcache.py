"""The decoder's KV cache: per-layer keys and values, each layer with its own length.

Its own module because the latent multi-modality extractor gives it operations a plain decoder cache
does not need: `select` (keep some tokens of one layer), `reserve_fewer` (deeper layers hold the
survivors only) and `keep_first_block` (reuse block 1 of a previous prompt, `engine.run.prefill`).

Shapes: B batch, nkv key/value heads, L tokens in a layer's cache, hs head size.
"""

from __future__ import annotations

from torch import Tensor

from lyra_cli.engine.model.config import TextModelConfig

# KV cache storage grows in whole blocks of tokens, by this factor, so appends are amortised O(1).
CACHE_BLOCK_TOKENS = 256
CACHE_GROWTH_FACTOR = 1.5


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


class KVCache:
    """Keys and values of every layer, each layer with its own length.

    Storage per layer is a preallocated (B, nkv, capacity, hs) buffer that grows by
    `CACHE_GROWTH_FACTOR` in whole `CACHE_BLOCK_TOKENS` blocks, so appending a token costs no copy of the
    whole cache. A layer's buffer is allocated on its first append, on the device and in the dtype of the
    keys it receives (so layers placed on different devices keep their cache there). Layers may hold
    different numbers of tokens after `select` or when the extractor's prefill fills deeper layers with
    fewer tokens; `seq_length` counts every token the model has processed, independent of any dropping.
    """

    def __init__(self, num_layers: int, capacity: int = 0) -> None:
        self.num_layers = num_layers
        self.capacity_hint = capacity  # tokens to reserve on first allocation (prompt + new tokens)
        self._layer_capacity = [capacity] * num_layers  # the same, per layer: `reserve_fewer` lowers it
        self._keys: list[Tensor | None] = [None] * num_layers  # (B, nkv, capacity, hs)
        self._values: list[Tensor | None] = [None] * num_layers
        self._lengths = [0] * num_layers
        self._seen = 0

    @classmethod
    def empty(cls, config: TextModelConfig, capacity: int = 0) -> KVCache:
        """An empty cache for `config`; pass `capacity` = prompt + new tokens to avoid any regrowth."""
        return cls(config.num_layers, capacity)

    @property
    def seq_length(self) -> int:
        """Tokens processed so far (the uncompressed count, as layer 0 sees it)."""
        return self._seen

    def layer_length(self, layer: int) -> int:
        return self._lengths[layer]

    def get(self, layer: int) -> tuple[Tensor, Tensor]:
        """Valid keys and values of `layer`: views (B, nkv, L, hs)."""
        keys, values, n = self._keys[layer], self._values[layer], self._lengths[layer]
        if keys is None or values is None:
            raise ValueError(f"layer {layer} of the KV cache is empty")
        return keys[:, :, :n], values[:, :, :n]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add new k, v (B, nkv, T, hs) after the layer's tokens; returns all of them, (B, nkv, L, hs)."""
        start, T = self._lengths[layer], k.shape[2]
        self._reserve(layer, k, start + T)
        keys, values = self._keys[layer], self._values[layer]
        assert keys is not None and values is not None
        keys[:, :, start : start + T] = k
        values[:, :, start : start + T] = v
        self._lengths[layer] = start + T
        if layer == 0:
            self._seen += T
        return keys[:, :, : start + T], values[:, :, : start + T]

    def select(self, layer: int, index: Tensor) -> None:
        """Keep only the cached tokens at `index` of `layer`, in that order.

        `index` is (L',) for the same tokens in every batch row, or (B, L') per row.
        """
        keys, values = self.get(layer)
        kept_keys, kept_values = _take_tokens(keys, index), _take_tokens(values, index)  # (B, nkv, L', hs) copies
        n = kept_keys.shape[2]
        keys[:, :, :n] = kept_keys  # views of the storage: compact the kept tokens to the front
        values[:, :, :n] = kept_values
        self._lengths[layer] = n

    def truncate(self, n_tokens: int) -> None:
        """Forget everything after the first `n_tokens` of every layer (O(1): storage is reused): the cache of
        a previous prompt then serves as the prefill of a new prompt that shares its first tokens."""
        self.keep_first_block(self.num_layers, n_tokens)

    def keep_first_block(self, n_layers: int, n_tokens: int) -> None:
        """Keep the first `n_tokens` of the first `n_layers` layers and empty the deeper ones.

        For an extractor prefill (`prefill(resume=...)`) of a new prompt sharing `n_tokens` with the one
        this cache holds: the layers before the first drop hold every token and depend only on earlier
        tokens, so they stay valid; the deeper layers held that prompt's survivors and are rebuilt. A kept
        layer must hold all `n_tokens` (not so after a drop, or a prefill cut short)."""
        if any(length < n_tokens for length in self._lengths[:n_layers]):
            raise ValueError(f"cannot keep {n_tokens} tokens: a layer holds fewer (after a drop or a cut-short prefill)")
        for layer in range(self.num_layers):
            self._lengths[layer] = n_tokens if layer < n_layers else 0
        self._seen = min(self._seen, n_tokens)

    def reserve_fewer(self, layer: int, n_tokens: int) -> None:
        """Reserve `n_tokens` fewer for `layer` when it is first allocated.

        The extractor's prefill drops tokens before it fills the deeper layers; without this each of
        them would still reserve the full prompt, and LMME would save no cache memory.
        """
        self._layer_capacity[layer] = max(0, self._layer_capacity[layer] - n_tokens)

    def _reserve(self, layer: int, like: Tensor, needed: int) -> None:
        keys = self._keys[layer]
        capacity = 0 if keys is None else keys.shape[2]
        if needed <= capacity:
            return
        grown_to = max(needed, int(capacity * CACHE_GROWTH_FACTOR), self._layer_capacity[layer])
        new_capacity = _round_up(grown_to, CACHE_BLOCK_TOKENS)
        B, nkv, _, hs = like.shape
        for store in (self._keys, self._values):
            grown = like.new_empty(B, nkv, new_capacity, hs)
            old = store[layer]
            if old is not None:
                grown[:, :, : self._lengths[layer]] = old[:, :, : self._lengths[layer]]
            store[layer] = grown


def _take_tokens(t: Tensor, index: Tensor) -> Tensor:
    """Gather tokens (dim 2) of t (B, nkv, L, hs) by index (L',) or (B, L')."""
    index = index.to(t.device)
    if index.dim() == 1:
        return t.index_select(2, index)
    B, nkv, _, hs = t.shape
    return t.gather(2, index[:, None, :, None].expand(B, nkv, index.shape[1], hs))
