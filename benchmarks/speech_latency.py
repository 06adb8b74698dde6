"""Time to first audio vs total time of a spoken answer: our streaming vs the authors' order.

Both orders run the same model, prompt and greedy decoding, side by side in one process:
  streamed  — `Engine.respond(..., voice=...)`: units are produced per token and vocoded every
              `--chunk-units` units while the text is still being generated;
  at end    — the authors' CLI order (docs/authors-behaviour.md#streaming-and-vocoding): generate the
              whole answer keeping each step's state, run the speech generator on all states, then vocode all units at once.
Answers are forced to exactly N tokens (end tokens ignored) so the lengths are comparable.

    python benchmarks/speech_latency.py                       # tiny model, 20/100/300 tokens
    python benchmarks/speech_latency.py --model DIR --device cuda

Prints a table and writes JSON (default benchmarks/results/speech_latency.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from lyra_cli.audio.io import SAMPLE_RATE_HZ
from lyra_cli.engine.model.runtime import RuntimeRequest, resolve_runtime
from lyra_cli.engine.run.events import AudioChunk, Done
from lyra_cli.engine.run.generate import SamplingConfig, stream_steps
from lyra_cli.engine.run.pipeline import Engine
from lyra_cli.engine.run.prompt import Conversation, TextPart, Turn
from lyra_cli.engine.run.voice import VoiceConfig, load_voice

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Tell me a long story about a man ironing clothes on the back of a taxi."
FIRST_AUDIO_TARGET = 0.25  # streamed first audio must come before this fraction of the total time


def streamed(engine: Engine, voice, n_tokens: int) -> dict:  # noqa: ANN001
    start = time.perf_counter()
    first_audio = None
    samples = 0
    for event in engine.respond(Conversation(), [TextPart(PROMPT)], SamplingConfig(max_new_tokens=n_tokens),
                                voice=voice):  # fmt: skip
        if isinstance(event, AudioChunk):
            first_audio = first_audio if first_audio is not None else time.perf_counter() - start
            samples += len(event.samples)
        elif isinstance(event, Done):
            assert event.new_tokens == n_tokens, event.new_tokens
    return {"first_audio_s": first_audio, "total_s": time.perf_counter() - start, "audio_s": samples / SAMPLE_RATE_HZ}


@torch.inference_mode()
def at_end(engine: Engine, voice, n_tokens: int) -> dict:  # noqa: ANN001
    start = time.perf_counter()
    conversation = Conversation()
    conversation.turns.append(Turn([TextPart(PROMPT)]))
    inputs, _ = engine.prepare(conversation)
    states = [step.hidden for step in stream_steps(engine.model, inputs, cfg=SamplingConfig(max_new_tokens=n_tokens),
                                                   end_ids=set())]  # fmt: skip
    weight = next(voice.generator.parameters())
    units = voice.generator.predict_units(torch.stack(states).to(weight.dtype))
    audio = voice.vocoder(torch.tensor(units, device=weight.device))
    total = time.perf_counter() - start
    return {"first_audio_s": total, "total_s": total, "audio_s": len(audio) / SAMPLE_RATE_HZ}


def measure(engine: Engine, voice, n_tokens: int, repeats: int) -> dict:  # noqa: ANN001
    runs = {"streamed": [], "at_end": []}
    for _ in range(repeats):  # alternate, so background load hits both orders alike
        runs["streamed"].append(streamed(engine, voice, n_tokens))
        runs["at_end"].append(at_end(engine, voice, n_tokens))
    median = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    return {"tokens": n_tokens, "median": median, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tokens", type=int, nargs="+", default=[20, 100, 300])
    parser.add_argument("--chunk-units", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "speech_latency.json")
    args = parser.parse_args()

    from lyra_cli.engine.model.resolve import resolve_model

    engine = Engine.load(resolve_model(args.model), resolve_runtime(RuntimeRequest(device=args.device, dtype=args.dtype)))
    engine.loaded.end_ids = set()  # exact answer lengths
    voice = load_voice(engine.loaded, None, VoiceConfig(chunk_units=args.chunk_units))
    streamed(engine, voice, 10)  # warm-up of the decoding path
    rows = [measure(engine, voice, n, args.repeats) for n in args.tokens]

    print("tokens | audio s | streamed: first audio s | total s | first/total | at end: first audio = total s | target")
    for row in rows:
        s, e = row["median"]["streamed"], row["median"]["at_end"]
        ratio = s["first_audio_s"] / s["total_s"]
        verdict = "met" if ratio < FIRST_AUDIO_TARGET else ("n/a (<100 tokens)" if row["tokens"] < 100 else "MISSED")
        print(f"{row['tokens']} | {s['audio_s']:.1f} | {s['first_audio_s']:.3f} | {s['total_s']:.3f} | {ratio:.1%} | "
              f"{e['total_s']:.3f} | {verdict}")  # fmt: skip
    machine = {"platform": platform.platform(), "torch": torch.__version__, "device": args.device}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "model": args.model, "chunk_units": args.chunk_units,
                                    "rows": rows}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
