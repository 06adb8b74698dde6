"""`lyra serve` against the same requests run in-process: first token, first audio, throughput, overhead.

One question, asked again and again: a real photo and a real spoken question about it
(../shared/data/real extreme_ironing.jpg + .mp3, sent as a `data:` URL and `input_audio` mp3), answered in
text and speech (`modalities: ["text", "audio"]`, streamed pcm16), at most --max-tokens tokens.
  in-process           the engine API in this process (`lyra_cli.engine.load(..., voice=True)`,
                       `Engine.respond`): the same files decoded, encoded and answered, timed from the call to
                       the first `TextDelta`, the first `AudioChunk` and the end; on a thread of its own, as the
                       server runs its engine on its worker thread;
  server (openai SDK)  `lyra serve --model MODEL` in a subprocess on a free loopback port, asked through the
                       official `openai` SDK (`stream=True`); timed by the client from the call to the chunk that
                       carries the first text / first audio, and to the stream's end;
  server (plain HTTP)  the same requests by `http.client`, each event's JSON read as a dict: the client's own
                       cost kept small, so that the server's share of the overhead shows.
With 1 client the three take turns request by request (order rotating), so background load hits all alike;
the server's own overhead per request is the median of the paired differences (server minus in-process) of
the total time, and the first-audio difference likewise. Every answer is checked to be the in-process one:
the same text, token count and seconds of audio. With more clients (threads, each with its own SDK client,
asking one request after another) the requests queue on the server's one model: throughput (requests/s,
tokens/s over the wall time of the whole run) and the latency clients see while queued.

    python -m benchmarks.serve                               # tiny model, 1 and 4 clients
    python -m benchmarks.serve --threads 1                   # torch on one core, the other left to HTTP
    python -m benchmarks.serve --stream-interval-ms 0         # the server sends every token as it comes
    python -m benchmarks.serve --clients 1 --requests 1 --warmup 0 --max-tokens 8 --out /tmp/serve.json
    python -m benchmarks.serve --model DIR --device cuda

Targets (issue 13, tiny model): overhead per request < 15 ms, first streamed audio within 20 ms of the
in-process figure. Prints a table and writes JSON (default benchmarks/results/serve.json) with every
answer's timings and the load average before and after.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "data" / "real"
IMAGE = REAL / "extreme_ironing.jpg"
QUESTION = REAL / "extreme_ironing.mp3"
STREAM_RATE_HZ = 24_000  # OpenAI's streamed pcm16: mono, 16-bit, 24 kHz
PCM16_BYTES = 2
AUDIO_MATCH_S = 0.01  # the streamed audio is the vocoder's resampled: its length agrees to a few samples
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
    audio_s: float  # seconds of speech in the answer


# ------------------------------------------------------------------------------------------ server side


def start_server(model: str, device: str, port: int, log: Path, *, threads: int | None = None,
                 flags: Sequence[str] = ()) -> subprocess.Popen:  # fmt: skip
    """`lyra serve` on loopback `port` with `flags`, its output in `log`, once `/health` answers."""
    cmd = [sys.executable, "-m", "lyra_cli.main", "serve", "--model", model, "--device", device,
           "--host", "127.0.0.1", "--port", str(port), *flags]  # fmt: skip
    # this checkout first; the caller's path after it (e.g. optional packages to compare, such as uvloop)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    if threads is not None:  # torch sizes its CPU thread pool from this when it starts
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`lyra serve` exited with {proc.returncode}; its output is in {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc
        except OSError:  # refused, or accepted but not answered while the model loads
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


class Received:
    """What one streamed answer brought, and when (seconds from the call)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.ttft = self.first_audio = None
        self.content: list[str] = []
        self.transcript: list[str] = []
        self.tokens = self.pcm_bytes = 0

    def chunk(self, content: str | None, audio: dict[str, Any], usage_tokens: int | None) -> None:
        now = time.perf_counter() - self.start
        if usage_tokens is not None:
            self.tokens = usage_tokens
        # the text comes as `content`, or (as OpenAI sends a spoken answer) only as the audio's `transcript`
        self.content.append(content or "")
        self.transcript.append(audio.get("transcript") or "")
        if self.ttft is None and (content or audio.get("transcript")):
            self.ttft = now
        if audio.get("data"):
            self.first_audio = now if self.first_audio is None else self.first_audio
            self.pcm_bytes += len(base64.b64decode(audio["data"]))

    def timing(self) -> Timing:
        total = time.perf_counter() - self.start
        text = "".join(self.content) or "".join(self.transcript)
        audio_s = self.pcm_bytes / PCM16_BYTES / STREAM_RATE_HZ
        return Timing(_seen(self.ttft, "text"), _seen(self.first_audio, "audio"), total, self.tokens, text, audio_s)


