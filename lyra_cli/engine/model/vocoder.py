"""Unit vocoder: fairseq's CodeHiFiGAN (unit HiFi-GAN with a duration predictor) as our own torch module.

The release ships it as a fairseq download (docs/release-format.md#unit-vocoder), read here without fairseq:

    vocoder/config.json   HiFi-GAN hyper-parameters, `dur_predictor_params`, `sampling_rate` (+ training keys)
    vocoder/g_00500000    torch.save({"generator": state_dict}); every HiFi-GAN conv is weight-normed, so its
                          weight is stored as `weight_g` (one magnitude per dim-0 slice) and `weight_v`

Offline, as fairseq's `CodeHiFiGANVocoder(..)({"code": units}, dur_prediction=True)`:

    units (n,) ─► embedding (n, C) ─► durations (n,) in frames ─► repeat ─► frames (T = Σ dur, C)
               ─► HiFi-GAN: conv_pre, 5 × (leaky ReLU, transposed conv, mean of residual blocks), conv_post, tanh
               ─► samples (T · 320,) in [-1, 1] at 16 kHz: one frame is one 20 ms unit step

Streaming (`VocoderStream`). The authors vocode each chunk of 40 new units on its own
(docs/authors-behaviour.md#streaming-and-vocoding): both the duration predictor and HiFi-GAN then see zero padding
at every join, which changes the samples next to it (a click) and the durations of the units next to it. Both stages
are stacks of convolutions, so every value depends on a bounded neighbourhood, derived from config.json:

    durations  unit i depends on units i ± `DurationPredictor.reach_units` (2: two kernel-3 convs)
    HiFi-GAN   the samples of frame f depend on frames f − `context_frames` … f + `lookahead_frames`
               (21 and 21 for the release config; `generator_reach_frames`)

The stream fixes a unit's duration only once the units it depends on have arrived, keeps the frames already
emitted as left context, holds back units until `lookahead_frames` frames of fixed duration follow them, and
cuts out exactly the samples of the units it emits. Every emitted sample therefore sees the same inputs as in
offline vocoding, so the stream equals `vocoder(all_units)` up to float rounding (convolutions over windows
of different lengths may sum in a different order). The price is latency: a unit is vocoded once 2 more
units and 21 more frames (0.42 s of audio) have fixed durations, and only in chunks of `chunk_units`.

Measured in fp32, 150 random units, chunks of 1, 7 and 40: max |stream − offline| ≤ 1.3e-6 on the tiny
vocoder (5 seeds) and ≤ 3e-6 on a random vocoder of the release's width (13.5 M parameters); in float64 the
two agree to float32 output rounding. `STREAM_TOLERANCE` = 1e-5 is what the tests demand. One caveat:
durations are integers, `round(exp(log_dur) − 1)`, so a log-duration within float rounding of a .5 boundary
could round differently in the two runs. We have not seen it; it would shift the rest of the audio by one
20 ms frame.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lyra_cli.engine.model.config import read_json
from lyra_cli.errors import CheckpointError, InputError
from lyra_cli.fileio import write_atomically

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "g_00500000"  # HiFi-GAN names generator checkpoints g_<step>; the release is step 500k
CHECKPOINT_GLOB = "g_*"
GENERATOR_KEY = "generator"  # HiFi-GAN keeps discriminators and optimizer state in separate do_* files

LRELU_SLOPE = 0.1  # HiFi-GAN's slope inside the generator
# fairseq calls `F.leaky_relu(x)` before conv_post with no slope: torch's default 0.01, not LRELU_SLOPE.
FINAL_LRELU_SLOPE = 0.01
EDGE_KERNEL = 7  # conv_pre and conv_post: kernel 7, "same" padding 3
DEFAULT_MODEL_IN_DIM = 80  # fairseq's default when config.json lacks model_in_dim (HiFi-GAN's mel bins)
# every fairseq unit vocoder, and Lyra's output audio (docs/release-format.md#unit-vocoder)
DEFAULT_SAMPLE_RATE_HZ = 16_000
# fairseq's duration predictor pads its second conv by 1 whatever the kernel, so only kernel 3 keeps one
# duration per unit.
DURATION_KERNEL = 3
# Residual-block kinds: how many dilations each uses (fairseq always builds "1"; HiFi-GAN also has "2").
RESBLOCK_DILATIONS = {"1": 3, "2": 2}

# the authors' Gradio chunk (docs/authors-behaviour.md#streaming-and-vocoding), 0.8 s of 20 ms units at least
DEFAULT_CHUNK_UNITS = 40
STREAM_TOLERANCE = 1e-5  # max |stream − offline| in fp32 that the tests demand (measured ≤ 3e-6)

_CONFIG_HINT = "use the config.json that came with the vocoder checkpoint (fairseq's unit HiFi-GAN, mHuBERT km1000)"
_MATCH_HINT = "config.json and the g_* checkpoint must come from the same vocoder download"
_NOT_GENERATOR_HINT = "is this a HiFi-GAN generator checkpoint (g_*)?"
_MAX_KEYS_SHOWN = 5


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DurationPredictorConfig:
    """`dur_predictor_params`: fairseq's VariancePredictor arguments."""

    embed_dim: int  # encoder_embed_dim: must equal the unit embedding size
    hidden_dim: int  # var_pred_hidden_dim
    kernel_size: int  # var_pred_kernel_size
    dropout: float  # var_pred_dropout: training only


