"""`lyra serve`'s cache of encoded media: a follow-up request about earlier media, with and without the cache.

Two servers on the same model, one with the default `--cached-media` and one with `--cached-media 0`, each
in a subprocess on a free loopback port. A conversation's first turn holds media (the real photo
extreme_ironing.jpg as a `data:` URL; with --audio also the spoken question extreme_ironing.mp3 as
`input_audio`), then the follow-up request carries the whole conversation again, as OpenAI clients do:
  turn 1      [media, "Describe it."]        answered once per server (it fills the cache and the prefix cache)
  follow-up   turn 1, its answer, "And what else?"   timed, --requests times per server, the servers taking
              turns request by request so that background load hits both alike.
Without the cache the server decodes and encodes the earlier media again on every follow-up (base64, the
image/audio decoder, the ViT / Whisper pass); with it, the media's parts come from the cache. Both servers
must give the same answer. The time is the client's, from sending the request (plain `http.client`, not
streamed) to the end of the answer; the servers' `/health` counters show the hits.

    python -m benchmarks.serve_media_cache                       # tiny model, image only
    python -m benchmarks.serve_media_cache --audio               # image and audio clip
    python -m benchmarks.serve_media_cache --model DIR --device cuda --requests 20

Prints a table and writes JSON (default benchmarks/results/serve_media_cache.json).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.serve import free_port, start_server

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "data" / "real"
IMAGE = REAL / "extreme_ironing.jpg"
SPEECH = REAL / "extreme_ironing.mp3"
SERVER_START_S = 300.0
MODES = {"cache on": [], "cache off": ["--cached-media", "0"]}


def post(port: int, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Seconds from sending the request to the end of the answer, and the answer."""
    data = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=SERVER_START_S)
    try:
        start = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = response.read()
        elapsed = time.perf_counter() - start
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {payload[:300]!r}")
    return elapsed, json.loads(payload)


def health(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as response:
        return json.loads(response.read())["media_cache"]


def first_turn(audio: bool) -> list[dict[str, Any]]:
    image = base64.b64encode(IMAGE.read_bytes()).decode()
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{image}"}}]
    if audio:
        speech = base64.b64encode(SPEECH.read_bytes()).decode()
        content.append({"type": "input_audio", "input_audio": {"data": speech, "format": "mp3"}})
    content.append({"type": "text", "text": "Describe it."})
    return [{"role": "user", "content": content}]


def request(messages: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    return {"model": "any", "messages": messages, "max_tokens": max_tokens, "temperature": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=10, help="timed follow-ups per server")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--audio", action="store_true", help="the first turn also holds the spoken question")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve_media_cache.json")
    args = parser.parse_args()

    logs = Path(tempfile.mkdtemp(prefix="lyra-bench-media-cache-"))
    servers = {}
    try:
        for mode, flags in MODES.items():
            port = free_port()
            log = logs / f"{mode.replace(' ', '-')}.log"
            servers[mode] = start_server(args.model, args.device, port, log, flags=["--no-voice", *flags]), port
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        answers: dict[str, set[str]] = {mode: set() for mode in MODES}
        first: dict[str, float] = {}
        follow_up: dict[str, dict[str, Any]] = {}
        for mode, (_proc, port) in servers.items():
            messages = first_turn(args.audio)
            first[mode], answer = post(port, request(messages, args.max_tokens))
            messages += [{"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
                         {"role": "user", "content": "And what else?"}]  # fmt: skip
            follow_up[mode] = request(messages, args.max_tokens)
            post(port, follow_up[mode])  # warm-up: the prefix cache now holds this client's follow-up
        for i in range(args.requests):
            for mode in list(MODES)[:: 1 if i % 2 == 0 else -1]:  # the order alternates
                elapsed, answer = post(servers[mode][1], follow_up[mode])
                times[mode].append(elapsed)
                answers[mode].add(answer["choices"][0]["message"]["content"])
        counters = {mode: health(port) for mode, (_proc, port) in servers.items()}
    finally:
        for proc, _port in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    same = len(answers["cache on"] | answers["cache off"]) == 1
    rows = []
    print(f"follow-up about {'an image and an audio clip' if args.audio else 'an image'}, {args.model} on "
          f"{args.device}, {args.requests} requests each, {args.max_tokens} tokens; answers equal: {same}")  # fmt: skip
    print(f"{'mode':<10} {'first turn ms':>14} {'follow-up p50 ms':>17} {'min ms':>8} {'max ms':>8}  cache hits/misses")
    for mode in MODES:
        ms = [t * 1000 for t in times[mode]]
        row = {"mode": mode, "first_turn_ms": first[mode] * 1000, "p50_ms": statistics.median(ms), "min_ms": min(ms),
               "max_ms": max(ms), "times_ms": ms, "media_cache": counters[mode]}  # fmt: skip
        rows.append(row)
        print(f"{mode:<10} {row['first_turn_ms']:>14.1f} {row['p50_ms']:>17.1f} {row['min_ms']:>8.1f} "
              f"{row['max_ms']:>8.1f}  {counters[mode]['hits']}/{counters[mode]['misses']}")  # fmt: skip
    saved = rows[1]["p50_ms"] - rows[0]["p50_ms"]
    print(f"saved per follow-up (p50): {saved:.1f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "device": args.device, "audio": args.audio, "requests": args.requests,
              "max_tokens": args.max_tokens, "answers_equal": same, "saved_p50_ms": saved, "rows": rows,
              "machine": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