def request_body(model: str, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "messages": messages(), "stream": True, "max_completion_tokens": max_tokens,
            "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "pcm16"},
            "stream_options": {"include_usage": True}}  # fmt: skip


def ask_server(client: Any, model: str, max_tokens: int) -> Timing:
    """One request through the official SDK."""
    received = Received()
    for chunk in client.chat.completions.create(**request_body(model, max_tokens)):
        delta = chunk.choices[0].delta if chunk.choices else None
        received.chunk(delta and delta.content, _fields(delta and delta.audio),
                       chunk.usage.completion_tokens if chunk.usage else None)  # fmt: skip
    return received.timing()


def ask_raw(port: int, model: str, max_tokens: int) -> Timing:
    """One request by plain HTTP, each event's JSON read as a dict: the client's own cost kept small, to tell
    the server's part of the overhead from the SDK's."""
    received = Received()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(request_body(model, max_tokens)),
                           {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})  # fmt: skip
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"the server answered {response.status}: {response.read()[:500]!r}")
        while (line := response.readline()) and line.strip() != b"data: [DONE]":
            if line.startswith(b"data: "):
                chunk = json.loads(line[len(b"data: ") :])
                delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
                usage = chunk.get("usage")
                received.chunk(delta.get("content"), delta.get("audio") or {},
                               usage["completion_tokens"] if usage else None)  # fmt: skip
    finally:
        connection.close()
    return received.timing()


def _fields(audio: Any) -> dict[str, Any]:
    """A `delta.audio` as a dict: newer SDKs declare it (`ChoiceDeltaAudio`), older ones keep it as sent."""
    if audio is None:
        return {}
    return audio.model_dump() if hasattr(audio, "model_dump") else dict(audio)


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


def _same_answer(server: Timing, local: Timing) -> bool:
    return (server.text, server.completion_tokens) == (local.text, local.completion_tokens) and \
        abs(server.audio_s - local.audio_s) < AUDIO_MATCH_S  # fmt: skip


def ask_engine(engine: Any, max_tokens: int) -> Timing:
    from lyra_cli.engine import AudioChunk, Conversation, Done, TextDelta, read_media

    start = time.perf_counter()
    parts = [engine.encode(read_media("image", IMAGE)), engine.encode(read_media("speech", QUESTION))]
    ttft = first_audio = None
    tokens = n_samples = 0
    rate_hz = 1
    text = []
    for event in engine.respond(Conversation(), parts, engine.sampling(max_new_tokens=max_tokens), voice=engine.voice):
        now = time.perf_counter() - start
        if isinstance(event, TextDelta) and event.text:
            text.append(event.text)
            ttft = now if ttft is None else ttft
        elif isinstance(event, AudioChunk):
            first_audio = now if first_audio is None else first_audio
            n_samples += len(event.samples)
            rate_hz = event.sample_rate_hz
        elif isinstance(event, Done):
            tokens = event.new_tokens
    total = time.perf_counter() - start
    audio_s = n_samples / rate_hz if n_samples else 0.0
    return Timing(_seen(ttft, "text"), _seen(first_audio, "audio"), total, tokens, "".join(text), audio_s)


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


def print_table(rows: list[dict[str, Any]], overheads: dict[str, dict[str, float]]) -> None:
    print("mode | clients | requests | first token p50/p95 ms | first audio p50/p95 ms | total p50/p95 ms | "
          "req/s | tok/s")  # fmt: skip
    for row in rows:
        cells = [f"{1000 * row[f'{f}_p50']:.1f} / {1000 * row[f'{f}_p95']:.1f}"
                 for f in ("ttft_s", "first_audio_s", "total_s")]  # fmt: skip
        print(f"{row['mode']} | {row['clients']} | {row['requests']} | {' | '.join(cells)} | "
              f"{row['requests_per_s']:.2f} | {row['tokens_per_s']:.1f}")  # fmt: skip
    verdict = {True: "met", False: "MISSED"}
    print("server overhead per request, 1 client, median of paired differences with the in-process answer:")
    for client, overhead in overheads.items():
        total, audio = overhead["total_s_ms"], overhead["first_audio_s_ms"]
        print(f"  {client}: total {total:.1f} ms (target < {OVERHEAD_TARGET_MS:.0f}: "
              f"{verdict[total < OVERHEAD_TARGET_MS]}), first audio {audio:.1f} ms (target < "
              f"{FIRST_AUDIO_TARGET_MS:.0f}: {verdict[audio < FIRST_AUDIO_TARGET_MS]}), first token "
              f"{overhead['ttft_s_ms']:.1f} ms")  # fmt: skip


