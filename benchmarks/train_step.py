"""Stage-2 training step with and without the extractor (`--extract 4x0.7`), side by side.

The real training path: a model folder in the release layout (random weights, the language model at
--size), stage 2 prepared as `lyra train stage2` prepares it (fresh speech LoRA r64/α16 + projector, LCMR
on, gradient checkpointing on), and `Trainer.step()` timed — forward, LCMR, backward, clipping and AdamW.
Records are long and multimodal: a drawn image (256 merged tokens) and a 2-minute recording (tiled from
the real clips beside the checkout: 4 windows, 1200 speech tokens) with its transcript for LCMR, a spoken
question and a one-sentence answer. Their media are encoded once up front by the frozen towers (the same
for both arms), so a step is the trainable work only.

Each round runs one step of each arm back to back, the order flipped every round, so load from other
processes hits both alike; one warm-up round, then --rounds measured rounds; medians are compared.
Tokens/s counts prompt tokens entering the decoder. "token-layers" is the decoder work each arm really did
(tokens x layers, after drops): the ratio the step time can at best follow.

    python -m benchmarks.train_step                         # mid size on CPU (~4 min on 2 cores)
    python -m benchmarks.train_step --device cuda --dtype bfloat16 --size mini --out benchmarks/results/train_step-cuda.json

Prints a table and writes JSON (default benchmarks/results/train_step.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
from PIL import Image, ImageDraw

from lyra_cli.audio.io import SAMPLE_RATE_HZ, load_audio
from lyra_cli.engine.model.config import ExtractorConfig
from lyra_cli.engine.model.runtime import RuntimeRequest, resolve_runtime
from lyra_cli.engine.model.tiny import VISION_TOWER_DIR, TinySize, write_tiny_model
from lyra_cli.engine.run.extractor import compress_layers, keep_count
from lyra_cli.engine.run.pipeline import Engine
from lyra_cli.engine.train.data import (
    TrainDataset,
    TrainExample,
    build_example,
    engine_media_encoder,
    media_tokens,
    parse_records,
)
from lyra_cli.engine.train.loop import Trainer
from lyra_cli.engine.train.stages import prepare_for_stage, resolve_stage
from tests.helpers.synthetic import JFK_TRANSCRIPT, QUESTION_CLIPS  # test data, not shipped: run from the repo root

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "data" / "real"
SIZES = {
    "mid": TinySize(hidden=512, intermediate=1536, layers=12, heads=8, kv_heads=2),  # ~40 M decoder weights
    "mini": TinySize(hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2),  # Lyra-Mini's decoder
}
EXTRACT = "4x0.7"
SPEECH_SECONDS = 120  # 4 windows: 1200 speech tokens
IMAGE_SIDE = 448  # 16 x 16 merged patches of 28 px = 256 image tokens
IMAGE_TOKENS = (IMAGE_SIDE // 28) ** 2
N_RECORDS = 4
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def write_records(folder: Path) -> Path:
    """N_RECORDS image + 2-minute speech records in the official schema; returns the data file."""
    jfk = load_audio(REAL / "jfk.flac")
    n_samples = SPEECH_SECONDS * SAMPLE_RATE_HZ
    records = []
    for i, clip in enumerate(QUESTION_CLIPS[:N_RECORDS]):
        speech = np.concatenate([load_audio(REAL / clip), jfk])
        soundfile.write(folder / f"speech_{i}.wav", np.tile(speech, -(-n_samples // len(speech)))[:n_samples],
                        SAMPLE_RATE_HZ, subtype="PCM_16")  # fmt: skip
        image = Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), (30 * i, 90, 160))
        ImageDraw.Draw(image).ellipse((40 + 20 * i, 60, 300, 380), fill=(230, 210, 40))
        image.save(folder / f"image_{i}.png")
        records.append({
            "id": f"bench_{i}", "image": f"image_{i}.png", "speech": f"speech_{i}.wav",
            "speech_asr": " ".join([JFK_TRANSCRIPT] * 8),
            "conversations": [{"from": "human", "value": "<image>\n<speech>\nWhat does the speaker ask for?"},
                              {"from": "gpt", "value": "The speaker asks what you can do for your country."}],
        })  # fmt: skip
    path = folder / "train.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def build_model(folder: Path, size: TinySize) -> Path:
    model_dir = folder / "model"
    write_tiny_model(model_dir, size=size)
    processor = model_dir / VISION_TOWER_DIR / "preprocessor_config.json"
    settings = json.loads(processor.read_text())
    settings["max_pixels"] = IMAGE_SIDE * IMAGE_SIDE  # the tiny model caps images at 64 tokens
    processor.write_text(json.dumps(settings))
    return model_dir


def token_layers(example: TrainExample, n_layers: int, extractor: ExtractorConfig | None) -> int:
    """Decoder work for one example (tokens x layers), with each block's surviving token count."""
    n_ctx = sum(media_tokens(seg) for seg in example.segments if not isinstance(seg, str))
    n_text, work, start = example.n_tokens - n_ctx, 0, 0
    drops = compress_layers(extractor, n_layers) if extractor is not None else []
    for stop in [layer + 1 for layer in drops] + [n_layers]:
        work += (n_text + n_ctx) * (stop - start)
        n_ctx, start = keep_count(n_ctx, extractor.keep_rate) if extractor is not None else n_ctx, stop
    return work


