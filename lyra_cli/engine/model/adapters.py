"""Multi-modality LoRA: one PEFT adapter per speech regime, each with its own speech projector.

Routing (docs/authors-behaviour.md#adapter-switch, issue #8 of the authors): text / image / video run on the plain LLM;
speech that fits one 30 s window uses `speech`; longer speech uses `long_speech`. Unlike the
authors' CLI, the choice is made again for every turn (their adapters stay disabled after round
one) and the projectors are never overwritten: each adapter keeps its own module.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from lyra_cli.engine.model.config import LyraConfig, read_json
from lyra_cli.errors import CheckpointError, MissingDependencyError

if TYPE_CHECKING:  # imported where adapters are loaded: `lyra info` only needs the folder names below
    import torch
    from torch import nn

    from lyra_cli.engine.model.network import LyraForCausalLM, SpeechProjector

log = logging.getLogger(__name__)


class Adapter(str, Enum):
    NONE = "none"
    SPEECH = "speech"
    LONG_SPEECH = "long_speech"


ADAPTER_DIRS: dict[Adapter, str] = {Adapter.SPEECH: "speech_lora", Adapter.LONG_SPEECH: "long_speech_lora"}
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
PROJECTOR_FILE = "non_lora_trainables.bin"
MERGED_KEY = "merged_adapter"  # config.json of a `lyra train merge` output: the adapter folded into the weights
ADAPTER_NAMES = {a.value for a in ADAPTER_DIRS}
PROJECTOR_KEY = "mm_speech_projector."
# PEFT prefixes saved keys with the wrapper path; our module tree starts at the inner model.
PEFT_KEY_PREFIX = "base_model.model."
# LoRA only ever targets the LLM decoder (the authors' suffix match also wrapped Whisper and the
# speech generator, with no weights there: numerically a no-op, so we leave those modules alone).
DECODER_TARGETS = r"model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"


def route(speech_windows: Iterable[int]) -> Adapter:
    """The adapter for a prompt holding speech clips of these window counts (none: no speech)."""
    counts = list(speech_windows)
    if not counts:
        return Adapter.NONE
    return Adapter.LONG_SPEECH if max(counts) > 1 else Adapter.SPEECH


@dataclass
class AdapterBank:
    """The adapters a model folder ships, and the speech projector to use with each."""

    available: tuple[Adapter, ...]
    projectors: dict[Adapter, SpeechProjector]
    active: Adapter = Adapter.NONE
    merged: Adapter | None = None  # `lyra train merge` folded this adapter into the decoder weights

    def projector(self, adapter: Adapter) -> SpeechProjector:
        return self.projectors.get(adapter, self.projectors[Adapter.NONE])


def projector_state(path: Path) -> dict[str, torch.Tensor]:
    """`non_lora_trainables.bin`: keys like `model.model.mm_speech_projector.linear1.weight` → `linear1.weight`."""
    import torch

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip or a pickle that needs code: never executed
        raise CheckpointError(f"`{path}` cannot be read safely ({exc.__class__.__name__})", "re-download it") from exc
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"`{path}` does not hold a dict of tensors", "re-download it, or re-export the adapter")
    state = {k.split(PROJECTOR_KEY, 1)[1]: v for k, v in raw.items() if PROJECTOR_KEY in k}
    if not state:
        raise CheckpointError(f"`{path}` holds no `{PROJECTOR_KEY}*` weights", "is it a Lyra adapter folder?")
    return state


def _load_projector(config: LyraConfig, like: SpeechProjector, path: Path) -> SpeechProjector:
    from lyra_cli.engine.model.network import SpeechProjector

    weight = like.linear1.weight
    projector = SpeechProjector(config.speech, config.text.hidden_size).to(device=weight.device, dtype=weight.dtype)
    state = projector_state(path)
    expected = set(projector.state_dict())
    if set(state) != expected:
        raise CheckpointError(
            f"`{path}` has projector keys {sorted(state)}, expected {sorted(expected)}", "re-download the adapter"
        )
    for key, tensor in state.items():
        want = tuple(projector.state_dict()[key].shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"`{path}`: `{key}` has shape {tuple(tensor.shape)}, the model needs {want}",
                                  "the adapter was trained for another model size: re-download it")  # fmt: skip
    projector.load_state_dict(state)
    return projector.eval()


def lora_state(folder: Path) -> dict[str, torch.Tensor]:
    """An adapter folder's LoRA weights with our module paths (`model.layers.0.self_attn.q_proj.lora_A.weight`)."""
    path = folder / ADAPTER_WEIGHTS_FILE
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "is missing"
        raise CheckpointError(f"`{path}` {what}", f"the `{folder.name}` adapter folder is incomplete")
    from lyra_cli.engine.model.checkpoint import load_safetensors

    state = load_safetensors(path)
    return {k.removeprefix(PEFT_KEY_PREFIX): v for k, v in state.items()}