@dataclass(frozen=True)
class VocoderConfig:
    """The vocoder folder's config.json; keys we do not use stay in `raw` (it also holds training settings)."""

    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    upsample_initial_channel: int
    resblock: str  # "1" | "2"
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    num_embeddings: int  # unit vocabulary (1000 k-means units)
    embedding_dim: int
    model_in_dim: int  # conv_pre input channels: the embedding alone, as we support no f0 or speaker input
    dur_predictor: DurationPredictorConfig | None
    sampling_rate: int
    code_hop_size: int  # samples per unit at training time; fairseq ignores it at inference
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.upsample_rates)

    def to_dict(self) -> dict[str, Any]:
        """The config.json this config was read from (unknown keys included)."""
        return dict(self.raw)


_KNOWN_KEYS = {
    "upsample_rates", "upsample_kernel_sizes", "upsample_initial_channel", "resblock", "resblock_kernel_sizes",
    "resblock_dilation_sizes", "num_embeddings", "embedding_dim", "model_in_dim", "dur_predictor_params",
    "sampling_rate", "code_hop_size", "f0", "f0_quant_num_bin", "multispkr", "embedder_params",
}  # fmt: skip
# Conditioning fairseq's CodeGenerator can add, none of which Lyra's single-speaker vocoder uses.
_UNSUPPORTED = {
    "multispkr": "multi-speaker vocoders (a speaker id input)",
    "embedder_params": "speaker-embedding vocoders",
    "f0": "F0-conditioned vocoders (a pitch input)",
    "f0_quant_num_bin": "quantized-F0 vocoders",
}


def parse_vocoder_config(raw: dict[str, Any], source: str = CONFIG_FILE) -> VocoderConfig:
    """Parse and check a vocoder config.json; anything fairseq's CodeHiFiGAN could not run is refused here."""
    for key, what in _UNSUPPORTED.items():
        if raw.get(key):
            raise CheckpointError(
                f"`{source}` sets `{key}`: {what} are not supported", "Lyra's vocoder takes units only; " + _CONFIG_HINT
            )
    try:
        config = _parse_fields(raw)
    except KeyError as exc:
        raise CheckpointError(f"`{source}` lacks `{exc.args[0]}`", _CONFIG_HINT) from exc
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"`{source}` has a malformed value ({exc})", _CONFIG_HINT) from exc
    problem = _config_problem(config)
    if problem:
        raise CheckpointError(f"`{source}`: {problem}", _CONFIG_HINT)
    if config.code_hop_size != config.samples_per_frame:
        log.warning("vocoder code_hop_size %d differs from prod(upsample_rates) %d; fairseq ignores it, so do we",
                    config.code_hop_size, config.samples_per_frame)  # fmt: skip
    log.debug("vocoder config keys kept but unused: %s", ", ".join(sorted(set(raw) - _KNOWN_KEYS)))
    return config


def _ints(values: Iterable[Any]) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)):
        raise TypeError(f"expected a list of integers, got `{values}`")
    return tuple(int(v) for v in values)


