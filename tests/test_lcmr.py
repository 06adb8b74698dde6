"""LCMR (engine/train/lcmr.py): the anti-diagonal soft-DTW against a plain double-loop DP, and the loss's contract.

The references below are written independently of the library: the DP visits one cell at a time with its own
softmin (shifted by the smallest finite candidate), and the contrastive distance is logits - logsumexp.
Gradients of the reference come from autograd through that double loop, so only small sizes are used.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

from lyra_cli.engine.train.lcmr import (
    ALIGN_NORMALIZE,
    ALIGN_TEMPERATURE,
    LCMR_WEIGHT,
    SOFT_DTW_GAMMA,
    LcmrConfig,
    contrastive_distance,
    lcmr_loss,
    soft_dtw,
)

TOLERANCE = 1e-5
SHAPES = [(1, 1), (3, 5), (7, 4), (20, 13)]
HIDDEN = 16


# ---------------------------------------------------------------------------------------------- references


def reference_softmin(candidates: list[Tensor], gamma: float) -> Tensor:
    """-γ log Σ exp(-x/γ) over 0-d tensors, some of which may be +inf."""
    finite = [x for x in candidates if torch.isfinite(x)]
    low = torch.stack(finite).min()
    return low - gamma * torch.log(sum(torch.exp(-(x - low) / gamma) for x in finite))


def reference_soft_dtw(distance: Tensor, gamma: float) -> Tensor:
    """R[N, M] of the soft-DTW recursion, one cell at a time (differentiable through autograd)."""
    n_rows, n_cols = distance.shape
    inf = torch.tensor(math.inf, dtype=distance.dtype)
    r = [[inf] * (n_cols + 1) for _ in range(n_rows + 1)]
    r[0][0] = torch.zeros((), dtype=distance.dtype)
    for i in range(1, n_rows + 1):
        for j in range(1, n_cols + 1):
            softmin = reference_softmin([r[i - 1][j - 1], r[i - 1][j], r[i][j - 1]], gamma)
            r[i][j] = distance[i - 1, j - 1] + softmin
    return r[n_rows][n_cols]


def reference_soft_dtw_value(distance: Tensor, gamma: float) -> float:
    """The same recursion in plain Python floats (float64), fast enough for a few hundred rows."""
    d = distance.double().tolist()
    n_rows, n_cols = len(d), len(d[0])
    r = [[math.inf] * (n_cols + 1) for _ in range(n_rows + 1)]
    r[0][0] = 0.0
    for i in range(1, n_rows + 1):
        for j in range(1, n_cols + 1):
            prev = [r[i - 1][j - 1], r[i - 1][j], r[i][j - 1]]
            low = min(prev)
            r[i][j] = d[i - 1][j - 1] + low - gamma * math.log(sum(math.exp(-(x - low) / gamma) for x in prev))
    return r[n_rows][n_cols]


def hard_dtw(distance: Tensor) -> tuple[float, Tensor]:
    """Classic DTW: min-cost path value and its 0/1 indicator matrix (N, M)."""
    d = distance.double().tolist()
    n_rows, n_cols = len(d), len(d[0])
    r = [[math.inf] * (n_cols + 1) for _ in range(n_rows + 1)]
    r[0][0] = 0.0
    for i in range(1, n_rows + 1):
        for j in range(1, n_cols + 1):
            r[i][j] = d[i - 1][j - 1] + min(r[i - 1][j - 1], r[i - 1][j], r[i][j - 1])
    path = torch.zeros(n_rows, n_cols, dtype=torch.float64)
    i, j = n_rows, n_cols
    while (i, j) != (0, 0):
        path[i - 1, j - 1] = 1
        i, j = min([(i - 1, j - 1), (i - 1, j), (i, j - 1)], key=lambda c: r[c[0]][c[1]])
    return r[n_rows][n_cols], path


def reference_loss(speech: list[Tensor], text: list[Tensor | None], cfg: LcmrConfig) -> Tensor:
    losses = []
    for s, t in zip(speech, text, strict=True):
        if t is None:
            continue
        logits = s @ t.T / cfg.temperature
        distance = torch.logsumexp(logits, dim=-1, keepdim=True) - logits
        losses.append(reference_soft_dtw(distance, cfg.gamma) / s.shape[0])
    return torch.stack(losses).mean()


def random_distance(n_rows: int, n_cols: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """A realistic D: the contrastive distance of random features (positive, a few units)."""
    generator = torch.Generator().manual_seed(seed)
    speech = torch.randn(n_rows, HIDDEN, generator=generator, dtype=dtype) * 0.1
    text = torch.randn(n_cols, HIDDEN, generator=generator, dtype=dtype)
    return contrastive_distance(speech, text)


# ---------------------------------------------------------------------------------------------- soft-DTW parity


def test_config_defaults_are_the_official_stage2_settings() -> None:
    cfg = LcmrConfig()
    assert (cfg.weight, cfg.temperature, cfg.gamma, cfg.normalize) == (0.5, 0.06, 0.1, False)
    assert (LCMR_WEIGHT, ALIGN_TEMPERATURE, SOFT_DTW_GAMMA, ALIGN_NORMALIZE) == (0.5, 0.06, 0.1, False)
    with pytest.raises(ValueError, match="gamma"):
        LcmrConfig(gamma=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_value_and_gradient_equal_the_double_loop(shape: tuple[int, int]) -> None:
    distance = random_distance(*shape, seed=sum(shape)).requires_grad_()
    expected = reference_soft_dtw(distance, SOFT_DTW_GAMMA)
    (expected_grad,) = torch.autograd.grad(expected, distance)
    value = soft_dtw(distance, SOFT_DTW_GAMMA)
    (grad,) = torch.autograd.grad(value, distance)
    assert value.shape == ()
    torch.testing.assert_close(value, expected, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_matches_the_float64_reference(shape: tuple[int, int]) -> None:
    distance = random_distance(*shape, seed=7 * sum(shape))
    expected = reference_soft_dtw(distance.requires_grad_(), SOFT_DTW_GAMMA)
    (expected_grad,) = torch.autograd.grad(expected, distance)
    single = distance.detach().float().requires_grad_()
    value = soft_dtw(single, SOFT_DTW_GAMMA)
    value.backward()
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected.item(), rel=TOLERANCE)
    torch.testing.assert_close(single.grad.double(), expected_grad, rtol=0, atol=TOLERANCE)


def test_mixed_length_batch_matches_each_sample_and_ignores_padding() -> None:
    n_max, m_max = max(n for n, _ in SHAPES), max(m for _, m in SHAPES)
    samples = [random_distance(n, m, seed=100 + n) for n, m in SHAPES]
    batch = torch.full((len(SHAPES), n_max, m_max), math.inf, dtype=torch.float64)
    batch[0].fill_(math.nan)  # any padding must be ignored, not just +inf
    for b, d in enumerate(samples):
        batch[b, : d.shape[0], : d.shape[1]] = d
    batch.requires_grad_()
    values = soft_dtw(batch, row_lengths=[n for n, _ in SHAPES], col_lengths=torch.tensor([m for _, m in SHAPES]))
    weights = torch.arange(1.0, len(SHAPES) + 1, dtype=torch.float64)  # distinct upstream gradient per sample
    (grad,) = torch.autograd.grad((values * weights).sum(), batch)
    assert values.shape == (len(SHAPES),)
    for b, d in enumerate(samples):
        d = d.clone().requires_grad_()
        expected = reference_soft_dtw(d, SOFT_DTW_GAMMA)
        (expected_grad,) = torch.autograd.grad(expected * weights[b], d)
        torch.testing.assert_close(values[b], expected, rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(grad[b, : d.shape[0], : d.shape[1]], expected_grad, rtol=0, atol=TOLERANCE)
        outside = torch.ones(n_max, m_max, dtype=torch.bool)
        outside[: d.shape[0], : d.shape[1]] = False
        assert torch.all(grad[b][outside] == 0)


def test_gradcheck_float64_batch() -> None:
    distance = torch.rand(3, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    distance.requires_grad_()

    def value(d: Tensor) -> Tensor:
        return soft_dtw(d, 0.5, row_lengths=[5, 2, 4], col_lengths=[4, 3, 1])

    assert torch.autograd.gradcheck(value, (distance,))


@pytest.mark.parametrize("shape", [(300, 120), (90, 301)])
def test_value_matches_the_reference_at_training_sizes(shape: tuple[int, int]) -> None:
    distance = random_distance(*shape, seed=11)
    expected = reference_soft_dtw_value(distance, SOFT_DTW_GAMMA)
    assert soft_dtw(distance).item() == pytest.approx(expected, rel=1e-12)
    assert soft_dtw(distance.float()).item() == pytest.approx(expected, rel=TOLERANCE)


def test_float32_gradient_is_accurate_at_300_by_1000() -> None:
    """A float32 recursion would be ~5 % off here (R ~ 7000 against γ = 0.1); ours runs in float64."""
    generator = torch.Generator().manual_seed(8)
    speech, text = torch.randn(300, HIDDEN, generator=generator) * 0.1, torch.randn(1000, HIDDEN, generator=generator)
    single = contrastive_distance(speech, text).requires_grad_()  # float32
    double = single.detach().double().requires_grad_()
    (grad_single,) = torch.autograd.grad(soft_dtw(single), single)
    (grad_double,) = torch.autograd.grad(soft_dtw(double), double)
    assert grad_single.dtype == torch.float32
    torch.testing.assert_close(grad_single.double(), grad_double, rtol=0, atol=1e-6)


def test_gradient_is_the_directional_derivative_at_training_sizes() -> None:
    distance = random_distance(300, 200, seed=5).requires_grad_()
    direction = torch.randn(distance.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    (grad,) = torch.autograd.grad(soft_dtw(distance), distance)
    step = 1e-5
    with torch.no_grad():
        slope = (soft_dtw(distance + step * direction) - soft_dtw(distance - step * direction)) / (2 * step)
    assert (grad * direction).sum().item() == pytest.approx(slope.item(), rel=1e-6)


@pytest.mark.parametrize("gamma", [1e-4, 1e-2, 10.0, 1000.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_gamma_stays_finite(gamma: float, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(9)
    speech = (torch.randn(40, HIDDEN, generator=generator) * 10).to(dtype).requires_grad_()  # D up to ~1e4
    text = torch.randn(25, HIDDEN, generator=generator).to(dtype)
    value = soft_dtw(contrastive_distance(speech, text), gamma)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(speech.grad).all()


def test_small_gamma_tends_to_hard_dtw_value_and_path() -> None:
    distance = torch.rand(12, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 10
    hard_value, hard_path = hard_dtw(distance)
    gaps = []
    for gamma in (1.0, 0.1, 0.01, 0.001):
        soft = soft_dtw(distance, gamma).item()
        # softmin_γ lies in [min - γ·log 3, min]: each of the N + M - 1 steps loses at most γ·log 3.
        assert 0 <= hard_value - soft <= gamma * math.log(3) * (sum(distance.shape) - 1)
        gaps.append(hard_value - soft)
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-3
    distance.requires_grad_()
    (grad,) = torch.autograd.grad(soft_dtw(distance, 0.001), distance)
    torch.testing.assert_close(grad, hard_path, rtol=0, atol=1e-3)


def test_errors_name_the_problem() -> None:
    distance = torch.rand(2, 4, 3)
    with pytest.raises(ValueError, match="gamma"):
        soft_dtw(distance, 0.0)
    with pytest.raises(ValueError, match="lengths"):
        soft_dtw(distance, row_lengths=[4, 5])
    with pytest.raises(ValueError, match="non-empty"):
        soft_dtw(torch.rand(0, 3))
    with pytest.raises(ValueError, match="same H"):
        lcmr_loss([torch.rand(4, 8)], [torch.rand(3, 7)])
    with pytest.raises(ValueError, match="per sample"):
        lcmr_loss([torch.rand(4, 8)], [])


# ---------------------------------------------------------------------------------------------- the loss


def make_batch(seed: int) -> tuple[list[Tensor], list[Tensor | None]]:
    generator = torch.Generator().manual_seed(seed)
    sizes = [(9, 4), (5, 6), (12, 3), (1, 2)]
    speech = [(torch.randn(n, HIDDEN, generator=generator, dtype=torch.float64) * 0.1) for n, _ in sizes]
    text = [torch.randn(m, HIDDEN, generator=generator, dtype=torch.float64) for _, m in sizes]
    text[2] = None  # a sample without a transcript
    return [s.requires_grad_() for s in speech], [t if t is None else t.requires_grad_() for t in text]


def test_loss_and_gradients_equal_the_reference_end_to_end() -> None:
    speech, text = make_batch(seed=1)
    cfg = LcmrConfig()
    loss = lcmr_loss(speech, text, cfg)
    inputs = [*speech, *(t for t in text if t is not None)]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    expected = reference_loss(speech, text, cfg)
    expected_grads = torch.autograd.grad(expected, inputs, allow_unused=True)
    assert loss.shape == () and loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=0, atol=TOLERANCE)
    assert grads[2] is None or torch.all(grads[2] == 0)  # the sample without transcript gets no gradient
    for got, want in zip(grads, expected_grads, strict=True):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE)


def test_no_transcript_gives_zero_with_a_graph() -> None:
    speech = [torch.randn(5, HIDDEN, requires_grad=True), torch.randn(3, HIDDEN, requires_grad=True)]
    loss = lcmr_loss(speech, [None, torch.zeros(0, HIDDEN)])
    loss.backward()
    assert loss.item() == 0
    assert all(s.grad is not None and torch.all(s.grad == 0) for s in speech)


def test_half_precision_features_are_promoted_to_float32() -> None:
    speech, text = make_batch(seed=2)
    bf16_speech = [s.detach().bfloat16() for s in speech]
    bf16_text = [t if t is None else t.detach().bfloat16() for t in text]
    loss = lcmr_loss(bf16_speech, bf16_text)
    expected = lcmr_loss([s.double() for s in bf16_speech], [t if t is None else t.double() for t in bf16_text])
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=TOLERANCE)


def test_cosine_distance_ignores_feature_scale() -> None:
    speech, text = torch.randn(6, HIDDEN), torch.randn(4, HIDDEN)
    cosine = contrastive_distance(speech, text, normalize=True)
    torch.testing.assert_close(contrastive_distance(speech * 7, text * 0.2, normalize=True), cosine)
    assert not torch.allclose(contrastive_distance(speech * 7, text), contrastive_distance(speech, text))


def aligned_speech(text: Tensor, n_speech: int) -> Tensor:
    """Speech tokens that are the transcript embeddings, each repeated, in order: (n_speech, H)."""
    owner = torch.arange(n_speech) * text.shape[0] // n_speech
    return text[owner]


@pytest.mark.parametrize("normalize", [False, True])
def test_loss_falls_as_speech_moves_toward_the_transcript(normalize: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    # float64: near alignment the loss reaches ~1e-4, below float32's resolution of -log_softmax near 0
    text = torch.randn(8, HIDDEN, generator=generator, dtype=torch.float64) / math.sqrt(HIDDEN)
    start = torch.randn(30, HIDDEN, generator=generator, dtype=torch.float64) / math.sqrt(HIDDEN)
    target = aligned_speech(text, 30)
    cfg = LcmrConfig(normalize=normalize)
    alphas = torch.linspace(0, 1, 11, dtype=torch.float64)
    losses = [lcmr_loss([torch.lerp(start, target, alpha)], [text], cfg).item() for alpha in alphas]
    assert all(later < earlier for earlier, later in itertools.pairwise(losses))
    assert losses[-1] < 0.1 * losses[0]


def test_gradient_descent_on_speech_reduces_the_loss() -> None:
    generator = torch.Generator().manual_seed(1)
    text = torch.randn(10, HIDDEN, generator=generator) / math.sqrt(HIDDEN)
    speech = (torch.randn(40, HIDDEN, generator=generator) / math.sqrt(HIDDEN)).requires_grad_()
    optimizer = torch.optim.SGD([speech], lr=0.5)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = lcmr_loss([speech], [text])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(later < earlier for earlier, later in itertools.pairwise(losses))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.gpu
def test_gpu_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    distance = torch.stack([random_distance(60, 45, seed=s) for s in range(3)])
    rows, cols = [60, 33, 17], [45, 45, 20]
    values, grads = [], []
    for device in ("cpu", "cuda"):
        d = distance.to(device).requires_grad_()
        value = soft_dtw(d, row_lengths=rows, col_lengths=cols)
        (grad,) = torch.autograd.grad(value.sum(), d)
        values.append(value.cpu())
        grads.append(grad.cpu())
    torch.testing.assert_close(values[1], values[0], rtol=0, atol=1e-9)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-9)
