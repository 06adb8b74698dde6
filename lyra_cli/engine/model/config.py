"""Typed configuration of a Lyra checkpoint, parsed once from the release `config.json` (and the decoding
defaults of its `generation_config.json`: `SamplingConfig`).

One frozen dataclass per component, composed into `LyraConfig`. Keys we do not use are kept in
`LyraConfig.extra` so a config can be written back unchanged; they are logged, never fatal.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lyra_cli.errors import CheckpointError, UsageError, setting

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# model_type values of the three official classes; all share one layout (docs/release-format.md#model-classes).
LYRA_MODEL_TYPES = ("Lyra_Qwen2VL", "Lyra_Qwen2VL_Extractor", "Lyra_Qwen2VL_SpeechGenerator")
DEFAULT_MROPE_SECTION = (16, 24, 24)
# The extractor is off in every released config: one "block" longer than the model.
EXTRACTOR_OFF_GAP = 33
# Hidden width of the concat-5 speech projector (`linear1` out, `linear2` in) in every release.
SPEECH_PROJECTOR_HIDDEN = 2048


@dataclass(frozen=True)
class TextModelConfig:
    """The Qwen2-VL language model (decoder) hyper-parameters."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = DEFAULT_MROPE_SECTION
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"inconsistent attention shape: hidden `{self.hidden_size}`, heads `{self.num_heads}`, "
                f"kv heads `{self.num_kv_heads}`",
                "hidden_size must divide by num_attention_heads, and heads by num_key_value_heads",
            )
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise CheckpointError(
                f"mrope_section `{list(self.mrope_section)}` does not cover head_dim `{self.head_dim}`",
                "the three sections must sum to head_dim / 2",
            )


@dataclass(frozen=True)
class SpeechConfig:
    """Speech input side: Whisper tower location and the concat-k MLP projector."""

    tower: str  # `mm_speech_tower`, a path (relative ones are found as towers.py describes)
    projector_type: str = "simple_mlp"
    ds_rate: int = 5  # `speech_encoder_ds_rate`: encoder frames concatenated per token
    encoder_hidden_size: int = 1280  # `speech_encoder_hidden_size`
    projector_hidden: int = SPEECH_PROJECTOR_HIDDEN
    speech_norm: bool = False


@dataclass(frozen=True)
class VisionConfig:
    """Vision side: the Qwen2-VL ViT (with merger) and its image processor."""

    tower: str  # `mm_vision_tower`
    tower_config: dict[str, Any]  # Qwen2-VL `vision_config`, passed to transformers as-is
    projector_type: str = "identity"


@dataclass(frozen=True)
class ExtractorConfig:
    """Latent multi-modality extractor (docs/authors-behaviour.md#latent-multi-modality-extractor): off when
    `keep_rate >= 1`."""

    compress_gap: int = EXTRACTOR_OFF_GAP
    keep_rate: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.keep_rate < 1.0


@dataclass(frozen=True)
class SpeechGeneratorConfig:
    """CTC speech generator: `ctc_decoder_config` "(layers,dims,heads,inter)" parsed once."""

    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    upsample_factor: int = 25
    unit_vocab_size: int = 1000

    @classmethod
    def parse(cls, spec: str, upsample_factor: int, unit_vocab_size: int) -> "SpeechGeneratorConfig":
        numbers = [int(n) for n in re.findall(r"\d+", spec)]
        if len(numbers) != 4:
            raise CheckpointError(
                f"cannot parse ctc_decoder_config `{spec}`", 'expected "(layers,dims,heads,intermediate)"'
            )
        return cls(*numbers, upsample_factor=upsample_factor, unit_vocab_size=unit_vocab_size)


@dataclass(frozen=True)
class LyraConfig:
    model_type: str
    text: TextModelConfig
    speech: SpeechConfig | None
    vision: VisionConfig | None
    extractor: ExtractorConfig
    speech_generator: SpeechGeneratorConfig | None
    max_length: int | None  # `tokenizer_model_max_length`: the official silent truncation limit
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


_TEXT_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "max_position_embeddings", "tie_word_embeddings",
}  # fmt: skip
_KNOWN_KEYS = _TEXT_KEYS | {
    "model_type", "mm_vision_tower", "mm_speech_tower", "mm_projector_type", "mm_speech_projector_type",
    "speech_encoder_ds_rate", "speech_encoder_hidden_size", "speech_norm", "vision_config", "compress_gap",
    "keep_rate", "speech_generator_type", "ctc_decoder_config", "ctc_upsample_factor", "unit_vocab_size", "ctc_loss_weight",
    "tokenizer_model_max_length", "text_config", "merged_adapter",
}  # fmt: skip


def _mrope_section(raw: dict[str, Any]) -> tuple[int, int, int]:
    for key in ("rope_parameters", "rope_scaling"):
        section = (raw.get(key) or {}).get("mrope_section")
        if section:
            return tuple(int(s) for s in section)  # type: ignore[return-value]
    return DEFAULT_MROPE_SECTION


def _rope_theta(raw: dict[str, Any]) -> float:
    theta = raw.get("rope_theta") or (raw.get("rope_parameters") or {}).get("rope_theta")
    return float(theta or 1_000_000.0)


