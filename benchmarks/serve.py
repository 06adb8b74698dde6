"""`lyra serve` against the same requests run in-process: first token, first audio, throughput, overhead.

One question, asked again and again: a real photo and a real spoken question about it
(../shared/data/real extreme_ironing.jpg + .mp3), answered in text and speech, streamed.
  server      — `lyra serve --model MODEL` in a subprocess on a free loopback port; each client is a thread
                with its own official `openai` SDK client, asking its requests one after another
                (`stream=True`, `modalities=["text", "audio"]`, pcm16 audio); times are seen by the client,
                from the call to the chunk that carries the first text / first audio, and to the stream's end;
  in-process  — the engine API in this process (`lyra_cli.engine.load(..., voice=True)`, `Engine.respond`): the
                same files decoded, encoded and answered, timed from the same point to the same events.
With 1 client the two alternate request by request, so background load hits both alike; the server's own
overhead per request is the median of the paired differences (server minus in-process) of the total time,
and the first-audio difference likewise. Every answer is checked to be the in-process one, word for word.
With more clients the requests queue on the server's one model: throughput (requests/s, tokens/s over the
wall time of the whole run) and the latency clients see while queued.

    python -m benchmarks.serve                               # tiny model, 1 and 4 clients
    python -m benchmarks.serve --clients 1 --requests 1 --warmup 0 --max-tokens 8 --out /tmp/serve.json
    python -m benchmarks.serve --model DIR --device cuda

Targets (issue 13, tiny model): overhead per request < 15 ms, first streamed audio within 20 ms of the
in-process figure. Prints a table and writes JSON (default benchmarks/results/serve.json), with the load
average before and after.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "data" / "real"
IMAGE = REAL / "extreme_ironing.jpg"
QUESTION = REAL / "extreme_ironing.mp3"
OVERHEAD_TARGET_MS = 15.0
FIRST_AUDIO_TARGET_MS = 20.0
SERVER_START_S = 300.0
API_KEY = "benchmark"


@dataclass(frozen=True)
class Timing:
    """One answered request, seconds from the call."""

    ttft_s: float
    first_audio_s: float
    total_s: float
    completion_tokens: int
    text: str


# ------------------------------------------------------------------------------------------ server side


def start_server(model: str, device: str, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lyra_cli.main", "serve", "--model", model, "--device", device,
           "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY]  # fmt: skip
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=sink,
                                stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`lyra serve` exited with {proc.returncode}; its output is in {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError(f"`lyra serve` did not answer /health within {SERVER_START_S:.0f} s; see {log}")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def messages() -> list[dict[str, Any]]:
    image = base64.b64encode(IMAGE.read_bytes()).decode()
    speech = base64.b64encode(QUESTION.read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{image}"}},
               {"type": "input_audio", "input_audio": {"data": speech, "format": "mp3"}}]  # fmt: skip
    return [{"role": "user", "content": content}]


def ask_server(client: Any, model: str, max_tokens: int) -> Timing:
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=messages(), stream=True, max_completion_tokens=max_tokens,
        modalities=["text", "audio"], audio={"voice": "alloy", "format": "pcm16"},
        stream_options={"include_usage": True},
    )  # fmt: skip
    ttft = first_audio = None
    content, transcript, tokens = [], [], 0
    for chunk in stream:
        now = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        audio = getattr(delta, "audio", None) or {}  # not among the SDK's declared fields: read as sent
        # the text comes as `content`, or (as OpenAI sends a spoken answer) only as the audio's `transcript`
        content.append(delta.content or "")
        transcript.append(audio.get("transcript") or "")
        if ttft is None and (delta.content or audio.get("transcript")):
            ttft = now
        if first_audio is None and audio.get("data"):
            first_audio = now
    total = time.perf_counter() - start
    text = "".join(content) or "".join(transcript)
    return Timing(_seen(ttft, "text"), _seen(first_audio, "audio"), total, tokens, text)


def _seen(value: float | None, what: str) -> float:
    if value is None:
        raise RuntimeError(f"the answer carried no {what}")
    return value


def run_clients(url: str, model: str, n_clients: int, n_requests: int, max_tokens: int) -> tuple[list[Timing], float]:
    """`n_clients` threads, each asking `n_requests` in turn; every answer and the wall time of the whole run."""
    from openai import OpenAI

    timings: list[Timing] = []
    errors: list[BaseException] = []

    def client_loop() -> None:
        client = OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=600)
        try:
            for _ in range(n_requests):
                timings.append(ask_server(client, model, max_tokens))
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=client_loop) for _ in range(n_clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return timings, time.perf_counter() - start


# ------------------------------------------------------------------------------------------ in-process


def ask_engine(engine: Any, max_tokens: int) -> Timing:
    from lyra_cli.engine import AudioChunk, Conversation, Done, TextDelta, read_media

    start = time.perf_counter()
    parts = [engine.encode(read_media("image", IMAGE)), engine.encode(read_media("speech", QUESTION))]
    ttft = first_audio = None
    tokens = 0
    text = []
    for event in engine.respond(Conversation(), parts, engine.sampling(max_new_tokens=max_tokens), voice=engine.voice):
        now = time.perf_counter() - start
        if isinstance(event, TextDelta) and event.text:
            text.append(event.text)
            ttft = now if ttft is None else ttft
        elif isinstance(event, AudioChunk):
            first_audio = now if first_audio is None else first_audio
        elif isinstance(event, Done):
            tokens = event.new_tokens
    total = time.perf_counter() - start
    return Timing(_seen(ttft, "text"), _seen(first_audio, "audio"), total, tokens, "".join(text))


# ------------------------------------------------------------------------------------------ report


def summary(timings: list[Timing], wall_s: float) -> dict[str, float]:
    row: dict[str, float] = {"requests": len(timings), "wall_s": wall_s,
                             "requests_per_s": len(timings) / wall_s,
                             "tokens_per_s": sum(t.completion_tokens for t in timings) / wall_s}  # fmt: skip
    for field in ("ttft_s", "first_audio_s", "total_s"):
        values = sorted(getattr(t, field) for t in timings)
        row[f"{field}_p50"] = statistics.median(values)
        row[f"{field}_p95"] = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    return row


def paired(server: list[Timing], local: list[Timing]) -> dict[str, float]:
    """Medians of the per-pair differences, server minus in-process, in ms."""
    return {f"{field}_ms": 1000 * statistics.median(getattr(s, field) - getattr(i, field)
                                                    for s, i in zip(server, local, strict=True))
            for field in ("ttft_s", "first_audio_s", "total_s")}  # fmt: skip


def print_table(rows: list[dict[str, Any]], overhead: dict[str, float]) -> None:
    print("mode | clients | requests | first token p50/p95 ms | first audio p50/p95 ms | total p50/p95 ms | "
          "req/s | tok/s")  # fmt: skip
    for row in rows:
        cells = [f"{1000 * row[f'{f}_p50']:.1f} / {1000 * row[f'{f}_p95']:.1f}"
                 for f in ("ttft_s", "first_audio_s", "total_s")]  # fmt: skip
        print(f"{row['mode']} | {row['clients']} | {row['requests']} | {' | '.join(cells)} | "
              f"{row['requests_per_s']:.2f} | {row['tokens_per_s']:.1f}")  # fmt: skip
    verdict = {True: "met", False: "MISSED"}
    print(f"server overhead per request (1 client, median of paired differences): total "
          f"{overhead['total_s_ms']:.1f} ms (target < {OVERHEAD_TARGET_MS:.0f}: "
          f"{verdict[overhead['total_s_ms'] < OVERHEAD_TARGET_MS]}), first audio {overhead['first_audio_s_ms']:.1f} ms "
          f"(target < {FIRST_AUDIO_TARGET_MS:.0f}: {verdict[overhead['first_audio_s_ms'] < FIRST_AUDIO_TARGET_MS]}), "
          f"first token {overhead['ttft_s_ms']:.1f} ms")  # fmt: skip


# ------------------------------------------------------------------------------------------ main


def side_by_side(url: str, model: str, engine: Any, args: argparse.Namespace) -> tuple[list, list]:
    """1 client and the engine, alternating request by request."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=600)
    for _ in range(args.warmup):
        ask_server(client, model, args.max_tokens), ask_engine(engine, args.max_tokens)
    server, local = [], []
    for _ in range(args.requests):
        server.append(ask_server(client, model, args.max_tokens))
        local.append(ask_engine(engine, args.max_tokens))
    return server, local