def _parse_fields(raw: dict[str, Any]) -> VocoderConfig:
    dur = raw.get("dur_predictor_params")
    upsample_rates = _ints(raw["upsample_rates"])
    return VocoderConfig(
        upsample_rates=upsample_rates,
        upsample_kernel_sizes=_ints(raw["upsample_kernel_sizes"]),
        upsample_initial_channel=int(raw["upsample_initial_channel"]),
        resblock=str(raw.get("resblock", "1")),
        resblock_kernel_sizes=_ints(raw["resblock_kernel_sizes"]),
        resblock_dilation_sizes=tuple(_ints(d) for d in raw["resblock_dilation_sizes"]),
        num_embeddings=int(raw["num_embeddings"]),
        embedding_dim=int(raw["embedding_dim"]),
        model_in_dim=int(raw.get("model_in_dim", DEFAULT_MODEL_IN_DIM)),
        dur_predictor=_parse_duration_predictor(dur) if dur else None,
        sampling_rate=int(raw.get("sampling_rate", DEFAULT_SAMPLE_RATE_HZ)),
        code_hop_size=int(raw.get("code_hop_size", math.prod(upsample_rates))),
        raw=dict(raw),
    )


def _parse_duration_predictor(params: dict[str, Any]) -> DurationPredictorConfig:
    return DurationPredictorConfig(
        embed_dim=int(params["encoder_embed_dim"]),
        hidden_dim=int(params["var_pred_hidden_dim"]),
        kernel_size=int(params["var_pred_kernel_size"]),
        dropout=float(params.get("var_pred_dropout", 0.0)),
    )


def _config_problem(c: VocoderConfig) -> str | None:
    """What makes this config unrunnable (by fairseq, or by our frame-exact streaming), or None."""
    n_up = len(c.upsample_rates)
    if n_up == 0 or n_up != len(c.upsample_kernel_sizes):
        return "`upsample_rates` and `upsample_kernel_sizes` must be non-empty lists of equal length"
    if any(k < u or (k - u) % 2 for u, k in zip(c.upsample_rates, c.upsample_kernel_sizes)):
        return "each upsample kernel must exceed its rate by an even number (one frame → exactly hop samples)"
    if c.upsample_initial_channel >> n_up < 1:
        return f"`upsample_initial_channel` must be at least 2^{n_up} (it halves at every upsampling)"
    if c.resblock not in RESBLOCK_DILATIONS:
        return f"`resblock` is `{c.resblock}`; expected one of {', '.join(RESBLOCK_DILATIONS)}"
    if not c.resblock_kernel_sizes or len(c.resblock_kernel_sizes) != len(c.resblock_dilation_sizes):
        return "`resblock_kernel_sizes` and `resblock_dilation_sizes` must be non-empty lists of equal length"
    if any(k % 2 == 0 for k in c.resblock_kernel_sizes):
        return "residual-block kernels must be odd (a residual needs a same-length convolution)"
    if any(len(d) < RESBLOCK_DILATIONS[c.resblock] for d in c.resblock_dilation_sizes):
        return f"resblock `{c.resblock}` needs {RESBLOCK_DILATIONS[c.resblock]} dilations per kernel"
    if c.model_in_dim != c.embedding_dim:
        return f"`model_in_dim` {c.model_in_dim} must equal `embedding_dim` {c.embedding_dim} (no f0/speaker input)"
    return _duration_problem(c)


def _duration_problem(c: VocoderConfig) -> str | None:
    dur = c.dur_predictor
    if dur is None:
        return None
    if dur.kernel_size != DURATION_KERNEL:
        return f"`var_pred_kernel_size` must be {DURATION_KERNEL} (fairseq pads its second conv by 1)"
    if dur.embed_dim != c.embedding_dim:
        return f"`encoder_embed_dim` {dur.embed_dim} must equal `embedding_dim` {c.embedding_dim}"
    return None


def load_vocoder_config(folder: Path) -> VocoderConfig:
    path = Path(folder) / CONFIG_FILE
    return parse_vocoder_config(read_json(path), source=str(path))


# ---------------------------------------------------------------------------------------------------------
# Weight-normed convolutions, stored as fairseq stores them
# ---------------------------------------------------------------------------------------------------------


