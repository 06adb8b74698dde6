"""The authors' resampler: band-limited windowed-sinc interpolation, as torchaudio's `Resample` defaults do it.

The authors resample every recording with `torchaudio.transforms.Resample(orig_freq=sr, new_freq=16000)` and
its defaults (Hann-windowed sinc, 6 zero crossings, cut-off at 99% of the lower Nyquist rate). torchaudio is not
a dependency of lyra, so this module implements the same definition in torch, written from its documented
algorithm (not copied):

- Both rates are divided by their gcd: `orig` input samples become `new` output samples, periodically.
- Output sample `m` is `y[m] = sum_k x[k] * h(k/orig - m/new)` with `x` zero outside the recording and
  `h(d) = (base/orig) * sinc(base*d) * cos^2(pi*base*d / (2*ZERO_CROSSINGS))` for `|base*d| <= ZERO_CROSSINGS`,
  0 beyond, where `base = min(orig, new) * ROLLOFF` and sinc(u) = sin(pi*u)/(pi*u).
- Because `h` repeats every `orig` inputs / `new` outputs, it is a strided convolution: one kernel row per
  output phase, `2*width + orig` taps with `width = ceil(ZERO_CROSSINGS * orig / base)`, the signal zero-padded
  by `width` on the left and `width + orig` on the right, stride `orig`.
- The output has `ceil(new * n / orig)` samples for `n` input samples; equal rates return the input unchanged.
- The filter's coefficients are those of the default `Resample`: evaluated in float64, except the per-phase
  offsets `m/new`, which torchaudio forms in float32 (its default dtype; this moves each output's instant by
  up to ~3e-8 of a block, ~1.6e-6 in amplitude on jfk.flac), then rounded to float32. The convolution sums in
  float64 where torchaudio sums in float32 (the same float32 conv1d on these coefficients is within 2.4e-7 of
  ours on the bundled recordings); the output is float32. The tests hold it within 1e-6 of a float64
  evaluation of the formula above at torchaudio's output instants (measured: at most 5.2e-8).

`resample_sinc` resamples a whole recording; `SincResampleStream` gives the same samples block by block
(overlap-save: it keeps the `2*width + orig` input samples a pending output block still needs), so hours of
audio pass through in bounded memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

ZERO_CROSSINGS = 6  # torchaudio's default `lowpass_filter_width`: sinc lobes kept on each side
ROLLOFF = 0.99  # torchaudio's default: cut-off at 99% of the lower Nyquist rate, against aliasing at the edge


@dataclass(frozen=True)
class SincKernel:
    """The strided-convolution form of the resampler between two rates, reduced by their gcd.

    Output phase `j` of each block of `new` outputs is made from a stretch of `taps = 2*width + orig` inputs
    that starts `width` samples before the block's first input. `weights[j, r, q]` is the weight of that
    stretch's input `q*orig + r`, zero past the taps: shape (new, orig, frames), the polyphase layout in
    which the stride-`orig` convolution becomes a stride-1 convolution over frames of `orig` samples.
    """

    orig: int
    new: int
    width: int
    weights: torch.Tensor  # float64 holding float32 values: torchaudio's coefficients, summed without float32 rounding

    @property
    def taps(self) -> int:
        return 2 * self.width + self.orig

    @property
    def frames(self) -> int:
        """How many consecutive `orig`-sample frames one block's taps span."""
        return self.weights.shape[2]


