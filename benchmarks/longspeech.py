"""Long speech (the tiny model, or --model DIR): time and memory against recording length, and the cache's effect.

For each duration (default 10, 30, 60, 120 minutes) a recording is built from the real clips in
../shared/data/real (tiled, with pauses, written as 16 kHz FLAC), then a fresh process:
  1. loads the tiny model,
  2. asks a first question (decode + encode + prefill + 8 new tokens), with an empty speech-token cache,
  3. asks a second question about the same file (cache hit: no decoding or encoding).
Each process reports wall times and the growth of its peak RSS during the audio stage (decode + encode),
which must not grow with the duration. Prompts above the tiny model's 32,768 positions use the extractor
(`--extract`, default 2x0.5: one drop, halfway through the tiny model's layers), as a user must.

    python benchmarks/longspeech.py                      # all durations (~5 min on 2 CPU cores)
    python benchmarks/longspeech.py --minutes 10 30      # a subset
    python benchmarks/longspeech.py --model DIR --device cuda --minutes 60 --extract 4x0.7   # a release-size model

Prints a table and writes JSON (default benchmarks/results/longspeech.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "data" / "real"
CLIPS = ("jfk.flac", "extreme_ironing.mp3", "Hi.mp3", "movement.mp3", "Chinese_painting.mp3", "pred_round0.wav")
PAUSE_S = 0.5
NEW_TOKENS = 8
CHUNK_TOKENS = 8192


def build_recording(path: Path, minutes: float) -> None:
    import soundfile as sf

    from lyra_cli.audio.io import SAMPLE_RATE_HZ, load_audio

    pause = np.zeros(int(PAUSE_S * SAMPLE_RATE_HZ), dtype=np.float32)
    cycle = np.concatenate([x for name in CLIPS for x in (load_audio(REAL / name), pause)])
    total = int(minutes * 60 * SAMPLE_RATE_HZ)
    with sf.SoundFile(path, "w", samplerate=SAMPLE_RATE_HZ, channels=1, format="FLAC") as out:
        written = 0
        while written < total:  # written in pieces: the benchmark itself must not need hours in memory
            piece = cycle[: total - written]
            out.write(piece)
            written += len(piece)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_one(recording: Path, extract: str | None, model: str = "tiny", device: str = "cpu") -> dict:
    """In a fresh process: load, first question (cold cache), second question (warm)."""
    from lyra_cli.engine.model.resolve import resolve_model
    from lyra_cli.engine.model.runtime import RuntimeRequest, resolve_runtime
    from lyra_cli.engine.run.extractor import parse_extract
    from lyra_cli.engine.run.generate import SamplingConfig
    from lyra_cli.engine.run.longspeech import LongSpeechSettings, RecordingEncoder, prompt_tokens
    from lyra_cli.engine.run.pipeline import Engine
    from lyra_cli.engine.run.prefill import Chunking
    from lyra_cli.engine.run.prompt import Conversation, TextPart
    from lyra_cli.engine.run.speech_cache import SpeechTokenCache, default_cache_dir

    engine = Engine.load(resolve_model(model), resolve_runtime(RuntimeRequest(device=device)))
    max_positions = engine.loaded.config.text.max_position_embeddings
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS)
    encoder = RecordingEncoder(engine, LongSpeechSettings(), SpeechTokenCache(default_cache_dir()))

    def question(text: str) -> dict:
        start = time.perf_counter()
        rss_before = _peak_rss_mb()
        part, cached = encoder.encode(recording)
        audio_s = time.perf_counter() - start
        audio_rss_growth = _peak_rss_mb() - rss_before
        n_prompt = prompt_tokens(part.n_windows)
        extractor = parse_extract(extract, engine.loaded.config.text.num_layers) if (
            extract and n_prompt > max_positions) else None  # fmt: skip
        events = list(engine.respond(Conversation(), [part, TextPart(text)], sampling, extractor=extractor,
                                     chunking=Chunking(CHUNK_TOKENS)))  # fmt: skip
        done = events[-1]
        return {
            "cached": cached, "audio_stage_s": audio_s, "audio_stage_peak_rss_growth_mb": audio_rss_growth,
            "prefill_s": done.timings["prefill_s"], "total_s": time.perf_counter() - start,
            "prompt_tokens": done.prompt_tokens, "kept_tokens": done.kept_tokens, "windows": part.n_windows,
            "duration_s": part.duration_s, "extractor": extract if extractor else None,
        }  # fmt: skip

    first = question("Summarize the recording.")
    second = question("Who speaks first?")
    return {"first": first, "second": second, "process_peak_rss_mb": _peak_rss_mb()}


def measure(minutes: float, extract: str, workdir: Path, model: str = "tiny", device: str = "cpu") -> dict:
    recording = workdir / f"recording_{minutes:g}min.flac"
    build_recording(recording, minutes)
    env = {**os.environ, "LYRA_CACHE_DIR": str(workdir / f"cache_{minutes:g}")}
    cmd = [sys.executable, __file__, "--one", str(recording), "--extract", extract, "--model", model, "--device", device]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["minutes"] = minutes
    recording.unlink()
    return result


def print_table(rows: list[dict]) -> None:
    head = ("minutes", "windows", "prompt tok", "kept tok", "1st: audio s", "×RT", "2nd: audio s (cache)",
            "1st: prefill s", "1st total s", "2nd total s", "speedup", "audio-stage RSS growth MB")  # fmt: skip
    print(" | ".join(head))
    for r in rows:
        first, second = r["first"], r["second"]
        speed = first["duration_s"] / first["audio_stage_s"]
        print(" | ".join([f"{r['minutes']:g}", str(first["windows"]), f"{first['prompt_tokens']:,}",
                          f"{first['kept_tokens']:,}", f"{first['audio_stage_s']:.1f}", f"{speed:.0f}",
                          f"{second['audio_stage_s']:.2f}",
                          f"{first['prefill_s']:.1f}", f"{first['total_s']:.1f}", f"{second['total_s']:.2f}",
                          f"{first['total_s'] / second['total_s']:.1f}×",
                          f"{first['audio_stage_peak_rss_growth_mb']:.0f}"]))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[10, 30, 60, 120])
    parser.add_argument("--extract", default="2x0.5", help="extractor for prompts beyond the position range")
    parser.add_argument("--model", default="tiny", help="tiny, or a model folder (run from where its model_zoo/ resolves)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "longspeech.json")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # internal: measure in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.extract, args.model, args.device)))
        return
    with tempfile.TemporaryDirectory(prefix="lyra-longspeech-") as tmp:
        rows = [measure(m, args.extract, Path(tmp), args.model, args.device) for m in args.minutes]
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "device": args.device}  # fmt: skip
    args.out.write_text(json.dumps({"machine": machine, "model": args.model, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