def weight_norm_weight(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """w = g · v / ‖v‖, the norm over every dim but 0 (torch's classic `weight_norm(dim=0)`, used by fairseq).

    Dim 0 is the output channel of a Conv1d but the *input* channel of a ConvTranspose1d (weight (in, out, k)),
    so fairseq's `ups.{i}.weight_g` has shape (in, 1, 1).
    """
    return v * (g / v.norm(dim=tuple(range(1, v.dim())), keepdim=True))


class _WeightNormed:
    """Mixin for a conv whose `weight` parameter is replaced by `weight_g` and `weight_v` (checkpoint layout)."""

    weight_g: nn.Parameter
    weight_v: nn.Parameter
    bias: nn.Parameter | None

    def _split_weight(self) -> None:
        weight = self.weight.detach()  # type: ignore[has-type]
        del self.weight
        self.weight_g = nn.Parameter(weight.norm(dim=(1, 2), keepdim=True))
        self.weight_v = nn.Parameter(weight.clone())

    def joined_weight(self) -> torch.Tensor:
        return weight_norm_weight(self.weight_g, self.weight_v)

    def _fill(self, plain: nn.Module) -> nn.Module:
        # Fold in fp32 even for a half-precision checkpoint; the caller casts the model afterwards.
        weight = weight_norm_weight(self.weight_g.detach().float(), self.weight_v.detach().float())
        plain.weight = nn.Parameter(weight.to(self.weight_v.dtype), requires_grad=self.weight_v.requires_grad)
        plain.bias = self.bias
        return plain


class WNConv1d(_WeightNormed, nn.Conv1d):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._split_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.joined_weight(), self.bias)

    def folded(self) -> nn.Conv1d:
        plain = nn.Conv1d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            self.groups, bias=self.bias is not None, device="meta",
        )  # fmt: skip
        return self._fill(plain)  # type: ignore[return-value]


class WNConvTranspose1d(_WeightNormed, nn.ConvTranspose1d):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._split_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose1d(
            x, self.joined_weight(), self.bias, self.stride, self.padding, self.output_padding, self.groups,
            self.dilation,
        )  # fmt: skip

    def folded(self) -> nn.ConvTranspose1d:
        plain = nn.ConvTranspose1d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.output_padding,
            self.groups, bias=self.bias is not None, dilation=self.dilation, device="meta",
        )  # fmt: skip
        return self._fill(plain)  # type: ignore[return-value]