@dataclass(frozen=True)
class LoraNumbers:
    """What `adapter_config.json` says about the LoRA's size and scaling."""

    r: int
    lora_alpha: float
    use_rslora: bool

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r**0.5 if self.use_rslora else self.lora_alpha / self.r


def lora_numbers(folder: Path) -> LoraNumbers:
    """r, lora_alpha and use_rslora of an adapter folder, checked (PEFT's defaults when absent)."""
    path = folder / ADAPTER_CONFIG_FILE
    cfg = read_json(path)
    try:
        numbers = LoraNumbers(int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8)), bool(cfg.get("use_rslora", False)))
    except (TypeError, ValueError):
        raise CheckpointError(f"`{path}`: `r` and `lora_alpha` must be numbers, got `{cfg.get('r')}` and "
                              f"`{cfg.get('lora_alpha')}`", "re-download or re-export the adapter") from None  # fmt: skip
    if numbers.r < 1:
        raise CheckpointError(f"`{path}`: `r` must be ≥ 1, got `{numbers.r}`", "re-download or re-export the adapter")
    return numbers


def _check_lora_shapes(model: nn.Module, folder: Path, state: dict[str, torch.Tensor], adapter: Adapter) -> None:
    """Weights whose shape disagrees with adapter_config.json (usually its `r`) name the key, not PyTorch's dump."""
    params = dict(model.named_parameters())
    for key, tensor in state.items():
        for part in (".lora_A", ".lora_B"):
            name = key.replace(f"{part}.", f"{part}.{adapter.value}.", 1) if part in key else None
            if name in params and tuple(params[name].shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"adapter `{folder.name}`: `{key}` has shape {tuple(tensor.shape)}, its adapter_config.json "
                    f"gives {tuple(params[name].shape)}",
                    "the adapter's config and weights disagree (check `r`): re-download or re-export it",
                )


def _inject(model: LyraForCausalLM, folder: Path, adapter: Adapter, dtype: torch.dtype) -> None:
    try:
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    except ImportError as exc:
        raise MissingDependencyError("peft", "LoRA adapters") from exc
    numbers = lora_numbers(folder)
    lora = LoraConfig(
        r=numbers.r,
        lora_alpha=numbers.lora_alpha,
        lora_dropout=0.0,  # inference only; dropout is a training concern
        target_modules=DECODER_TARGETS,
        use_rslora=numbers.use_rslora,
        bias="none",
    )
    with warnings.catch_warnings():
        # PEFT warns when a second adapter joins the first: that is exactly the multi-adapter design
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        inject_adapter_in_model(lora, model, adapter_name=adapter.value)
    state = lora_state(folder)
    _check_lora_shapes(model, folder, state, adapter)
    result = set_peft_model_state_dict(model, state, adapter_name=adapter.value)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    missing = [k for k in result.missing_keys if f".{adapter.value}." in k and "lora_" in k]
    if unexpected or missing:
        raise CheckpointError(
            f"adapter `{folder.name}` does not fit this model: {len(missing)} missing, {len(unexpected)} unexpected LoRA weights",
            f"e.g. `{(missing or unexpected)[0]}`; was it trained on this base model?",
        )
    for name, param in model.named_parameters():
        if f".{adapter.value}." in name and "lora_" in name:
            param.data = param.data.to(dtype)


def load_adapters(model: LyraForCausalLM, model_dir: Path, config: LyraConfig, dtype: torch.dtype) -> AdapterBank:
    """Inject every adapter folder present and load its projector; none active afterwards."""
    base = model.model.mm_speech_projector
    projectors: dict[Adapter, SpeechProjector] = {Adapter.NONE: base} if base is not None else {}
    available = []
    for adapter, dirname in ADAPTER_DIRS.items():
        folder = model_dir / dirname
        if not folder.is_dir():
            log.info("no `%s` folder: the %s adapter is unavailable", dirname, adapter.value)
            continue
        _inject(model, folder, adapter, dtype)
        if base is not None and (folder / PROJECTOR_FILE).is_file():
            projectors[adapter] = _load_projector(config, base, folder / PROJECTOR_FILE)
        available.append(adapter)
    merged = config.raw.get(MERGED_KEY)
    bank = AdapterBank(tuple(available), projectors, merged=Adapter(merged) if merged in ADAPTER_NAMES else None)
    activate(model, bank, Adapter.NONE)
    return bank


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def activate(model: nn.Module, bank: AdapterBank, adapter: Adapter) -> Adapter:
    """Switch the LoRA layers to `adapter` (or off). Falls back to no adapter when it is not shipped."""
    if adapter is not Adapter.NONE and adapter not in bank.available:
        if adapter is not bank.merged:  # a merged adapter is the plain weights now: nothing to switch
            log.warning("the %s adapter is not in this model folder; using the plain LLM", adapter.value)
        adapter = Adapter.NONE
    for layer in _tuner_layers(model):
        if adapter is Adapter.NONE:
            layer.enable_adapters(False)
        else:
            layer.enable_adapters(True)
            layer.set_adapter(adapter.value)
    bank.active = adapter
    return adapter
