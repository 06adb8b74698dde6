"""Lyra at release size (random weights): load, memory, first token, tokens/s, long-speech audio stage.

Uses the release-shaped checkpoint of `benchmarks/release_shapes.py` (written under --root on first use).
For each precision (bf16, 8-bit, 4-bit: bitsandbytes, the decoder's linear layers only; compute bf16) a fresh
process, started in --root (the authors' working directory, where `model_zoo/...` resolves):
  1. loads the model (wall time, imports excluded, and the process's peak resident memory after loading);
  2. answers an image + speech question (../shared/data/real extreme_ironing.jpg + .mp3): media encoding,
     first token (from the start of media encoding) and decode tokens/s over --new-tokens forced tokens;
  3. with --voice: the same question spoken (speech generator + vocoder): time to the first audio;
  4. the audio stage of a --minutes recording (tiled from the real clips, as benchmarks/longspeech.py does):
     streamed decode + Whisper encode + projection, no cache, as `lyra longspeech` runs it; × real time;
  5. reports the process's peak resident memory (ru_maxrss of the child; CUDA: max_memory_allocated), and
     the resident set after loading, after the question and at the end split into anonymous and file pages.
The predicted memory is `lyra info DIR --json --device DEVICE --dtype bf16`'s table, run as a command from
--root: the weights at each precision plus the KV cache of 1k tokens. Loaded parts it leaves out (each
adapter's own speech projector; the speech generator, loaded only with --voice) are recorded beside it.

    python -m benchmarks.release_scale --root /tmp/lyra-release                    # Mini, bf16 + 8-bit + 4-bit
    python -m benchmarks.release_scale --root /tmp/lyra-release --precisions bf16 --quick
    python -m benchmarks.release_scale --root /data/lyra-release --size base --device cuda --voice

Timings on a shared machine are disturbed by other processes: the JSON records the load average before and
after each run. Prints a table and writes JSON (default benchmarks/results/release_scale.json).
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
from typing import Any

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "data" / "real"
IMAGE = REAL / "extreme_ironing.jpg"
QUESTION = REAL / "extreme_ironing.mp3"
PRECISIONS = {"bf16": "none", "8bit": "8bit", "4bit": "4bit"}
COMPUTE_DTYPE = "bf16"  # every precision computes in bf16 (the release's dtype), on CPU as on a GPU
INFO_ROWS = {"bf16": COMPUTE_DTYPE, "8bit": "8-bit", "4bit": "4-bit"}  # `lyra info`'s row for each precision
GIB = 1 << 30
MIB = 1 << 20


# ------------------------------------------------------------------------------------------ prediction


def lyra_info_memory(root: Path, model_dir: Path, device: str) -> dict[str, Any]:
    """`lyra info DIR --json` run from `root` (as a user would), with the benchmark's compute dtype: its
    memory table, its parameter count and where it found the towers. The same command, not a copy of it."""
    cmd = [sys.executable, "-m", "lyra_cli.main", "info", str(model_dir), "--json", "--device", device,
           "--dtype", COMPUTE_DTYPE]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, env=_child_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[2:])}` failed: {proc.stderr.strip()}")
    described = json.loads(proc.stdout)
    return {"command": "lyra " + " ".join(cmd[3:]), "parameters_loaded": described["weights"]["parameters_loaded"],
            "rows": {row["precision"]: row for row in described["memory"]["rows"]},
            "sources": {k: (v or {}).get("path") for k, v in described["sources"].items()}}  # fmt: skip


def predicted_gib(info: dict[str, Any], precision: str) -> dict[str, float]:
    """`lyra info`'s row for `precision`: weights, and weights + the KV cache of 1k tokens."""
    row = info["rows"][INFO_ROWS[precision]]
    weights = row["weights_bytes"]
    return {"weights_gib": weights / GIB, "kv_per_1k_tokens_mib": row["kv_cache_bytes_per_1k_tokens"] / MIB,
            "total_gib": (weights + row["kv_cache_bytes_per_1k_tokens"]) / GIB}  # fmt: skip


