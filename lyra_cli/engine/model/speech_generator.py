"""Speech output: the CTC speech generator and its incremental unit stream (docs/authors-behaviour.md#speech-generator).

    LLM final-norm hidden states (n, H)        the states that predicted each generated token
    -> input_proj                  (n, D)
    -> repeat each state ×25       (25n, D)    frame t takes state ⌊t / 25⌋, position t
    -> causal Qwen2 decoder layers (25n, D)    1-D RoPE, θ inherited from the LLM config
    -> output_proj                 (25n, U+1)  U = 1000 mHuBERT units, blank = U
    -> argmax per frame -> CTC collapse (drop repeats, then blanks) -> units for the vocoder

There is no final norm: LLaMA-Omni's `SpeechGeneratorCTC`, which Lyra copies with Qwen2 layers, feeds the
last decoder layer straight into `output_proj`.

The authors stream by re-running the generator on the whole prefix at every decoding step (O(n²)); since
attention is causal, earlier frames never change. `UnitStream` keeps the generator's keys and values instead
and computes only the 25 new frames per new state, with the same units.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lyra_cli.engine.model import checkpoint as ckpt
from lyra_cli.engine.model.config import LyraConfig, SpeechGeneratorConfig, TextModelConfig
from lyra_cli.engine.model.kvcache import KVCache
from lyra_cli.engine.model.network import N_ROPE_AXES, DecoderLayer, MRoPE
from lyra_cli.errors import CheckpointError

log = logging.getLogger(__name__)

# Inherited unchanged from the Qwen2-VL LLM config by the authors' deepcopy
# (docs/authors-behaviour.md#speech-generator).
GENERATOR_RMS_EPS = 1e-6
# `previous` label meaning "nothing came before": no real label is negative.
NO_PREVIOUS = -1


# ---------------------------------------------------------------------------------------------- CTC


def ctc_collapse(frames: Sequence[int] | Tensor, blank: int, previous: int | None = None) -> list[int]:
    """Greedy CTC decoding of per-frame labels: drop consecutive repeats, then blanks.

    `previous` is the last raw label of the preceding chunk, so collapsing chunk by chunk gives the same
    units as collapsing the whole sequence (a unit that continues across the boundary is not repeated,
    and one that resumes after a blank is).
    """
    labels = torch.as_tensor(frames, dtype=torch.long).flatten().cpu()  # (T,)
    first = torch.tensor([NO_PREVIOUS if previous is None else previous])
    before = torch.cat([first, labels[:-1]])  # (T,): each frame's predecessor
    keep = (labels != before) & (labels != blank)
    return labels[keep].tolist()


# ---------------------------------------------------------------------------------------------- model


def decoder_config(config: SpeechGeneratorConfig, rope_theta: float) -> TextModelConfig:
    """The generator's layers as a Qwen2 decoder config: no GQA, the LLM's θ and norm eps.

    Every rotary frequency follows the first position row: with the three identical rows we pass, M-RoPE
    is then ordinary 1-D RoPE, as tf-4.45 turns the inherited `mrope` scaling into `default`.
    """
    head_dim = config.hidden_size // config.num_heads
    return TextModelConfig(
        vocab_size=config.unit_vocab_size + 1,  # unused by the layers; the output classes
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        num_kv_heads=config.num_heads,
        rms_norm_eps=GENERATOR_RMS_EPS,
        rope_theta=rope_theta,
        mrope_section=(head_dim // 2, 0, 0),
    )


class SpeechGenerator(nn.Module):
    """`speech_generator.*` of the checkpoint: input_proj, causal Qwen2 layers, output_proj (no final norm).

    Its own state-dict keys carry no `speech_generator.` prefix.
    """

    def __init__(self, config: SpeechGeneratorConfig, llm_hidden: int, rope_theta: float) -> None:
        super().__init__()
        self.config = config
        self.layer_config = decoder_config(config, rope_theta)
        self.input_proj = nn.Linear(llm_hidden, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(self.layer_config, i) for i in range(config.num_layers))
        self.output_proj = nn.Linear(config.hidden_size, config.unit_vocab_size + 1)
        self.rotary = MRoPE(self.layer_config)  # non-persistent buffers: no checkpoint keys

    @property
    def blank(self) -> int:
        """The CTC blank class: the one after the last unit."""
        return self.config.unit_vocab_size

    def forward_frames(self, hidden: Tensor, first_frame: int = 0, cache: KVCache | None = None) -> Tensor:
        """hidden (k, H) -> logits (k·25, U+1) of frames first_frame … first_frame + 25k - 1.

        With a cache, the new frames attend to every frame cached before them and are appended to it.
        """
        x = self.input_proj(hidden.to(self.input_proj.weight.dtype))  # (k, D): project before repeating, 25× less work
        x = x.repeat_interleave(self.config.upsample_factor, dim=0)[None]  # (1, T, D), frame t ← state ⌊t/25⌋
        n_frames = x.shape[1]
        positions = torch.arange(first_frame, first_frame + n_frames, device=x.device)
        rope = self.rotary(positions.expand(N_ROPE_AXES, 1, n_frames), x.dtype)  # (1, T, hs) each
        for layer in self.layers:
            x = layer(x, rope, cache)  # causal over all frames so far
        return self.output_proj(x)[0]  # (T, U+1)

    def forward_offline(self, hidden: Tensor) -> Tensor:
        """All states at once, as the official `predict`: hidden (n, H) -> logits (n·25, U+1)."""
        return self.forward_frames(hidden)

    @torch.inference_mode()
    def predict_units(self, hidden: Tensor) -> list[int]:
        """The offline reference: hidden (n, H) -> collapsed units."""
        if hidden.shape[0] == 0:
            return []
        return ctc_collapse(self.forward_offline(hidden).argmax(-1), self.blank)


# ---------------------------------------------------------------------------------------------- streaming


class UnitStream:
    """Units of a growing sequence of LLM states, each state's 25 frames computed once.

    State: the generator's KV cache over every frame so far, the next frame position, and the last raw
    frame label (so collapsing across pushes equals collapsing the whole sequence). The concatenation of
    all pushes equals `SpeechGenerator.predict_units` of all states.
    """

    def __init__(self, generator: SpeechGenerator, *, expected_states: int = 0) -> None:
        self.generator = generator
        # Reserving the expected frames up front avoids regrowing (copying) the cache mid-answer. The release
        # generator keeps ~0.8 MB of bf16 keys/values per state (2 layers × k,v × 4096 × 25 frames), so
        # reserve for the expected answer, not for a generous max_new_tokens: growth is amortised anyway.
        self.cache = KVCache(len(generator.layers), expected_states * generator.config.upsample_factor)
        self.n_frames = 0
        self.last_label: int | None = None

    @torch.inference_mode()
    def push(self, hidden: Tensor) -> list[int]:
        """hidden (H,) or (k, H): the next state(s) -> the units they newly emit (possibly none)."""
        states = hidden.reshape(-1, hidden.shape[-1])  # (k, H)
        if states.shape[0] == 0:
            return []
        labels = self.generator.forward_frames(states, self.n_frames, self.cache).argmax(-1)  # (25k,)
        units = ctc_collapse(labels, self.generator.blank, previous=self.last_label)
        self.n_frames += labels.shape[0]
        self.last_label = int(labels[-1])
        return units


# ---------------------------------------------------------------------------------------------- loading


def _generator_source(model_dir: Path) -> ckpt.WeightSource:
    """`speech_generator.*` keys: from the dedicated file first, then from the main shards if they map any.

    The dedicated file's keys are taken with or without the `speech_generator.` prefix (the release file's
    naming is unverified, docs/release-format.md#speech-generator-file); the file name already says what they belong to.
    """
    source = ckpt.WeightSource()
    dedicated = model_dir / ckpt.SPEECH_GENERATOR_FILE
    if dedicated.is_file():
        for stored in ckpt.file_keys(dedicated):  # an unreadable file becomes a CheckpointError there
            key = stored if stored.startswith(ckpt.GENERATOR_PREFIX) else ckpt.GENERATOR_PREFIX + stored
            source.add(key, dedicated, stored)
    shards = ckpt.weight_files(model_dir) or {}  # an edited index may map the keys into the main shards
    for key, path in shards.items():
        if key.startswith(ckpt.GENERATOR_PREFIX) and path.is_file():
            source.add(key, path, key)
    return source


def load_speech_generator(
    model_dir: Path, config: LyraConfig, *, device: torch.device | str, dtype: torch.dtype
) -> SpeechGenerator | None:
    """The speech generator of a release folder, every weight loaded; None when the config declares none.

    Raises `CheckpointError` when the config declares one but its weights are absent, or when any weight is
    missing or mis-shaped (named in the message); unused `speech_generator.*` keys are logged.
    """
    spec = config.speech_generator
    if spec is None:
        return None
    source = _generator_source(model_dir)
    if not source.locations:
        raise CheckpointError(
            f"config.json declares a speech generator but `{model_dir / ckpt.SPEECH_GENERATOR_FILE}` is missing",
            f"download `{ckpt.SPEECH_GENERATOR_FILE}` of this release into the model folder",
        )
    generator = ckpt.build_empty(lambda: SpeechGenerator(spec, config.text.hidden_size, config.text.rope_theta))
    # Loaded under its checkpoint name, so errors name the keys as they appear in the files.
    holder = nn.ModuleDict({ckpt.GENERATOR_PREFIX.rstrip("."): generator})
    report = ckpt.load_weights(holder, source, device_for=lambda _: device, dtype=dtype)
    log.info("speech generator: %d weights loaded from `%s`", report.loaded, model_dir)
    generator.to(device)  # the rotary buffers were built on the CPU
    return generator.eval().requires_grad_(False)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- tiny model

RELEASE_UNIT_VOCAB_SIZE = 1000  # mHuBERT k-means units: the tiny keeps it so the real vocoder vocabulary fits
RELEASE_UPSAMPLE_FACTOR = 25
TINY_GENERATOR_SHAPE = (2, 64, 4, 128)  # layers, dims, heads (head_dim 16), intermediate
TINY_INIT_STD = 0.1
# Attention weights scaled up so the mix of earlier and current states shifts audibly across a state's
# 25 frames (identical frames attending to each other would all get the same label).
TINY_QK_STD = 1.0
TINY_NONBLANK_FRACTION = 0.8  # dense enough for ~3 units per token, so answers stream audio early
TINY_CALIBRATION_STATES = 48


def tiny_generator_config() -> dict[str, Any]:
    """The config.json keys that declare the tiny speech generator (docs/release-format.md#config-keys)."""
    layers, dims, heads, inter = TINY_GENERATOR_SHAPE
    return {
        "speech_generator_type": "ctc",
        "ctc_decoder_config": f"({layers},{dims},{heads},{inter})",
        "ctc_upsample_factor": RELEASE_UPSAMPLE_FACTOR,
        "ctc_loss_weight": 1.0,
        "unit_vocab_size": RELEASE_UNIT_VOCAB_SIZE,
    }


def _tiny_config() -> SpeechGeneratorConfig:
    raw = tiny_generator_config()
    return SpeechGeneratorConfig.parse(raw["ctc_decoder_config"], raw["ctc_upsample_factor"], raw["unit_vocab_size"])


def _randomize_(generator: SpeechGenerator, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in generator.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.copy_(TINY_QK_STD * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(TINY_INIT_STD * torch.randn(p.shape, generator=gen))
            p.copy_(p.to(torch.bfloat16))  # calibrate on the weights as they will be stored


def _calibrate_blank_(generator: SpeechGenerator, gen: torch.Generator) -> None:
    """Bias the blank class so about `TINY_NONBLANK_FRACTION` of frames on final-normed states are units."""
    states = torch.randn(TINY_CALIBRATION_STATES, generator.input_proj.in_features, generator=gen)  # RMS ≈ 1
    with torch.no_grad():
        bias = generator.output_proj.bias
        bias[generator.blank] = 0.0
        logits = generator.forward_offline(states)  # (T, U+1)
        margin = logits[:, : generator.blank].max(-1).values - logits[:, generator.blank]  # (T,)
        # Blank wins a frame when its bias exceeds that frame's margin.
        bias[generator.blank] = torch.quantile(margin, 1 - TINY_NONBLANK_FRACTION).to(torch.bfloat16).float()


def write_tiny_speech_generator(out_dir: Path, llm_hidden: int, rope_theta: float, *, seed: int) -> None:
    """Write `speech_generator.safetensors` (bf16, `speech_generator.*` keys) for the tiny checkpoint."""
    gen = torch.Generator().manual_seed(seed)
    generator = SpeechGenerator(_tiny_config(), llm_hidden, rope_theta)
    _randomize_(generator, gen)
    _calibrate_blank_(generator, gen)
    state = {ckpt.GENERATOR_PREFIX + k: v.to(torch.bfloat16).contiguous() for k, v in generator.state_dict().items()}
    save_file(state, str(out_dir / ckpt.SPEECH_GENERATOR_FILE), metadata={"format": "pt"})