# ------------------------------------------------------------------------------------------ main

IN_PROCESS, SDK, RAW = "in-process", "server (openai SDK)", "server (plain HTTP)"


def side_by_side(url: str, port: int, model: str, engine: Any, args: argparse.Namespace) -> dict[str, list]:
    """1 client of each kind and the engine, taking turns request by request (the order rotating, so that none
    always runs right after another). The engine runs on a thread of its own, as the server's does (its
    worker thread): on a busy machine torch's OpenMP threads fare very differently when driven from the main
    thread (measured here, 2 cores at load 4: 5-8 s against 0.4 s for the same request)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=600)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine") as worker:
        askers = {IN_PROCESS: lambda: worker.submit(ask_engine, engine, args.max_tokens).result(),
                  SDK: lambda: ask_server(client, model, args.max_tokens),
                  RAW: lambda: ask_raw(port, model, args.max_tokens)}  # fmt: skip
        for _ in range(args.warmup):
            for ask in askers.values():
                ask()
        runs: dict[str, list[Timing]] = {name: [] for name in askers}
        names = list(askers)
        for i in range(args.requests):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                runs[name].append(askers[name]())
    return runs


def served_model_id(url: str) -> str:
    request = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["data"][0]["id"]


def measure(args: argparse.Namespace, engine: Any) -> tuple[dict[str, list[Timing]], list[dict[str, Any]]]:
    """Every answer, by kind of client, and the table's rows."""
    port = free_port()
    log = Path(tempfile.gettempdir()) / f"lyra-serve-benchmark-{port}.log"  # kept only when the server fails
    # the in-process side decodes and encodes the media of every request: so does the server (--cached-media 0)
    flags = ["--api-key", API_KEY, "--cached-media", "0"]
    if args.stream_interval_ms is not None:  # else the server's default
        flags += ["--stream-interval-ms", str(args.stream_interval_ms)]
    proc = start_server(args.model, args.device, port, log, threads=args.threads, flags=flags)
    try:
        url = f"http://127.0.0.1:{port}"
        model_id = served_model_id(url)
        runs = side_by_side(url, port, model_id, engine, args)
        # 1 client: its wall time is its own requests' (the others' turns left out)
        rows = [{"mode": name, "clients": 1, **summary(timings, sum(t.total_s for t in timings))}
                for name, timings in runs.items()]  # fmt: skip
        for n in args.clients:
            if n > 1:
                rows.append({"mode": SDK, "clients": n, **summary(*run_clients(url, model_id, n, args.requests,
                                                                               args.max_tokens))})  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    log.unlink(missing_ok=True)
    return runs, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", default="1,4", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--requests", type=int, default=10, help="measured requests per client")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured requests first (of each kind)")
    parser.add_argument("--max-tokens", type=int, default=128, help="the tiny model speaks its first chunk after 72 tokens of this answer")
    parser.add_argument("--threads", type=int, help="torch CPU threads of both the server and the in-process engine "
                        "(default: torch's, one per core)")  # fmt: skip
    parser.add_argument("--stream-interval-ms", type=float, help="the server's --stream-interval-ms (default: "
                        "the server's own)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve.json")
    args = parser.parse_args()
    args.clients = [int(n) for n in args.clients.split(",")]

    import torch

    from lyra_cli.engine import load

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    engine = load(args.model, device=args.device, voice=True)
    load_before = os.getloadavg()
    runs, rows = measure(args, engine)
    local = runs[IN_PROCESS]
    overheads = {name: paired(runs[name], local) for name in (SDK, RAW)}
    same = {name: [_same_answer(s, i) for s, i in zip(runs[name], local, strict=True)] for name in (SDK, RAW)}
    print_table(rows, overheads)
    print(f"answers identical to the in-process ones: {sum(map(sum, same.values()))} of "
          f"{sum(map(len, same.values()))}")  # fmt: skip
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "torch": torch.__version__, "device": args.device, "torch_threads": torch.get_num_threads()}  # fmt: skip
    report = {"machine": machine, "model": args.model, "max_tokens": args.max_tokens,
              "stream_interval_ms": args.stream_interval_ms, "rows": rows,
              "overhead_ms": overheads, "targets_ms": {"overhead": OVERHEAD_TARGET_MS,
                                                       "first_audio": FIRST_AUDIO_TARGET_MS},
              "answers_identical": same, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "runs": {name: [asdict(t) for t in timings] for name, timings in runs.items()}}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