def served_model_id(url: str) -> str:
    request = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["data"][0]["id"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", default="1,4", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--requests", type=int, default=10, help="measured requests per client")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured requests first (server and in-process)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve.json")
    args = parser.parse_args()
    clients = [int(n) for n in args.clients.split(",")]

    import torch

    from lyra_cli.engine import load

    engine = load(args.model, device=args.device, voice=True)
    port = free_port()
    log = Path(tempfile.gettempdir()) / f"lyra-serve-benchmark-{port}.log"  # kept only when the server fails
    args.out.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    proc = start_server(args.model, args.device, port, log)
    try:
        url = f"http://127.0.0.1:{port}"
        model_id = served_model_id(url)
        server, local = side_by_side(url, model_id, engine, args)
        same = [s.text == i.text and s.completion_tokens == i.completion_tokens for s, i in zip(server, local)]
        rows = [{"mode": "in-process", "clients": 1, **summary(local, sum(t.total_s for t in local))}]
        for n in clients:
            timings, wall = (server, sum(t.total_s for t in server)) if n == 1 else \
                run_clients(url, model_id, n, args.requests, args.max_tokens)  # fmt: skip
            rows.append({"mode": "server", "clients": n, **summary(timings, wall)})
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    overhead = paired(server, local)
    print_table(rows, overhead)
    print(f"answers identical to the in-process ones: {sum(same)} of {len(same)}")
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "torch": torch.__version__, "device": args.device, "torch_threads": torch.get_num_threads()}  # fmt: skip
    report = {"machine": machine, "model": args.model, "max_tokens": args.max_tokens, "rows": rows,
              "overhead_ms": overhead, "targets_ms": {"overhead": OVERHEAD_TARGET_MS, "first_audio": FIRST_AUDIO_TARGET_MS},
              "answers_identical": same, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "runs": {"server_1_client": [asdict(t) for t in server], "in_process": [asdict(t) for t in local]}}  # fmt: skip
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.unlink(missing_ok=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
