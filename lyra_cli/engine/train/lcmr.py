"""The latent cross-modality regularizer (LCMR, docs/authors-behaviour.md#latent-cross-modality-regularizer):
soft-DTW of speech against transcript.

In training stage 2 the authors add `weight · loss_align` to the LM loss. For each sample with a transcript,
the speech tokens after the projector, S (N, H), are aligned with the LLM input embeddings of the transcript
tokens, T (M, H):

    D = -log_softmax(S @ Tᵀ / temperature, dim=-1)   # (N, M): per speech token, a distribution over text tokens
    loss_i = soft_dtw(D) / N                          # R[N, M] of the recursion below, per speech token
    loss_align = mean of loss_i over the samples that have a transcript

Soft-DTW (Cuturi & Blondel 2017), without bandwidth or normalisation term:
R[0, 0] = 0, the other border cells +inf, R[i, j] = D[i-1, j-1] + softmin_γ(R[i-1, j-1], R[i-1, j], R[i, j-1]),
softmin_γ(a, b, c) = -γ·log(e^(-a/γ) + e^(-b/γ) + e^(-c/γ)), and the value is R[N, M].

Cell (i, j) needs only cells of the two previous anti-diagonals (i + j = k - 1 and k - 2), so all cells of one
anti-diagonal are computed at once for the whole batch: N + M - 1 vectorised steps instead of N·M scalar ones,
on CPU and GPU alike. The backward pass is the matching recursion for E[i, j] = ∂R[N, M]/∂R[i, j], run from
the far corner back (Cuturi & Blondel, Algorithm 2), also one anti-diagonal at a time; since
R[i, j] = D[i-1, j-1] + ..., E is also the gradient with respect to D. Memory is O(B·N·M) (D, R and E) rather
than an autograd graph per cell.

Precision: the recursion always runs in float64, whatever the dtype of D; the value comes back in D's dtype
(float32 for half-precision D) and autograd casts the gradient back. R grows along the path to thousands
(300 × 1000 at D ≈ log M ≈ 7 is ~7000), while the gradient is made of softmin weights
exp((R[s] - D[s] - R[i, j]) / γ) that depend on differences between neighbouring cells at the scale of
γ = 0.1. float32 rounds R to ~1e-3 there, which puts the gradient off by ~5 % (measured, and storing each
anti-diagonal relative to its minimum only brings that to ~1 %: the cells along a diagonal themselves differ
by thousands). The authors' numba/CUDA kernel does run in float32 and carries that error. In float64 the
gradient is exact to ~1e-11, and on CPU it costs no more time: each step is a few small vector operations,
bound by per-operation overhead, not arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

# The authors' stage-2 settings (`--weight_lambda 0.5 --align_temperature 0.06 --align_norm False`) and the
# gamma their `SoftDTW(gamma=0.1)` is built with.
LCMR_WEIGHT = 0.5
ALIGN_TEMPERATURE = 0.06
SOFT_DTW_GAMMA = 0.1
ALIGN_NORMALIZE = False

# The recursion's dtype, whatever D's (see "Precision" above), and the dtypes a value may come back in:
# half-precision D gets a float32 value, as the authors' `.float()` does.
RECURSION_DTYPE = torch.float64
RESULT_DTYPES = (torch.float32, torch.float64)

# In the backward pass, a cell's share of each successor: (anti-diagonal step, row step) to the successor
# (i + 1, j) below, (i, j + 1) to the right, and (i + 1, j + 1) diagonally.
SUCCESSOR_STEPS = ((1, 1), (1, 0), (2, 1))


@dataclass(frozen=True)
class LcmrConfig:
    """LCMR settings; the training loss is `lm_loss + weight * lcmr_loss(...)`."""

    weight: float = LCMR_WEIGHT  # λ
    temperature: float = ALIGN_TEMPERATURE  # τ of the contrastive distance
    gamma: float = SOFT_DTW_GAMMA  # γ of soft-DTW's softmin
    normalize: bool = ALIGN_NORMALIZE  # True: cosine similarities instead of dot products

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"LCMR weight must be >= 0, got `{self.weight}`")
        if self.temperature <= 0 or self.gamma <= 0:
            raise ValueError(f"LCMR temperature and gamma must be > 0, got `{self.temperature}`, `{self.gamma}`")


# ---------------------------------------------------------------------------------------------- distance


def contrastive_distance(
    speech: Tensor, text: Tensor, temperature: float = ALIGN_TEMPERATURE, normalize: bool = ALIGN_NORMALIZE
) -> Tensor:
    """D (N, M) = -log_softmax(speech (N, H) @ text (M, H)ᵀ / temperature) over the text tokens.

    Each row is the negative log-probability, for one speech token, of each transcript token: small where
    the speech token points at that text embedding more than at the others.
    """
    if normalize:
        speech, text = F.normalize(speech, dim=-1), F.normalize(text, dim=-1)
    logits = speech @ text.transpose(-1, -2) / temperature  # (N, M)
    return -torch.log_softmax(logits, dim=-1)


# ---------------------------------------------------------------------------------------------- soft-DTW


def soft_dtw(
    distance: Tensor,
    gamma: float = SOFT_DTW_GAMMA,
    *,
    row_lengths: Tensor | Sequence[int] | None = None,
    col_lengths: Tensor | Sequence[int] | None = None,
) -> Tensor:
    """Soft-DTW value R[n, m] of each distance matrix: (B, N, M) -> (B,), or (N, M) -> ().

    Samples of different sizes are padded to (N, M) and given their `row_lengths` (n ≤ N) and `col_lengths`
    (m ≤ M), each (B,); a missing one means the full size. Cells outside a sample's n × m are ignored
    (whatever they hold, inf or nan included) and get a zero gradient.
    """
    if gamma <= 0:
        raise ValueError(f"soft-DTW gamma must be > 0, got `{gamma}`")
    single = distance.dim() == 2
    batch = distance.unsqueeze(0) if single else distance  # (B, N, M)
    if batch.dim() != 3 or batch.shape[1] == 0 or batch.shape[2] == 0:
        shape = tuple(distance.shape)
        raise ValueError(f"soft-DTW needs a non-empty (N, M) or (B, N, M) distance, got shape {shape}")
    result_dtype = batch.dtype if batch.dtype in RESULT_DTYPES else torch.float32
    rows = _lengths(row_lengths, batch, dim=1)
    cols = _lengths(col_lengths, batch, dim=2)
    value = _SoftDTW.apply(batch.to(RECURSION_DTYPE), rows, cols, float(gamma)).to(result_dtype)  # (B,)
    return value[0] if single else value


def _lengths(lengths: Tensor | Sequence[int] | None, batch: Tensor, dim: int) -> Tensor:
    """Per-sample lengths along `dim` of batch (B, N, M) as a (B,) int64 tensor on its device, checked."""
    size = batch.shape[dim]
    if lengths is None:
        return torch.full((batch.shape[0],), size, dtype=torch.long, device=batch.device)
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=batch.device)
    if lengths.shape != (batch.shape[0],) or lengths.min() < 1 or lengths.max() > size:
        raise ValueError(f"soft-DTW lengths must be {batch.shape[0]} values in 1..{size}, got {lengths.tolist()}")
    return lengths


def _antidiagonal(x: Tensor, k: int, lo: int, hi: int) -> Tensor:
    """View (B, hi - lo + 1) of the cells x[:, i, k - i] for i = lo..hi of a contiguous x (B, rows, cols).

    Stepping one row down and one column left moves `stride(1) - stride(2)` elements, so an anti-diagonal is
    a plain strided view: reads cost no gather and `copy_`/`add_` write straight into x.
    """
    step = x.stride(1) - x.stride(2)
    start = x.storage_offset() + lo * x.stride(1) + (k - lo) * x.stride(2)
    return x.as_strided((x.shape[0], hi - lo + 1), (x.stride(0), step), start)


def _diagonal_span(k: int, n_rows: int, n_cols: int) -> tuple[int, int]:
    """Rows lo..hi of the cells (i, k - i) with 1 ≤ i ≤ n_rows and 1 ≤ k - i ≤ n_cols."""
    return max(1, k - n_cols), min(n_rows, k - 1)


def _softmin(a: Tensor, b: Tensor, c: Tensor, gamma: float) -> Tensor:
    """softmin_γ(a, b, c) of three (B, L) tensors, shifted by the smallest so no exp overflows; +inf drops out.

    Elementwise on the three views rather than `logsumexp` over a stacked copy: as fast, one copy fewer.
    """
    low = torch.minimum(torch.minimum(a, b), c)  # finite: every cell inside the grid has a finite neighbour
    total = torch.exp((low - a) / gamma) + torch.exp((low - b) / gamma) + torch.exp((low - c) / gamma)
    return low - gamma * torch.log(total)


def _pad_distance(distance: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """(B, N, M) -> (B, N + 2, M + 2): D[i-1, j-1] at cell (i, j), zero on the borders and outside each sample.

    Zeroing the cells outside a sample keeps its padding (often inf) out of the arithmetic: they cannot
    change R at (n, m) anyway, and finite values there keep the backward pass free of inf - inf.
    """
    n_batch, n_rows, n_cols = distance.shape
    row_ids = torch.arange(n_rows, device=distance.device)
    col_ids = torch.arange(n_cols, device=distance.device)
    inside = (row_ids[None, :, None] < rows[:, None, None]) & (col_ids[None, None, :] < cols[:, None, None])
    padded = distance.new_zeros(n_batch, n_rows + 2, n_cols + 2)
    padded[:, 1:-1, 1:-1] = torch.where(inside, distance, 0)
    return padded


def _forward_recursion(padded: Tensor, gamma: float) -> Tensor:
    """R (B, N + 2, M + 2) from padded D, one anti-diagonal per step; row N + 1 and column M + 1 stay +inf."""
    n_rows, n_cols = padded.shape[1] - 2, padded.shape[2] - 2
    r = torch.full_like(padded, math.inf)
    r[:, 0, 0] = 0
    for k in range(2, n_rows + n_cols + 1):
        lo, hi = _diagonal_span(k, n_rows, n_cols)
        softmin = _softmin(
            _antidiagonal(r, k - 2, lo - 1, hi - 1),  # R[i-1, j-1]
            _antidiagonal(r, k - 1, lo - 1, hi - 1),  # R[i-1, j]
            _antidiagonal(r, k - 1, lo, hi),  # R[i, j-1]
            gamma,
        )  # (B, L)
        _antidiagonal(r, k, lo, hi).copy_(_antidiagonal(padded, k, lo, hi) + softmin)
    return r


def _backward_recursion(padded: Tensor, r: Tensor, rows: Tensor, cols: Tensor, gamma: float) -> Tensor:
    """E (B, N + 2, M + 2) = ∂R[n, m]/∂R[i, j], from each sample's corner (n, m) back to (1, 1).

    A cell passes on to each successor s the softmin weight it had there, exp((R[s] - D[s] - R[i, j]) / γ).
    That weight is a probability, at most 1: clamping the exponent at 0 only removes rounding (which could
    overflow for tiny γ) and turns the +inf borders into weight 1 times E = 0. Cells outside a sample never
    feed its corner, so their E stays exactly 0 without any mask.
    """
    n_batch, n_rows, n_cols = padded.shape[0], padded.shape[1] - 2, padded.shape[2] - 2
    softmin_part = r - padded  # (B, N + 2, M + 2): R[s] - D[s], the softmin that s took; +inf on borders
    e = torch.zeros_like(r)
    e[torch.arange(n_batch, device=r.device), rows, cols] = 1
    for k in range(n_rows + n_cols, 1, -1):
        lo, hi = _diagonal_span(k, n_rows, n_cols)
        here = _antidiagonal(r, k, lo, hi)  # (B, L)
        shares = []
        for dk, di in SUCCESSOR_STEPS:
            taken = _antidiagonal(softmin_part, k + dk, lo + di, hi + di)  # (B, L)
            weight = torch.exp(((taken - here) / gamma).clamp(max=0))
            shares.append(_antidiagonal(e, k + dk, lo + di, hi + di) * weight)
        _antidiagonal(e, k, lo, hi).add_(shares[0] + shares[1] + shares[2])  # add_: keeps the corner's seed
    return e


class _SoftDTW(torch.autograd.Function):
    """Soft-DTW value with the Cuturi-Blondel backward pass instead of autograd through every cell."""

    @staticmethod
    def forward(ctx: FunctionCtx, distance: Tensor, rows: Tensor, cols: Tensor, gamma: float) -> Tensor:
        padded = _pad_distance(distance, rows, cols)  # (B, N + 2, M + 2)
        r = _forward_recursion(padded, gamma)
        ctx.save_for_backward(padded, r, rows, cols)
        ctx.gamma = gamma
        return r[torch.arange(r.shape[0], device=r.device), rows, cols]  # (B,)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_value: Tensor) -> tuple[Tensor, None, None, None]:
        padded, r, rows, cols = ctx.saved_tensors
        e = _backward_recursion(padded, r, rows, cols, ctx.gamma)
        return e[:, 1:-1, 1:-1] * grad_value[:, None, None], None, None, None  # (B, N, M)


# ---------------------------------------------------------------------------------------------- the loss


def lcmr_loss(
    speech_list: Sequence[Tensor], text_list: Sequence[Tensor | None], cfg: LcmrConfig = LcmrConfig()
) -> Tensor:
    """loss_align (scalar): the mean, over samples with a transcript, of soft_dtw(D_i) / N_i.

    speech_list[i] is (N_i, H), the projected speech tokens; text_list[i] is (M_i, H), the input embeddings
    of the transcript tokens, or None (or zero tokens) for a sample without one, which is skipped. Not yet
    multiplied by `cfg.weight`. With no transcript at all the result is 0 but still depends on the speech
    features, so every rank of a distributed run backpropagates through the same parameters.
    """
    if len(speech_list) != len(text_list):
        counts = f"{len(speech_list)} speech, {len(text_list)} text"
        raise ValueError(f"LCMR needs one transcript entry (or None) per sample, got {counts}")
    pairs = [(s, t) for s, t in zip(speech_list, text_list, strict=True) if t is not None and t.shape[0] > 0]
    for speech, text in pairs:
        _check_pair(speech, text)
    if not pairs:
        return _zero_with_graph(speech_list)
    dtype = _compute_dtype(pairs)
    distances = [contrastive_distance(s.to(dtype), t.to(dtype), cfg.temperature, cfg.normalize) for s, t in pairs]
    rows = [d.shape[0] for d in distances]
    cols = [d.shape[1] for d in distances]
    padded = torch.stack([F.pad(d, (0, max(cols) - d.shape[1], 0, max(rows) - d.shape[0])) for d in distances])
    values = soft_dtw(padded, cfg.gamma, row_lengths=rows, col_lengths=cols)  # (B,)
    return (values / torch.tensor(rows, dtype=dtype, device=values.device)).mean()


def _check_pair(speech: Tensor, text: Tensor) -> None:
    if speech.dim() != 2 or text.dim() != 2 or speech.shape[0] == 0 or speech.shape[1] != text.shape[1]:
        raise ValueError(
            f"LCMR needs speech (N, H) and text (M, H) with N >= 1 and the same H, "
            f"got {tuple(speech.shape)} and {tuple(text.shape)}"
        )


def _compute_dtype(pairs: list[tuple[Tensor, Tensor]]) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 features are promoted, as the authors do)."""
    dtype = torch.float32
    for speech, text in pairs:
        dtype = torch.promote_types(dtype, torch.promote_types(speech.dtype, text.dtype))
    return dtype


def _zero_with_graph(speech_list: Sequence[Tensor]) -> Tensor:
    if not speech_list:
        return torch.zeros(())
    return torch.stack([s.sum().float() for s in speech_list]).sum() * 0.0