def _same_conv(channels: int, kernel: int, dilation: int = 1) -> WNConv1d:
    """A length-preserving conv (kernel odd): HiFi-GAN's `get_padding`."""
    return WNConv1d(channels, channels, kernel, dilation=dilation, padding=dilation * (kernel - 1) // 2)


# ---------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------


class ResBlock1(nn.Module):
    """HiFi-GAN residual block "1": three (dilated conv, conv) pairs. fairseq builds only this kind."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        dilations = dilations[: RESBLOCK_DILATIONS["1"]]  # fairseq reads the first three and ignores the rest
        self.convs1 = nn.ModuleList(_same_conv(channels, kernel, d) for d in dilations)
        self.convs2 = nn.ModuleList(_same_conv(channels, kernel) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, L) -> (B, C, L)
        for dilated, plain in zip(self.convs1, self.convs2):
            inner = F.leaky_relu(dilated(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE)
            x = plain(inner) + x
        return x

    @staticmethod
    def reach(kernel: int, dilations: tuple[int, ...]) -> int:
        """Samples on each side an output sample depends on."""
        return sum((d + 1) * (kernel - 1) // 2 for d in dilations[: RESBLOCK_DILATIONS["1"]])


class ResBlock2(nn.Module):
    """HiFi-GAN residual block "2": two dilated convs (original HiFi-GAN; fairseq cannot load these)."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        dilations = dilations[: RESBLOCK_DILATIONS["2"]]
        self.convs = nn.ModuleList(_same_conv(channels, kernel, d) for d in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, L) -> (B, C, L)
        for conv in self.convs:
            x = conv(F.leaky_relu(x, LRELU_SLOPE)) + x
        return x

    @staticmethod
    def reach(kernel: int, dilations: tuple[int, ...]) -> int:
        return sum(d * (kernel - 1) // 2 for d in dilations[: RESBLOCK_DILATIONS["2"]])


RESBLOCKS: dict[str, type[ResBlock1] | type[ResBlock2]] = {"1": ResBlock1, "2": ResBlock2}


class DurationPredictor(nn.Module):
    """fairseq's VariancePredictor: 2 × (conv → ReLU → LayerNorm → dropout) → linear = log(1 + frames)."""

    # A unit's duration depends on this many units on each side: one per kernel-3 conv.
    reach_units = (DURATION_KERNEL - 1) // 2 + 1

    def __init__(self, config: DurationPredictorConfig) -> None:
        super().__init__()
        kernel, hidden = config.kernel_size, config.hidden_dim
        # Names follow the checkpoint: `conv1.0.weight` is the conv inside an (conv, ReLU) Sequential.
        self.conv1 = nn.Sequential(nn.Conv1d(config.embed_dim, hidden, kernel, padding=(kernel - 1) // 2), nn.ReLU())
        self.ln1 = nn.LayerNorm(hidden)
        self.conv2 = nn.Sequential(nn.Conv1d(hidden, hidden, kernel, padding=1), nn.ReLU())
        self.ln2 = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.proj = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, n, C) -> (B, n) log(1 + frames)
        x = self.dropout(self.ln1(self.conv1(x.transpose(1, 2)).transpose(1, 2)))
        x = self.dropout(self.ln2(self.conv2(x.transpose(1, 2)).transpose(1, 2)))
        return self.proj(x).squeeze(2)


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------


def generator_reach_frames(config: VocoderConfig) -> tuple[int, int]:
    """(left, right): the samples of frame f depend on frames f − left … f + right, no others.

    Walks the generator backwards from the samples of frame 0 to the frames they read. Each step is exact:
    a same-padded conv widens the interval by its reach; a transposed conv (stride u, kernel k, padding p)
    writes input i to outputs i·u − p … i·u − p + k − 1, so output o reads inputs
    ⌈(o + p − k + 1)/u⌉ … ⌊(o + p)/u⌋. It is an upper bound on what matters numerically: in the tiny
    vocoder the outermost frame moves samples by less than float64 resolution.
    """
    edge_reach = EDGE_KERNEL // 2
    first, last = -edge_reach, config.samples_per_frame - 1 + edge_reach  # through conv_post
    block = RESBLOCKS[config.resblock]
    reach = max(block.reach(k, d) for k, d in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes))
    for rate, kernel in reversed(list(zip(config.upsample_rates, config.upsample_kernel_sizes))):
        first, last = first - reach, last + reach  # through the residual blocks of this level
        padding = (kernel - rate) // 2
        first, last = -((kernel - 1 - first - padding) // rate), (last + padding) // rate
    return edge_reach - first, last + edge_reach  # through conv_pre


class HiFiGAN(nn.Module):
    """fairseq's hifigan.Generator: frames (B, C_in, T) → samples (B, 1, T · samples_per_frame) in [-1, 1]."""

    def __init__(self, config: VocoderConfig) -> None:
        super().__init__()
        channels = config.upsample_initial_channel
        self.conv_pre = WNConv1d(config.model_in_dim, channels, EDGE_KERNEL, padding=EDGE_KERNEL // 2)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        block = RESBLOCKS[config.resblock]
        for i, (rate, kernel) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes)):
            c_in, c_out = channels >> i, channels >> (i + 1)
            self.ups.append(WNConvTranspose1d(c_in, c_out, kernel, rate, padding=(kernel - rate) // 2))
            for k, dilations in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes):
                self.resblocks.append(block(c_out, k, dilations))
        self.conv_post = WNConv1d(channels >> len(self.ups), 1, EDGE_KERNEL, padding=EDGE_KERNEL // 2)
        self.blocks_per_level = len(config.resblock_kernel_sizes)

    def generate(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, T) -> (B, 1, T · hop)
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            level = self.resblocks[i * self.blocks_per_level : (i + 1) * self.blocks_per_level]
            total = level[0](x)
            for block in level[1:]:
                total = total + block(x)
            x = total / self.blocks_per_level
        return torch.tanh(self.conv_post(F.leaky_relu(x, FINAL_LRELU_SLOPE)))


class UnitVocoder(HiFiGAN):
    """fairseq's CodeGenerator: unit ids → 16 kHz samples. Parameter names are the checkpoint's.

    Built "unfolded" (weight-normed convs with `weight_g`/`weight_v`, as stored); `load_vocoder` folds them
    into plain convs once, like fairseq's `remove_weight_norm()`.
    """

    def __init__(self, config: VocoderConfig) -> None:
        super().__init__(config)
        self.config = config
        self.dict = nn.Embedding(config.num_embeddings, config.embedding_dim)
        self.dur_predictor = DurationPredictor(config.dur_predictor) if config.dur_predictor else None
        self.context_frames, self.lookahead_frames = generator_reach_frames(config)

    @property
    def samples_per_frame(self) -> int:
        return self.config.samples_per_frame

    @property
    def sample_rate_hz(self) -> int:
        return self.config.sampling_rate

    @property
    def duration_reach_units(self) -> int:
        return DurationPredictor.reach_units if self.dur_predictor is not None else 0

    @property
    def is_folded(self) -> bool:
        return not any(isinstance(m, _WeightNormed) for m in self.modules())

    def fold_weight_norm(self) -> None:
        """Replace every weight-normed conv by a plain one with w = g · v / ‖v‖ (same outputs, less work)."""
        targets = [
            (parent, name, child)
            for parent in self.modules()
            for name, child in parent.named_children()
            if isinstance(child, _WeightNormed)
        ]
        with torch.no_grad():
            for parent, name, child in targets:
                setattr(parent, name, child.folded())  # type: ignore[attr-defined]

    def valid_units(self, units: torch.Tensor | Iterable[int]) -> torch.Tensor:
        """Unit ids as a LongTensor (n,) on the model's device, negatives dropped as fairseq does."""
        units = torch.as_tensor(units, dtype=torch.long).reshape(-1).to(self.dict.weight.device)
        units = units[units >= 0]
        if units.numel() and int(units.max()) >= self.config.num_embeddings:
            raise InputError(
                f"unit `{int(units.max())}` is outside the vocoder's range 0–{self.config.num_embeddings - 1}",
                "units come from the speech generator after CTC collapse, which removes the blank",
            )
        return units

    @torch.no_grad()
    def durations(self, units: torch.Tensor | Iterable[int]) -> torch.Tensor:
        """Frames per unit, LongTensor (n,) ≥ 1, for the non-negative units (all 1 without a predictor)."""
        units = self.valid_units(units)
        if self.dur_predictor is None or units.numel() == 0:
            return torch.ones_like(units)
        log_dur = self.dur_predictor(self.dict(units)[None])[0]  # (n,)
        return torch.clamp(torch.round(torch.exp(log_dur) - 1).long(), min=1)

    @torch.no_grad()
    def vocode_frames(self, frame_units: torch.Tensor | Iterable[int]) -> torch.Tensor:
        """One unit id per frame (T,) → samples (T · samples_per_frame,); no duration prediction."""
        frame_units = self.valid_units(frame_units)
        if frame_units.numel() == 0:
            return self.dict.weight.new_zeros(0)
        return self.generate(self.dict(frame_units).T[None])[0, 0]

    @torch.no_grad()
    def forward(self, units: torch.Tensor | Iterable[int], dur_prediction: bool = True) -> torch.Tensor:
        """Unit ids (n,) → samples (Σ durations · samples_per_frame,) in [-1, 1] at `sample_rate_hz`."""
        units = self.valid_units(units)
        if dur_prediction and self.dur_predictor is not None:
            units = torch.repeat_interleave(units, self.durations(units))
        # Repeating ids equals fairseq's repeating of their embeddings: the same rows, in the same order.
        return self.vocode_frames(units)


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def find_checkpoint(folder: Path) -> Path:
    """`g_00500000`, or else the one `g_*` file in the folder."""
    folder = Path(folder)
    if (folder / CHECKPOINT_FILE).is_file():
        return folder / CHECKPOINT_FILE
    found = sorted(p for p in folder.glob(CHECKPOINT_GLOB) if p.is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise CheckpointError(
            f"no vocoder checkpoint (`{CHECKPOINT_FILE}` or `{CHECKPOINT_GLOB}`) in `{folder}`",
            "download fairseq's mHuBERT km1000 unit HiFi-GAN vocoder (`g_00500000` + `config.json`) into that folder",
        )
    names = ", ".join(f"`{p.name}`" for p in found)
    raise CheckpointError(f"several vocoder checkpoints in `{folder}`: {names}", "keep only the one to use")


def _show_keys(keys: list[str]) -> str:
    shown = ", ".join(f"`{k}`" for k in keys[:_MAX_KEYS_SHOWN])
    more = len(keys) - _MAX_KEYS_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def read_generator_state(path: Path) -> dict[str, torch.Tensor]:
    """The `generator` state dict of a fairseq/HiFi-GAN checkpoint, read without unpickling any code."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"`{path}` holds Python objects besides tensors; refusing to unpickle them",
            "re-save it as torch.save({'generator': generator.state_dict()}) from a trusted copy",
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"`{path}` is not a readable torch checkpoint ({exc})", _MATCH_HINT) from exc
    state = checkpoint.get(GENERATOR_KEY) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"`{path}` has no `{GENERATOR_KEY}` state dict", _NOT_GENERATOR_HINT)
    bad = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"`{path}` has non-tensor entries {_show_keys(bad)}", _NOT_GENERATOR_HINT)
    return dict(state)


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = [f"missing {_show_keys(missing)}"] if missing else []
        parts += [f"unexpected {_show_keys(unexpected)}"] if unexpected else []
        raise CheckpointError(f"`{path}` does not match its config.json: {'; '.join(parts)}", _MATCH_HINT)
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(
                f"`{path}`: `{key}` has shape {tuple(state[key].shape)}, config.json implies {tuple(tensor.shape)}",
                _MATCH_HINT,
            )


def load_vocoder(folder: Path, *, device: torch.device | str, dtype: torch.dtype = torch.float32) -> UnitVocoder:
    """Read a vocoder folder (config.json + g_*), check every key, fold weight norm; eval mode, no grads."""
    folder = Path(folder)
    config = load_vocoder_config(folder)
    path = find_checkpoint(folder)
    state = read_generator_state(path)
    with torch.device("meta"):  # no random init: every parameter comes from the file
        model = UnitVocoder(config)
    _check_state(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)
    model.fold_weight_norm()
    model.requires_grad_(False)
    log.info("vocoder %s: %d Hz, %d samples per unit frame", path, config.sampling_rate, config.samples_per_frame)
    return model.to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------


class VocoderStream:
    """Vocodes units as they arrive, in chunks of `chunk_units`; the concatenated output equals offline vocoding.

    State, all in frames or units since the start of the utterance:
      `_units`      every valid unit pushed
      `_frames`     one unit id per frame, for the units whose duration is fixed (their neighbours arrived)
      `_unit_ends`  the frame after each of those units (cumulative durations)
      `_emitted`    how many units have been vocoded and returned

    A unit is emitted once `lookahead_frames` fixed frames follow it (or at `flush`). Lowering
    `context_frames` / `lookahead_frames` below the vocoder's derived reach trades exactness for latency.
    """

    def __init__(
        self,
        vocoder: UnitVocoder,
        chunk_units: int = DEFAULT_CHUNK_UNITS,
        *,
        context_frames: int | None = None,
        lookahead_frames: int | None = None,
    ) -> None:
        if chunk_units < 1:
            raise ValueError(f"chunk_units must be at least 1, got {chunk_units}")
        self.vocoder = vocoder
        self.chunk_units = chunk_units
        self.context_frames = vocoder.context_frames if context_frames is None else context_frames
        self.lookahead_frames = vocoder.lookahead_frames if lookahead_frames is None else lookahead_frames
        self._reset()

    def _reset(self) -> None:
        self._units: list[int] = []
        self._frames: list[int] = []
        self._unit_ends: list[int] = []
        self._emitted = 0
        self.emitted_samples = 0  # samples returned so far: where the next returned samples start

    def push(self, units: Iterable[int]) -> np.ndarray:
        """Add units (negatives dropped); return the new float32 samples (possibly none)."""
        self._units += self.vocoder.valid_units(list(units)).tolist()
        self._fix_durations(len(self._units) - self.vocoder.duration_reach_units)
        return self._emit(final=False)

    def flush(self) -> np.ndarray:
        """End the utterance: return the remaining samples; the stream is then empty, ready for another."""
        self._fix_durations(len(self._units))  # the sequence end is known: the last units' padding is real
        samples = self._emit(final=True)
        self._reset()
        return samples

    def _fix_durations(self, stop: int) -> None:
        """Fix the durations of units [len(_unit_ends), stop): all units they depend on are present."""
        start = len(self._unit_ends)
        if stop <= start:
            return
        reach = self.vocoder.duration_reach_units
        lo, hi = max(0, start - reach), min(len(self._units), stop + reach)
        durations = self.vocoder.durations(self._units[lo:hi])[start - lo : stop - lo].tolist()
        for unit, frames in zip(self._units[start:stop], durations):
            self._frames += [unit] * frames
            self._unit_ends.append(len(self._frames))

    def _emit(self, *, final: bool) -> np.ndarray:
        fixed = len(self._unit_ends)
        ready = fixed if final else bisect.bisect_right(self._unit_ends, len(self._frames) - self.lookahead_frames)
        pieces = []
        while ready - self._emitted >= self.chunk_units or (final and ready > self._emitted):
            stop = min(self._emitted + self.chunk_units, ready)
            pieces.append(self._vocode_units(self._emitted, stop))
            self._emitted = stop
        samples = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        self.emitted_samples += len(samples)
        return samples

    def _vocode_units(self, start: int, stop: int) -> np.ndarray:
        """Samples of units [start, stop): vocode them with their context and lookahead frames, keep theirs."""
        first = self._unit_ends[start - 1] if start else 0
        last = self._unit_ends[stop - 1]
        lo = max(0, first - self.context_frames)
        hi = min(len(self._frames), last + self.lookahead_frames)
        wave = self.vocoder.vocode_frames(self._frames[lo:hi])  # ((hi − lo) · hop,)
        hop = self.vocoder.samples_per_frame
        return wave[(first - lo) * hop : (last - lo) * hop].float().cpu().numpy()


# ---------------------------------------------------------------------------------------------------------
# Tiny random vocoder, in the release's exact format
# ---------------------------------------------------------------------------------------------------------

# The release topology (kernels, dilations, hop 320 = 20 ms at 16 kHz) at a width that runs fast on a CPU.
TINY_VOCODER_CONFIG: dict[str, Any] = {
    "resblock": "1",
    "upsample_rates": [5, 4, 4, 2, 2],
    "upsample_kernel_sizes": [11, 8, 8, 4, 4],
    "upsample_initial_channel": 32,
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "num_embeddings": 1000,
    "embedding_dim": 16,
    "model_in_dim": 16,
    "code_hop_size": 320,
    "segment_size": 8960,  # a training key, as in the release: kept, unused
    "f0": False,
    "dur_predictor_params": {
        "encoder_embed_dim": 16,
        "var_pred_hidden_dim": 16,
        "var_pred_kernel_size": 3,
        "var_pred_dropout": 0.5,
    },
    "sampling_rate": 16000,
}
# log(1 + frames) ≈ TINY_LOG_DUR_MEAN ± 2·TINY_LOG_DUR_STD over units: durations mostly 1–4 frames.
TINY_LOG_DUR_MEAN = 1.0
TINY_LOG_DUR_STD = 0.25
TINY_OUTPUT_GAIN = 0.5  # conv_post magnitude: output std ≈ 0.1, peaks below clipping


def build_tiny_vocoder(seed: int = 0, raw_config: Mapping[str, Any] = TINY_VOCODER_CONFIG) -> UnitVocoder:
    """An unfolded random vocoder (checkpoint layout) whose durations vary and whose output is not silent;
    at the tiny width unless `raw_config` (a vocoder config.json, e.g. the release's) says otherwise."""
    config = parse_vocoder_config(dict(raw_config), source="random vocoder config")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UnitVocoder(config)
    with torch.no_grad():
        _keep_signal_level(model)
        assert model.dur_predictor is not None
        # LayerNorm outputs have unit variance per position, so the projection's spread is ‖w‖.
        proj = model.dur_predictor.proj
        proj.weight.mul_(TINY_LOG_DUR_STD / proj.weight.norm())
        proj.bias.fill_(TINY_LOG_DUR_MEAN)
    return model.eval()


def _keep_signal_level(model: UnitVocoder) -> None:
    """Torch's default init shrinks the signal ~1000× over 5 levels and its biases leave only a DC offset."""
    for module in model.modules():
        if isinstance(module, _WeightNormed):
            module.weight_g.fill_(1.0)  # unit-norm rows keep the variance of a conv's input
            if module.bias is not None:
                module.bias.zero_()
    for up, rate in zip(model.ups, model.config.upsample_rates):
        up.weight_g.fill_(math.sqrt(rate))  # a transposed conv spreads each input over `rate` outputs
    model.conv_post.weight_g.fill_(TINY_OUTPUT_GAIN)


def save_fairseq_checkpoint(model: UnitVocoder, folder: Path) -> None:
    """Write config.json and g_00500000 as fairseq's download holds them (unfolded weights)."""
    if model.is_folded:
        raise ValueError("fairseq checkpoints store weight-normed convs; save the model before folding it")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # fileio's temporaries are dot-names: a half-written one never matches the `g_*` a reader looks for
    write_atomically(folder / CONFIG_FILE, lambda p: p.write_text(json.dumps(model.config.to_dict(), indent=2)))
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    write_atomically(folder / CHECKPOINT_FILE, lambda p: torch.save({GENERATOR_KEY: state}, p))


def write_tiny_vocoder(folder: Path, *, seed: int = 0, raw_config: Mapping[str, Any] = TINY_VOCODER_CONFIG) -> None:
    save_fairseq_checkpoint(build_tiny_vocoder(seed, raw_config), folder)