def run(args: argparse.Namespace) -> dict:
    size = SIZES[args.size]
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="lyra-bench-") as tmp:
        folder = Path(tmp)
        data = write_records(folder)
        runtime = resolve_runtime(RuntimeRequest(device=args.device, dtype=DTYPES[args.dtype]))
        engine = Engine.load(build_model(folder, size), runtime)
        records, _ = parse_records(data, image_folder=folder, speech_folder=folder, strict=True)
        encode = engine_media_encoder(engine)
        start = time.perf_counter()
        examples = {r.id: build_example(r, engine.loaded.tokenizer, encode) for r in records}
        encode_s = time.perf_counter() - start
        return _measure(args, engine, records, examples, size, device) | {"encode_once_s": encode_s}


def _measure(args: argparse.Namespace, engine: Engine, records: list, examples: dict, size: TinySize,
             device: torch.device) -> dict:  # fmt: skip
    base_stage = resolve_stage("stage2", {"warmup_ratio": 0.0, "per_device_batch_size": 1})  # one record per step
    torch.manual_seed(0)
    plan = prepare_for_stage(engine.model, base_stage)
    arms = {}
    for name, spec in (("baseline", ""), (f"--extract {EXTRACT}", EXTRACT)):
        stage = dataclasses.replace(base_stage, extract=spec)
        dataset = TrainDataset(records, lambda r: examples[r.id], seed=0)
        arms[name] = Trainer(engine.model, dataclasses.replace(plan, stage=stage), dataset,
                             total_steps=args.rounds + 1)  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in arms}
    logs: dict[str, list[dict]] = {name: [] for name in arms}
    peak: dict[str, int] = {}
    for round_index in range(args.rounds + 1):
        order = list(arms) if round_index % 2 == 0 else list(reversed(arms))
        for name in order:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            record = arms[name].step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated(device))
            elapsed = time.perf_counter() - start
            if round_index > 0:  # round 0 warms up
                times[name].append(elapsed)
                logs[name].append(record)
            print(f"round {round_index} {name}: {elapsed:.2f} s, loss {record['loss']:.3f}", flush=True)
    rows = []
    for name, trainer in arms.items():
        step_s = statistics.median(times[name])
        tokens = statistics.mean(r["tokens"] for r in logs[name])
        work = statistics.mean(token_layers(e, size.layers, trainer.extractor) for e in examples.values())
        rows.append({"arm": name, "step_s": step_s, "steps_s": times[name], "prompt_tokens": tokens,
                     "tokens_per_s": tokens / step_s,
                     "final_tokens": statistics.mean(r.get("kept_tokens", r["tokens"]) for r in logs[name]),
                     "token_layers": work, "peak_cuda_mib": peak[name] / 2**20 if peak else None})  # fmt: skip
    base, extracted = rows
    extracted["speedup"] = base["step_s"] / extracted["step_s"]
    extracted["step_time_cut"] = 1 - extracted["step_s"] / base["step_s"]
    extracted["token_layer_cut"] = 1 - extracted["token_layers"] / base["token_layers"]
    return {"size": dataclasses.asdict(size), "dtype": args.dtype, "device": args.device, "extract": EXTRACT,
            "rows": rows}  # fmt: skip


def print_table(result: dict) -> None:
    print(f"\nstage2 step, decoder {result['size']}, {result['dtype']} on {result['device']}")
    print("| arm | step (s) | prompt tokens | tokens/s | tokens after the last drop | token-layer cut "
          "| step-time cut | peak CUDA MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        cuts = [f"{100 * r[key]:.0f} %" if key in r else "" for key in ("token_layer_cut", "step_time_cut")]
        peak = f"{r['peak_cuda_mib']:.0f}" if r["peak_cuda_mib"] else "-"
        print(f"| {r['arm']} | {r['step_s']:.2f} | {r['prompt_tokens']:.0f} | {r['tokens_per_s']:.0f} | "
              f"{r['final_tokens']:.0f} | {cuts[0]} | {cuts[1]} | {peak} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--size", default="mid", choices=sorted(SIZES))
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds (after one warm-up round)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train_step.json")
    args = parser.parse_args()
    if not REAL.is_dir():
        parser.error(f"the real recordings are expected in {REAL}")
    result = run(args)
    print_table(result)
    result["machine"] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