def parse_text_config(raw: dict[str, Any]) -> TextModelConfig:
    # transformers >= 4.52 may nest the language model under `text_config`; the release is flat.
    src = {**raw, **(raw.get("text_config") or {})}
    try:
        return TextModelConfig(
            vocab_size=int(src["vocab_size"]),
            hidden_size=int(src["hidden_size"]),
            intermediate_size=int(src["intermediate_size"]),
            num_layers=int(src["num_hidden_layers"]),
            num_heads=int(src["num_attention_heads"]),
            num_kv_heads=int(src.get("num_key_value_heads") or src["num_attention_heads"]),
            rms_norm_eps=float(src.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(src),
            mrope_section=_mrope_section(src),
            max_position_embeddings=int(src.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(src.get("tie_word_embeddings", False)),
        )
    except KeyError as exc:
        raise CheckpointError(f"config.json lacks `{exc.args[0]}`", "is this a Lyra / Qwen2-VL model folder?") from exc


def _speech_config(raw: dict[str, Any]) -> SpeechConfig | None:
    if not raw.get("mm_speech_tower"):
        return None
    return SpeechConfig(
        tower=str(raw["mm_speech_tower"]),
        projector_type=str(raw.get("mm_speech_projector_type", "simple_mlp")),
        ds_rate=int(raw.get("speech_encoder_ds_rate", 5)),
        encoder_hidden_size=int(raw.get("speech_encoder_hidden_size", 1280)),
        speech_norm=bool(raw.get("speech_norm", False)),
    )


def _vision_config(raw: dict[str, Any]) -> VisionConfig | None:
    if not raw.get("mm_vision_tower"):
        return None
    return VisionConfig(
        tower=str(raw["mm_vision_tower"]),
        tower_config=dict(raw.get("vision_config") or {}),
        projector_type=str(raw.get("mm_projector_type", "identity")),
    )


def _generator_config(raw: dict[str, Any]) -> SpeechGeneratorConfig | None:
    if raw.get("speech_generator_type") != "ctc" or not raw.get("ctc_decoder_config"):
        return None
    return SpeechGeneratorConfig.parse(
        str(raw["ctc_decoder_config"]),
        upsample_factor=int(raw.get("ctc_upsample_factor", 25)),
        unit_vocab_size=int(raw.get("unit_vocab_size", 1000)),
    )


def parse_config(raw: dict[str, Any]) -> LyraConfig:
    model_type = str(raw.get("model_type", ""))
    if model_type not in LYRA_MODEL_TYPES:
        raise CheckpointError(
            f"config.json has model_type `{model_type}`, not a Lyra model",
            f"expected one of {', '.join(LYRA_MODEL_TYPES)}",
        )
    unknown = sorted(set(raw) - _KNOWN_KEYS)
    log.debug("config keys kept but unused: %s", ", ".join(unknown))
    max_length = raw.get("tokenizer_model_max_length")
    return LyraConfig(
        model_type=model_type,
        text=parse_text_config(raw),
        speech=_speech_config(raw),
        vision=_vision_config(raw),
        extractor=ExtractorConfig(
            compress_gap=int(raw.get("compress_gap", EXTRACTOR_OFF_GAP)), keep_rate=float(raw.get("keep_rate", 1.0))
        ),
        speech_generator=_generator_config(raw),
        max_length=int(max_length) if max_length else None,
        raw=raw,
    )


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from a model folder, with a `CheckpointError` when it is missing or broken."""
    if path.is_dir():
        raise CheckpointError(f"`{path}` is a folder, not a JSON file", "re-download or re-export the model")
    if not path.is_file():
        raise CheckpointError(f"`{path}` is missing", f"point {setting('model')} at a folder in the Lyra release layout")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as exc:
        raise CheckpointError(f"`{path}` is not valid JSON ({exc})", "re-download or re-export the model") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"`{path}` does not hold a JSON object", "re-download or re-export the model")
    return data


def load_config(model_dir: Path) -> LyraConfig:
    return parse_config(read_json(model_dir / CONFIG_FILE))


# ---------------------------------------------------------------------------------------------------
# generation_config.json: the decoding defaults

DEFAULT_MAX_NEW_TOKENS = 512
MAX_LOGPROBS = 20  # alternatives per token at most, as OpenAI's `top_logprobs`


@dataclass(frozen=True)
class SamplingConfig:
    """Greedy when `temperature == 0` (the default); otherwise temperature / top-k / top-p sampling."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int | None = None
    # None: no log-probabilities (nothing computed); N: the chosen token's and the N most likely ones'
    logprobs: int | None = None

    def validate(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature", "must be ≥ 0 (0 = greedy)"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be ≥ 0 (0 = off)"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0 (1 = off)"),
            (self.max_new_tokens >= 1, "max_new_tokens", "must be ≥ 1"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
             f"must be 0..{MAX_LOGPROBS} (alternatives per token; 0 = the chosen token's only)"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise UsageError(f"bad {setting(name)} value `{getattr(self, name)}`", f"{setting(name)} {rule}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def sampling_from_generation_config(gen: dict[str, Any]) -> SamplingConfig:
    """The checkpoint's `generation_config.json` as our defaults (flags override them).

    The release's file turns sampling on with `top_k: 1`, which is greedy in effect; we keep that
    meaning exactly, and its `repetition_penalty` applies as it does for the authors."""
    base = SamplingConfig()
    sample = bool(gen.get("do_sample", False))
    return replace(
        base,
        temperature=float(gen.get("temperature", 1.0)) if sample else 0.0,
        top_p=float(gen.get("top_p", 1.0)) if sample else 1.0,
        top_k=int(gen.get("top_k", 0) or 0) if sample else 0,
        repetition_penalty=float(gen.get("repetition_penalty", 1.0)),
        max_new_tokens=int(gen.get("max_new_tokens", base.max_new_tokens)),
    )