def output_length(n_samples: int, from_hz: int, to_hz: int) -> int:
    """Samples out for `n_samples` in: `ceil(to_hz * n_samples / from_hz)`, in integers (no float rounding)."""
    return -(-to_hz * n_samples // from_hz)


def sinc_kernel(from_hz: int, to_hz: int) -> SincKernel:
    """The kernel resampling `from_hz` to `to_hz` (cached: one per pair of rates)."""
    _check_rates(from_hz, to_hz)  # before the cache, which would take 44100.0 for a cached 44100
    return _cached_kernel(from_hz, to_hz)


@lru_cache(maxsize=8)
def _cached_kernel(from_hz: int, to_hz: int) -> SincKernel:
    gcd = math.gcd(from_hz, to_hz)
    orig, new = from_hz // gcd, to_hz // gcd
    base = min(orig, new) * ROLLOFF
    width = math.ceil(ZERO_CROSSINGS * orig / base)
    taps = torch.arange(-width, width + orig, dtype=torch.float64) / orig  # input times, in blocks of `orig`
    # The phase offsets in float32, as torchaudio's default Resample forms them, then float64 like the rest.
    phases = (torch.arange(new, dtype=torch.float32) / new).to(torch.float64)
    lobes = (taps[None, :] - phases[:, None]) * base  # (new, taps): distance in zero crossings
    lobes = lobes.clamp(-ZERO_CROSSINGS, ZERO_CROSSINGS)  # the window is 0 at +-ZERO_CROSSINGS: h vanishes beyond
    hann = torch.cos(lobes * math.pi / ZERO_CROSSINGS / 2) ** 2
    sinc = torch.sinc(lobes)  # sin(pi*u)/(pi*u), 1 at u = 0
    weights = (sinc * hann * (base / orig)).to(torch.float32).to(torch.float64)  # torchaudio's float32 values
    frames = -(-weights.shape[1] // orig)
    weights = torch.nn.functional.pad(weights, (0, frames * orig - weights.shape[1]))  # (new, frames * orig)
    return SincKernel(orig, new, width, weights.view(new, frames, orig).transpose(1, 2).contiguous())


def resample_sinc(wav: np.ndarray, from_hz: int, to_hz: int) -> np.ndarray:
    """Resample mono `wav` (n_samples,) from `from_hz` to `to_hz`: float32 (ceil(to_hz*n/from_hz),)."""
    if wav.ndim != 1:
        raise ValueError(f"expected mono audio of shape (n_samples,), got shape {wav.shape}")
    _check_rates(from_hz, to_hz)
    if from_hz == to_hz:
        return np.asarray(wav, dtype=np.float32)
    kernel = sinc_kernel(from_hz, to_hz)
    signal = torch.from_numpy(np.asarray(wav, dtype=np.float32).astype(np.float64))
    padded = torch.nn.functional.pad(signal, (kernel.width, kernel.width + kernel.orig))
    return _convolve(kernel, padded)[: output_length(wav.shape[0], from_hz, to_hz)]


class SincResampleStream:
    """`resample_sinc` over a recording that arrives in blocks: `push` each block, then `finish` once.

    The concatenation of what `push` and `finish` return equals `resample_sinc` on the concatenated input:
    each output is the same float64 sum over the same inputs (bit-identical on the real recordings in the
    tests, which require 1e-6). Holds at most one pushed block plus `2*width + orig` samples.
    """

    def __init__(self, from_hz: int, to_hz: int) -> None:
        self.kernel = sinc_kernel(from_hz, to_hz)
        self.from_hz, self.to_hz = from_hz, to_hz
        # Input not yet consumed; its first sample has index `start`, negative while the left padding is held.
        self._pending = np.zeros(self.kernel.width, dtype=np.float32)
        self._start = -self.kernel.width
        self._n_in = 0
        self._n_out = 0
        self._finished = False

    def push(self, block: np.ndarray) -> np.ndarray:
        """Feed the next mono block; return the output samples it completes (possibly none)."""
        if self._finished:
            raise RuntimeError("push after finish: a SincResampleStream resamples one recording")
        if block.ndim != 1:
            raise ValueError(f"expected mono blocks of shape (n_samples,), got shape {block.shape}")
        self._pending = np.concatenate([self._pending, block.astype(np.float32, copy=False)])
        self._n_in += block.shape[0]
        # Output block i reads inputs [i*orig - width, i*orig + width + orig): complete ones are those whose
        # last input has arrived.
        n_complete = (self._n_in - self.kernel.width) // self.kernel.orig
        return self._emit(n_complete)

    def finish(self) -> np.ndarray:
        """The remaining output, the recording's end zero-padded as in `resample_sinc`."""
        self._finished = True
        n_total = output_length(self._n_in, self.from_hz, self.to_hz)
        n_blocks = -(-n_total // self.kernel.new)
        needed_end = n_blocks * self.kernel.orig + self.kernel.width  # one past the last input block n-1 reads
        n_missing = needed_end - (self._start + self._pending.shape[0])
        if n_missing > 0:
            self._pending = np.concatenate([self._pending, np.zeros(n_missing, dtype=np.float32)])
        out = self._emit(n_blocks)
        return out[: max(0, n_total - (self._n_out - out.shape[0]))]

    def _emit(self, n_blocks_done: int) -> np.ndarray:
        """Output blocks from the next one up to (not including) `n_blocks_done`; drop the inputs none needs."""
        kernel = self.kernel
        first = self._n_out // kernel.new
        if n_blocks_done <= first:
            return np.zeros(0, dtype=np.float32)
        stop = n_blocks_done * kernel.orig + kernel.width - self._start  # one past the last input used
        out = _convolve(kernel, torch.from_numpy(self._pending[:stop].astype(np.float64)))
        next_start = n_blocks_done * kernel.orig - kernel.width
        self._pending = self._pending[next_start - self._start :].copy()  # a copy frees the consumed prefix
        self._start = next_start
        self._n_out += out.shape[0]
        return out


def _convolve(kernel: SincKernel, padded: torch.Tensor) -> np.ndarray:
    """Every complete stride of float64 `padded` (n,) through `kernel`: float32 (n_blocks * new,), in time order.

    Polyphase: block i's taps are frames i .. i + frames - 1 of `orig` samples, so with the frames as `orig`
    channels the stride-`orig` convolution is a stride-1 one, which runs several times faster in float64 (and
    gives the same sums) when `orig` is small (48 kHz: 3 samples per frame, 14 frames).
    """
    orig = kernel.orig
    n_blocks = max(0, (padded.shape[0] - kernel.taps) // orig + 1)
    if n_blocks == 0:
        return np.zeros(0, dtype=np.float32)
    n_needed = (n_blocks + kernel.frames - 1) * orig  # the zero weights past the taps may read past the end
    padded = torch.nn.functional.pad(padded[:n_needed], (0, max(0, n_needed - padded.shape[0])))
    channels = padded.view(-1, orig).T[None]  # (1, orig, n_frames): channel r holds sample r of each frame
    with torch.no_grad():
        out = torch.nn.functional.conv1d(channels, kernel.weights)[0]  # (new, n_blocks)
    return out.T.reshape(-1).to(torch.float32).numpy()  # phases interleaved in time order


def _check_rates(from_hz: int, to_hz: int) -> None:
    if not (isinstance(from_hz, int) and isinstance(to_hz, int)) or from_hz <= 0 or to_hz <= 0:
        raise ValueError(f"sample rates must be positive integers, got {from_hz!r} and {to_hz!r}")
