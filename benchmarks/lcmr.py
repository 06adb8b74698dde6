"""LCMR soft-DTW speed: forward and forward + backward against the alignment size, batch 1 and 8.

Each row times `soft_dtw` on a contrastive distance (N speech × M text tokens, float32 features; the recursion
itself runs in float64) and one `lcmr_loss` row times the whole loss on a stage-2-like batch (hidden 3584, four
samples of 300 speech tokens, transcripts of 1000, 700, 400 and 100 tokens). One warm-up run, then the median
of --repeats runs.

    python -m benchmarks.lcmr                    # CPU (~30 s on 2 cores)
    python -m benchmarks.lcmr --threads 1        # steadier where other processes share the cores
    python -m benchmarks.lcmr --device cuda --out benchmarks/results/lcmr-cuda.json

Prints a table and writes JSON (default benchmarks/results/lcmr.json).

Each step works on one anti-diagonal (B × ≤ min(N, M) cells), small enough that torch's thread pool barely
helps, but exp and log above 2048 elements do run in parallel: on a CPU shared with other busy processes
every such call then waits for a descheduled thread, and a 2-thread run of this benchmark took 1-25 s where
a 1-thread run took 0.2 s. Pass --threads 1 there.
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

import torch

from lyra_cli.engine.train.lcmr import (
    LcmrConfig,
    contrastive_distance,
    lcmr_loss,
    soft_dtw,
)

REPO = Path(__file__).resolve().parent.parent
SIZES = [(300, 100), (300, 300), (300, 1000), (1000, 300)]  # (speech tokens, text tokens)
BATCHES = [1, 8]
FEATURE_HIDDEN = 64  # soft-DTW rows: only D's size matters, so a small hidden size keeps setup cheap
LOSS_HIDDEN = 3584  # Qwen2-VL 7B's hidden size, for the end-to-end row
LOSS_SPEECH_TOKENS = 300
LOSS_TEXT_TOKENS = (1000, 700, 400, 100)
EMBED_STD = 0.02  # the scale of LLM input embeddings


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run: Callable[[], None], device: torch.device, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def soft_dtw_row(n_speech: int, n_text: int, batch: int, device: torch.device, repeats: int) -> dict:
    speech = torch.randn(batch, n_speech, FEATURE_HIDDEN, device=device) * EMBED_STD
    text = torch.randn(batch, n_text, FEATURE_HIDDEN, device=device) * EMBED_STD
    distance = contrastive_distance(speech, text).requires_grad_()  # (B, N, M) float32

    def forward() -> None:
        with torch.no_grad():
            soft_dtw(distance)

    def forward_backward() -> None:
        soft_dtw(distance).sum().backward()

    return {
        "kind": "soft_dtw",
        "n_speech": n_speech,
        "n_text": n_text,
        "batch": batch,
        "forward_s": median_seconds(forward, device, repeats),
        "forward_backward_s": median_seconds(forward_backward, device, repeats),
    }


def loss_row(device: torch.device, repeats: int) -> dict:
    speech = [(torch.randn(LOSS_SPEECH_TOKENS, LOSS_HIDDEN, device=device) * EMBED_STD) for _ in LOSS_TEXT_TOKENS]
    speech = [s.requires_grad_() for s in speech]
    text = [torch.randn(m, LOSS_HIDDEN, device=device) * EMBED_STD for m in LOSS_TEXT_TOKENS]
    cfg = LcmrConfig()

    def forward() -> None:
        with torch.no_grad():
            lcmr_loss(speech, text, cfg)

    def forward_backward() -> None:
        (cfg.weight * lcmr_loss(speech, text, cfg)).backward()

    return {
        "kind": "lcmr_loss",
        "n_speech": LOSS_SPEECH_TOKENS,
        "n_text": max(LOSS_TEXT_TOKENS),
        "batch": len(LOSS_TEXT_TOKENS),
        "hidden": LOSS_HIDDEN,
        "text_lengths": list(LOSS_TEXT_TOKENS),
        "forward_s": median_seconds(forward, device, repeats),
        "forward_backward_s": median_seconds(forward_backward, device, repeats),
    }


def print_table(rows: list[dict]) -> None:
    print("| what | N × M | batch | forward (ms) | forward + backward (ms) |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        size = f"{r['n_speech']} × {r['n_text']}" + (" (mixed M)" if r["kind"] == "lcmr_loss" else "")
        times = f"{1000 * r['forward_s']:.1f} | {1000 * r['forward_backward_s']:.1f}"
        print(f"| {r['kind']} | {size} | {r['batch']} | {times} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is steadiest on a shared machine)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "lcmr.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [soft_dtw_row(n, m, b, device, args.repeats) for n, m in SIZES for b in BATCHES]
    rows.append(loss_row(device, args.repeats))
    print_table(rows)
    machine = {
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "load_average_1min_at_end": os.getloadavg()[0],  # other processes on a shared machine
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