def not_in_lyra_info(model_dir: Path) -> dict[str, float]:
    """Loaded parts `lyra info`'s table leaves out, by file size (bf16 on disk, bf16 loaded): each adapter's
    own speech projector (`non_lora_trainables.bin`), and the speech generator (loaded only with a voice)."""
    from lyra_cli.engine.model.adapters import ADAPTER_DIRS, PROJECTOR_FILE
    from lyra_cli.engine.model.checkpoint import SPEECH_GENERATOR_FILE

    folders = ADAPTER_DIRS.values()
    projectors = sum((model_dir / folder / PROJECTOR_FILE).stat().st_size
                     for folder in folders if (model_dir / folder / PROJECTOR_FILE).is_file())  # fmt: skip
    generator = model_dir / SPEECH_GENERATOR_FILE
    return {"adapter_projectors_gib": projectors / GIB,
            "speech_generator_gib": generator.stat().st_size / GIB if generator.is_file() else 0.0}  # fmt: skip


# ------------------------------------------------------------------------------------------ one process


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _rss_mib() -> dict[str, float]:
    """The resident set now, split as Linux reports it: anonymous pages (what the process allocated) and
    file pages (the safetensors files it maps: counted while mapped, yet clean, so the kernel can drop them)."""
    parts = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile"):
                parts[name] = int(value.split()[0]) / 1024  # kB
    return {"total": parts["VmRSS"], "anon": parts["RssAnon"], "file": parts["RssFile"]}


