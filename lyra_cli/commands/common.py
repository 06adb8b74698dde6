"""Options and steps shared by the commands that load a model. Imports no torch at module level."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from lyra_cli.engine.model.resolve import TINY  # light: no torch
from lyra_cli.errors import UsageError

if TYPE_CHECKING:
    from lyra_cli.audio.frontend import AudioFrontEnd
    from lyra_cli.engine.model.config import ExtractorConfig
    from lyra_cli.engine.model.loader import LoadedModel
    from lyra_cli.engine.model.runtime import RuntimeRequest
    from lyra_cli.engine.model.towers import TowerOverrides
    from lyra_cli.engine.run.generate import SamplingConfig

# Said when --extract (or the config's extractor) had nothing to drop in a prompt: the authors keep ≥ 32 tokens.
NOTHING_DROPPED = ("the extractor dropped nothing: this prompt has too few image/speech tokens "
                   "(it always keeps at least 32)")  # fmt: skip
# The raw arguments of this invocation, set by `lyra_cli.main.run`: typer groups repeated options
# per flag, and `chat` needs their command-line order.
ARGV: list[str] = []

ModelOption = typer.Option(
    TINY, "--model", "-m", help="Model folder in the Lyra release layout, or `tiny` for a small random model."
)
VisionTowerOption = typer.Option(
    None, "--vision-tower",
    help="ViT folder (config.json + preprocessor_config.json); default: `mm_vision_tower` from config.json, looked up "
         "in the working directory, the model folder, then its parents.",
)  # fmt: skip
SpeechTowerOption = typer.Option(
    None, "--speech-tower",
    help="Whisper folder (config.json); default: `mm_speech_tower` from config.json, looked up as for --vision-tower.",
)  # fmt: skip
DeviceOption = typer.Option("auto", "--device", help="auto | cpu | cuda | mps.")
DtypeOption = typer.Option("auto", "--dtype", help="auto | bf16 | fp16 | fp32 (auto: bf16 on CUDA, fp32 on CPU).")
Load8bitOption = typer.Option(False, "--load-8bit", help="Load the decoder's linear layers in 8-bit (bitsandbytes).")
Load4bitOption = typer.Option(
    False, "--load-4bit", help="Load the decoder's linear layers in 4-bit NF4 with double quantization (bitsandbytes)."
)
DeviceMapOption = typer.Option(
    "none", "--device-map", help="auto: spread the layers over all GPUs, then the CPU, for a model one GPU cannot hold."
)
MaxMemoryOption = typer.Option(
    None, "--max-memory", help="With --device-map auto: weights per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB."
)
TemperatureOption = typer.Option(None, "--temperature", help="0 = greedy. Default: the model's generation_config.")
TopPOption = typer.Option(None, "--top-p", help="Nucleus sampling mass (with --temperature > 0).")
TopKOption = typer.Option(None, "--top-k", help="Sample among the k most likely tokens (0 = off).")
RepetitionOption = typer.Option(None, "--repetition-penalty", help="1 = off. Default: the model's generation_config.")
MaxNewTokensOption = typer.Option(None, "--max-new-tokens", help="Most tokens to generate per answer (default 512).")
OverwriteOption = typer.Option(
    False, "--overwrite", help="Replace existing output files that lyra did not write (refused otherwise)."
)
SeedOption = typer.Option(None, "--seed", help="Random seed for sampling (answers repeat with the same seed).")
LogprobsOption = typer.Option(
    None, "--logprobs", help="Log-probability of each generated token and its N most likely alternatives (0..20; "
    "0 = the chosen token's only), as OpenAI reports them: after the repetition penalty, before temperature and "
    "top-k/top-p. With --json in each record's `logprobs`; otherwise a table on stderr (shown even with --quiet)."
)
OfficialAudioOption = typer.Option(
    False, "--official-audio",
    help="The authors' audio front end: channel 0 instead of the channel mean, and torchaudio's default "
    "windowed-sinc resampling instead of soxr (the audio part of the official pipeline; windowing is "
    "--official-windows where a command has it).",
)  # fmt: skip


def flag_for(setting: str) -> str:
    """The command-line flag of an engine setting named in an error: `max_memory` → `--max-memory`.

    Every setting the engine names (errors.setting) has the flag of its name, dashed."""
    return "--" + setting.replace("_", "-")


def announce_front_end(front_end: "AudioFrontEnd", quiet: bool) -> None:
    """Say in the header when the authors' front end is on: the tokens differ from a default run's."""
    from lyra_cli.console import info

    if front_end.is_official and not quiet:
        info(f"audio front end: {front_end.describe()}")


def tower_overrides(vision: Path | None, speech: Path | None, vocoder: Path | None = None) -> "TowerOverrides":
    """`--vision-tower` / `--speech-tower` / `--vocoder`, checked before any weights load."""
    from lyra_cli.engine.model.towers import TowerOverrides

    overrides = TowerOverrides(vision=vision, speech=speech, vocoder=vocoder)
    overrides.check()
    return overrides


def extractor_for(spec: str | None, model_dir: Path) -> "ExtractorConfig | None":
    """`--extract BLOCKSxRATIO` for this model (read from its config, no weights), else the config's own."""
    from lyra_cli.engine.model.config import load_config
    from lyra_cli.engine.run.extractor import parse_extract

    config = load_config(model_dir)
    if spec is not None:
        return parse_extract(spec, config.text.num_layers)
    return config.extractor if config.extractor.enabled else None


