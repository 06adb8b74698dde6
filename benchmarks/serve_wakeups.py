"""What waking an event loop once per engine event costs the thread that decodes (the mechanism behind
`lyra serve`'s overhead per token, benchmarks/RESULTS.md).

The engine answers benchmarks/serve.py's question (real photo + spoken question, 128 tokens with speech) on
a thread of its own, as the server's worker does; an asyncio event loop runs on another thread, as the
server's does. Per engine event the decoding thread hands the loop a callback (`call_soon_threadsafe`, as
the server did once per token) that busies the loop's thread for W µs of Python; `none` hands nothing over.
The modes take turns answer by answer. Prints the median total per mode and writes JSON.

    python -m benchmarks.serve_wakeups                      # torch's default threads
    python -m benchmarks.serve_wakeups --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.serve import REPO, ask_engine

WORK_US = (None, 0, 100, 300)  # None: no hand-over at all


def busy(us: float) -> None:
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--requests", type=int, default=8, help="measured answers per mode")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve_wakeups.json")
    args = parser.parse_args()

    import torch

    from lyra_cli.engine import load

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    engine = load(args.model, device="cpu", voice=True)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    respond = type(engine).respond
    mode: dict[str, float | None] = {"work_us": None}
    events = {"n": 0}

    def handing_over(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202 - wraps Engine.respond
        for event in respond(self, *a, **k):
            events["n"] += 1
            if mode["work_us"] is not None:
                loop.call_soon_threadsafe(busy, mode["work_us"])
            yield event

    type(engine).respond = handing_over
    totals: dict[str, list[float]] = {str(w): [] for w in WORK_US}
    with ThreadPoolExecutor(max_workers=1) as worker:
        for _ in range(2):  # warm-up
            worker.submit(ask_engine, engine, args.max_tokens).result()
        events["n"] = 0
        for _ in range(args.requests):
            for work_us in WORK_US:
                mode["work_us"] = work_us
                totals[str(work_us)].append(worker.submit(ask_engine, engine, args.max_tokens).result().total_s)
    per_answer = events["n"] / (args.requests * len(WORK_US))
    base = statistics.median(totals["None"])
    print(f"torch threads {torch.get_num_threads()}, {per_answer:.0f} engine events per answer")
    print("hand-over per event | total p50 ms | added ms | added per event ms")
    for work_us in WORK_US:
        total = statistics.median(totals[str(work_us)])
        label = "none" if work_us is None else f"wake-up + {work_us} µs work"
        print(f"{label} | {1000 * total:.1f} | {1000 * (total - base):.1f} | {1000 * (total - base) / per_answer:.3f}")
    report = {"torch_threads": torch.get_num_threads(), "events_per_answer": per_answer, "totals_s": totals,
              "loadavg": os.getloadavg()}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