def run_one(model_dir: Path, precision: str, device: str, recording: Path | None, new_tokens: int,
            voice: bool) -> dict[str, Any]:  # fmt: skip
    """In this (fresh) process: load, one image + speech question, optionally spoken, the audio stage."""
    import torch

    from lyra_cli.engine.model.loader import load_model
    from lyra_cli.engine.model.runtime import RuntimeRequest, resolve_runtime
    from lyra_cli.engine.run.events import AudioChunk
    from lyra_cli.engine.run.generate import SamplingConfig
    from lyra_cli.engine.run.longspeech import LongSpeechSettings, RecordingEncoder
    from lyra_cli.engine.run.pipeline import Engine, read_media
    from lyra_cli.engine.run.prompt import Conversation

    result: dict[str, Any] = {"precision": precision, "rss_before_load_mib": _rss_mib()}
    runtime = resolve_runtime(RuntimeRequest(device=device, dtype="bf16", quantization=PRECISIONS[precision]))
    start = time.perf_counter()
    engine = Engine(load_model(model_dir, runtime), reuse_prefix=False)
    result["load_s"] = time.perf_counter() - start
    result["peak_rss_after_load_mib"] = _peak_rss_mib()
    result["rss_after_load_mib"] = _rss_mib()
    cuda = runtime.device.type == "cuda"
    if cuda:
        result["cuda_allocated_after_load_mib"] = torch.cuda.memory_allocated() / MIB
    engine.loaded.end_ids = set()  # answers of exactly --new-tokens tokens
    sampling = SamplingConfig(max_new_tokens=new_tokens)

    def ask(voice_obj: Any = None) -> dict[str, Any]:
        start = time.perf_counter()
        parts = [engine.encode(read_media("image", IMAGE)), engine.encode(read_media("speech", QUESTION))]
        media_s = time.perf_counter() - start
        events = list(engine.respond(Conversation(), parts, sampling, voice=voice_obj))
        done = events[-1]
        return {"media_s": media_s, "prompt_tokens": done.prompt_tokens, "new_tokens": done.new_tokens,
                "first_token_s": media_s + done.timings["first_token_s"], "prefill_s": done.timings["prefill_s"],
                "tokens_per_s": done.tokens_per_s, "total_s": time.perf_counter() - start,
                "first_audio_s": media_s + done.timings["first_audio_s"] if "first_audio_s" in done.timings else None,
                "audio_chunks": sum(isinstance(e, AudioChunk) for e in events)}  # fmt: skip

    ask_start = time.perf_counter()
    result["question"] = ask()
    result["question"]["wall_s"] = time.perf_counter() - ask_start
    result["peak_rss_after_question_mib"] = _peak_rss_mib()
    result["rss_after_question_mib"] = _rss_mib()
    if voice:
        from lyra_cli.engine.run.voice import VoiceConfig, load_voice

        start = time.perf_counter()
        spoken = load_voice(engine.loaded, None, VoiceConfig())
        result["voice_load_s"] = time.perf_counter() - start
        result["spoken_question"] = ask(spoken)
    if recording is not None:
        encoder = RecordingEncoder(engine, LongSpeechSettings(use_cache=False), None)
        start = time.perf_counter()
        part, _ = encoder.encode(recording)
        seconds = time.perf_counter() - start
        result["audio_stage"] = {"duration_s": part.duration_s, "windows": part.n_windows, "seconds": seconds,
                                 "x_real_time": part.duration_s / seconds}  # fmt: skip
    result["peak_rss_mib"] = _peak_rss_mib()
    result["rss_at_end_mib"] = _rss_mib()
    if cuda:
        result["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
    return result


# ------------------------------------------------------------------------------------------ driver


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def measure(root: Path, model_dir: Path, precision: str, args: argparse.Namespace, recording: Path | None,
            info: dict[str, Any]) -> dict:  # fmt: skip
    cmd = [sys.executable, "-m", "benchmarks.release_scale", "--child", str(model_dir), "--precisions", precision,
           "--device", args.device, "--new-tokens", str(args.new_tokens)]  # fmt: skip
    cmd += ["--recording", str(recording)] if recording is not None else []
    cmd += ["--voice"] if args.voice else []
    load_before = os.getloadavg()
    proc = subprocess.run(cmd, cwd=root, env=_child_env(), capture_output=True, text=True)
    row: dict[str, Any] = {"precision": precision, "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
        row["error"] = f"exit {proc.returncode}: " + " | ".join(tail)
        return row
    row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    row["predicted_by_lyra_info"] = predicted_gib(info, precision)
    return row


def print_table(rows: list[dict]) -> None:
    print("precision | load s | peak RSS after load GiB | lyra info GiB (weights+1k KV) | first token s | tok/s | "
          "first audio s | audio stage ×RT | peak GiB (CUDA allocated on a GPU, else RSS) | RSS anon/file at end GiB")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['precision']} | failed: {r['error']}")
            continue
        q, a, end = r["question"], r.get("audio_stage"), r["rss_at_end_mib"]
        first_audio = (r.get("spoken_question") or {}).get("first_audio_s")
        peak_mib = r.get("cuda_peak_allocated_mib", r["peak_rss_mib"])
        print(" | ".join([r["precision"], f"{r['load_s']:.1f}", f"{r['peak_rss_after_load_mib'] / 1024:.2f}",
                          f"{r['predicted_by_lyra_info']['total_gib']:.2f}", f"{q['first_token_s']:.2f}",
                          f"{q['tokens_per_s']:.2f}", f"{first_audio:.2f}" if first_audio is not None else "-",
                          f"{a['x_real_time']:.2f}" if a else "-", f"{peak_mib / 1024:.2f}",
                          f"{end['anon'] / 1024:.2f}/{end['file'] / 1024:.2f}"]))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="where work_dirs/ and model_zoo/ are (written when missing)")
    parser.add_argument("--size", default="mini", help="mini | base | smoke (release_shapes.py)")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--minutes", type=float, default=5.0, help="recording length for the audio stage (0: skip)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--voice", action="store_true", help="also time the first audio of a spoken answer")
    parser.add_argument("--quick", action="store_true", help="8 new tokens and a 1-minute recording")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "release_scale.json")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: measure in this process
    parser.add_argument("--recording", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.precisions[0], args.device, args.recording, args.new_tokens,
                                 args.voice)))  # fmt: skip
        return
    if args.root is None:
        parser.error("--root is required")
    if args.quick:
        args.new_tokens, args.minutes = 8, min(args.minutes, 1.0)
    from benchmarks.longspeech import build_recording
    from benchmarks.release_shapes import write_release

    root = args.root.resolve()
    start = time.perf_counter()
    model_dir = write_release(root, args.size)
    write_s = time.perf_counter() - start
    info = lyra_info_memory(root, model_dir, args.device)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "device": args.device}  # fmt: skip
    report = {"machine": machine, "size": args.size, "model_dir": str(model_dir), "write_or_check_s": write_s,
              "new_tokens": args.new_tokens, "minutes": args.minutes, "command": " ".join(sys.argv), "lyra_info": info,
              "not_in_lyra_info": not_in_lyra_info(model_dir), "rows": []}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lyra-release-scale-") as tmp:
        recording = None
        if args.minutes > 0:
            recording = Path(tmp) / f"recording_{args.minutes:g}min.flac"
            build_recording(recording, args.minutes)
        for precision in args.precisions:
            report["rows"].append(measure(root, model_dir, precision, args, recording, info))
            args.out.write_text(json.dumps(report, indent=2) + "\n")  # after each row: a long run keeps its rows
    print_table(report["rows"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