def runtime_request(
    device: str,
    dtype: str,
    load_8bit: bool,
    load_4bit: bool,
    device_map: str = "none",
    max_memory: str | None = None,
) -> "RuntimeRequest":
    from lyra_cli.engine.model.runtime import RuntimeRequest

    if load_8bit and load_4bit:
        raise UsageError("--load-8bit and --load-4bit exclude each other", "pick one")
    quantization = "8bit" if load_8bit else "4bit" if load_4bit else "none"
    request = RuntimeRequest(device, dtype, quantization, device_map, max_memory)
    request.validate()
    return request


def sampling_config(defaults: "SamplingConfig", **overrides: Any) -> "SamplingConfig":
    """The model's generation_config defaults with every flag the user gave on top."""
    given = {k: v for k, v in overrides.items() if v is not None}
    config = replace(defaults, **given)
    config.validate()
    return config


def check_sampling_flags(flags: dict[str, Any]) -> None:
    """Validate the sampling flags on their own, before any weights load."""
    from lyra_cli.engine.run.generate import SamplingConfig

    sampling_config(SamplingConfig(), **flags)


def header_lines(loaded: "LoadedModel", model_spec: str) -> list[str]:
    runtime = loaded.runtime
    name = "tiny (random weights: answers are noise)" if model_spec == TINY else str(loaded.model_dir)
    lines = [f"lyra · model {name} · loaded in {loaded.load_s:.1f}s", f"runtime {runtime.describe()}"]
    lines += [f"  {reason}" for reason in runtime.reasons]
    if loaded.placement.spread:
        lines.append(f"  placement {loaded.placement.describe()}")
    if runtime.quantization != "none":
        from lyra_cli.engine.model.quant import describe_quantization

        lines.append(f"  {describe_quantization(runtime.quantization, runtime.dtype)}")  # type: ignore[arg-type]
    lines += loaded.sources.lines()  # where each tower, the processor settings and the vocoder came from
    lines.append(adapter_line(loaded.adapters))
    return lines


def adapter_line(bank: Any) -> str:
    """What the header says about adapters: the one merged into the weights (`lyra train merge`) if any, and
    the switchable ones, chosen per turn."""
    switchable = ", ".join(a.value for a in bank.available if a is not bank.merged)
    per_turn = (f"adapters {switchable or 'none'} (chosen per turn: none for text/image/video, speech ≤ 30 s, "
                "long_speech beyond)")  # fmt: skip
    if bank.merged is None:
        return per_turn
    merged = f"adapter merged into the weights: {bank.merged.value} (used for every turn)"
    return f"{merged} · {per_turn}" if switchable else merged
