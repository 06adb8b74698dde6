"""Resampling to 16 kHz: ours (soxr HQ, streamed) against `--official-audio`'s windowed sinc (streamed).

Both run over the same --seconds of noise at each source rate, in blocks of 10 s as `open_audio_stream`
feeds them; each round times the two back to back (the order flipped every round), so load from other
processes hits both alike. Medians over --repeats rounds after one warm-up. Prints a table and writes JSON.

    python -m benchmarks.resample                      # 60 s at 8, 22.05, 24, 44.1 and 48 kHz
    python -m benchmarks.resample --seconds 600 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soxr
import torch

from lyra_cli.audio.io import RESAMPLE_QUALITY, SAMPLE_RATE_HZ, STREAM_BLOCK_SECONDS
from lyra_cli.audio.resample import SincResampleStream, sinc_kernel

REPO = Path(__file__).resolve().parent.parent
RATES_HZ = (8_000, 22_050, 24_000, 44_100, 48_000)


def soxr_stream(blocks: list[np.ndarray], rate_hz: int) -> int:
    stream = soxr.ResampleStream(rate_hz, SAMPLE_RATE_HZ, 1, dtype="float32", quality=RESAMPLE_QUALITY)
    n = sum(stream.resample_chunk(block, last=False).shape[0] for block in blocks)
    return n + stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True).shape[0]


def sinc_stream(blocks: list[np.ndarray], rate_hz: int) -> int:
    stream = SincResampleStream(rate_hz, SAMPLE_RATE_HZ)
    return sum(stream.push(block).shape[0] for block in blocks) + stream.finish().shape[0]


def timed(run: Callable[[list[np.ndarray], int], int], blocks: list[np.ndarray], rate_hz: int) -> float:
    start = time.perf_counter()
    run(blocks, rate_hz)
    return time.perf_counter() - start


def rate_row(rate_hz: int, seconds: float, repeats: int) -> dict:
    audio = np.random.default_rng(rate_hz).uniform(-1, 1, round(seconds * rate_hz)).astype(np.float32)
    block = round(STREAM_BLOCK_SECONDS * rate_hz)
    blocks = [audio[i : i + block] for i in range(0, len(audio), block)]
    runs = {"soxr": soxr_stream, "sinc": sinc_stream}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(repeats + 1):  # round 0 warms up (and builds the sinc kernel)
        order = list(runs) if round_index % 2 == 0 else list(reversed(runs))
        for name in order:
            elapsed = timed(runs[name], blocks, rate_hz)
            if round_index:
                times[name].append(elapsed)
    kernel = sinc_kernel(rate_hz, SAMPLE_RATE_HZ)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "rate_hz": rate_hz, "seconds": seconds, "sinc_orig_new_taps": [kernel.orig, kernel.new, kernel.taps],
        **{f"{name}_s": medians[name] for name in runs},
        **{f"{name}_x_real_time": seconds / medians[name] for name in runs},
        "runs_s": times,
    }  # fmt: skip


def print_table(rows: list[dict]) -> None:
    print("| source rate | sinc orig→new, taps | soxr HQ | windowed sinc | sinc / soxr |")
    print("|---|---|---|---|---|")
    for r in rows:
        orig, new, taps = r["sinc_orig_new_taps"]
        print(f"| {r['rate_hz']} Hz | {orig}→{new}, {taps} | {r['soxr_s']:.3f} s ({r['soxr_x_real_time']:.0f}×) | "
              f"{r['sinc_s']:.3f} s ({r['sinc_x_real_time']:.0f}×) | {r['sinc_s'] / r['soxr_s']:.1f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="audio per rate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is steadiest on a shared machine)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "resample.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [rate_row(rate_hz, args.seconds, args.repeats) for rate_hz in RATES_HZ]
    print_table(rows)
    machine = {
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_1min_at_end": os.getloadavg()[0],  # other processes on a shared machine
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
