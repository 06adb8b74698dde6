"""The latent multi-modality extractor (LMME) against our plain prefill: the paper's Table 5a, side by side.

For each prompt length: baseline (our optimized SDPA prefill, `engine.run.prefill` without the extractor, which
is exactly `LyraTextModel.forward`) against LMME(4, 0.8) and LMME(4, 0.7), in one process on one random
model. Prompts are mostly speech: a 16-token system prefix, the speech block, a 32-token question. Each
round times the three prefills back to back (order rotated every round, so load from other processes hits
all alike), then --decode-tokens greedy steps of each (lm_head -> argmax -> embed -> one cached step). One
warm-up prefill on a short prompt first, then --repeats rounds per length; medians are compared.

Peak memory is the growth over the memory held before the run (weights, prompt embeddings), during one
prefill + decode: on CUDA `max_memory_allocated`; on CPU the process's resident high-water mark (VmHWM,
reset through /proc/self/clear_refs after malloc_trim, so freed memory is not counted as held). The KV
cache storage actually allocated is reported too (exact, from the cache).

The theoretical FLOP ratio counts prefill matmuls: every linear layer, plus QKᵀ and AV over the causal
half, for the token count each block really processed (the model's last layer only caches keys and values,
except for the last token); scoring is not counted (it is LMME's overhead).

    python -m benchmarks.extractor --device cuda        # the issue's sizes: 24 layers of 896, 1k..16k tokens
    python -m benchmarks.extractor --dtype bfloat16 --lengths 1024,2048,4096,8192   # what a 2-core CPU manages
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from lyra_cli.engine.model.config import ExtractorConfig, TextModelConfig
from lyra_cli.engine.model.kvcache import KVCache
from lyra_cli.engine.model.network import INIT_STD, LyraTextModel
from lyra_cli.engine.run.extractor import parse_extract
from lyra_cli.engine.run.prefill import PrefillPlan, PrefillResult, prefill
from lyra_cli.engine.run.prompt import TokenKind

# name -> --extract spec (None: the baseline)
CONFIGS: dict[str, str | None] = {"baseline": None, "LMME(4,0.8)": "4x0.8", "LMME(4,0.7)": "4x0.7"}
CHECKED_CONFIG = "LMME(4,0.7)"  # the bar applies to this one at the longest length
TARGET_FRACTION_OF_FLOP_RATIO = 0.9
SYSTEM_TOKENS = 16
QUESTION_TOKENS = 32
WARMUP_TOKENS = 512
VOCAB_SIZE = 32000
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 1 << 20


@dataclass
class Prompt:
    embeds: Tensor  # (1, T, H)
    positions: Tensor  # (3, 1, T)
    kinds: Tensor  # (T,)


@dataclass
class Run:
    prefill_s: float
    decode_s: float
    peak_bytes: int
    kv_cache_bytes: int
    result: PrefillResult


@dataclass
class Series:
    runs: list[Run] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- setup


def mrope_section(head_dim: int) -> tuple[int, int, int]:
    """Qwen2-VL's 16/24/24 split of 64 frequencies, scaled to head_dim / 2."""
    t, h = head_dim // 8, 3 * head_dim // 16
    return t, h, head_dim // 2 - t - h


def build_model(args: argparse.Namespace, dtype: torch.dtype) -> tuple[LyraTextModel, nn.Linear]:
    config = TextModelConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        mrope_section=mrope_section(args.hidden // args.heads),
    )
    torch.manual_seed(0)
    model, lm_head = LyraTextModel(config), nn.Linear(args.hidden, VOCAB_SIZE, bias=False)
    model.init_weights()
    nn.init.normal_(lm_head.weight, std=INIT_STD)
    return model.to(args.device, dtype).eval(), lm_head.to(args.device, dtype).eval()


def build_prompt(model: LyraTextModel, n_tokens: int) -> Prompt:
    """System text, speech, question; speech embeddings random at the scale of the token embeddings."""
    n_speech = n_tokens - SYSTEM_TOKENS - QUESTION_TOKENS
    weight = model.embed_tokens.weight
    gen = torch.Generator(device=weight.device).manual_seed(n_tokens)
    text_ids = torch.randint(0, VOCAB_SIZE, (SYSTEM_TOKENS + QUESTION_TOKENS,), generator=gen, device=weight.device)
    speech = torch.randn(n_speech, weight.shape[1], generator=gen, device=weight.device, dtype=weight.dtype)
    text = model.embed_tokens(text_ids)
    embeds = torch.cat([text[:SYSTEM_TOKENS], speech * INIT_STD, text[SYSTEM_TOKENS:]])[None]
    layout = [(TokenKind.TEXT, SYSTEM_TOKENS), (TokenKind.SPEECH, n_speech), (TokenKind.TEXT, QUESTION_TOKENS)]
    kinds = torch.cat([torch.full((n,), int(kind)) for kind, n in layout])
    # speech counts like text (docs/authors-behaviour.md#m-rope-positions)
    positions = torch.arange(n_tokens, device=weight.device).expand(3, 1, -1)
    return Prompt(embeds, positions, kinds)


# ---------------------------------------------------------------------------------------------- measuring


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """Growth of held memory during a `with` block: CUDA allocator peak, or the CPU resident high-water mark."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.grown_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so it is not counted as held
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
            self.base = _proc_status_bytes("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        peak = torch.cuda.max_memory_allocated() if self.cuda else _proc_status_bytes("VmHWM")
        self.grown_bytes = peak - self.base


def _proc_status_bytes(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    assert match is not None, key
    return int(match.group(1)) * 1024


def cache_bytes(cache: KVCache) -> int:
    """Bytes of KV storage the cache allocated (keys and values of every layer)."""
    stores = [t for t in (*cache._keys, *cache._values) if t is not None]
    return sum(t.numel() * t.element_size() for t in stores)


@torch.inference_mode()
def run_once(
    model: LyraTextModel,
    lm_head: nn.Linear,
    prompt: Prompt,
    extractor: ExtractorConfig | None,
    args: argparse.Namespace,
) -> Run:
    """One prefill (timed) and decode_tokens greedy steps (timed), inside one memory measurement."""
    n_tokens = prompt.embeds.shape[1]
    cache = KVCache.empty(model.config, capacity=n_tokens + args.decode_tokens)
    with PeakMemory(args.device) as memory:
        sync(args.device)
        start = time.perf_counter()
        result = prefill(model, prompt.embeds, prompt.positions, PrefillPlan(cache, extractor=extractor,
                         chunk_tokens=args.chunk_tokens), kinds=prompt.kinds)  # fmt: skip
        sync(args.device)
        prefill_s = time.perf_counter() - start
        hidden = result.last_hidden
        for step in range(args.decode_tokens):
            token = lm_head(hidden).argmax(-1, keepdim=True)  # (1, 1)
            position = torch.full((3, 1, 1), n_tokens + step, device=args.device)
            hidden = model(model.embed_tokens(token), position, cache)[:, -1]
        sync(args.device)
        decode_s = time.perf_counter() - start - prefill_s
    return Run(prefill_s, decode_s, memory.grown_bytes, cache_bytes(cache), result)


# ---------------------------------------------------------------------------------------------- FLOPs


def block_tokens(result: PrefillResult, n_tokens: int, n_layers: int) -> list[tuple[int, int]]:
    """(tokens, layers) of each block the prefill actually ran."""
    starts = [0] + [d.layer + 1 for d in result.drops]
    stops = starts[1:] + [n_layers]
    counts = [n_tokens] + [d.n_after for d in result.drops]
    return [(n, stop - start) for n, start, stop in zip(counts, starts, stops)]


def prefill_flops(config: TextModelConfig, blocks: list[tuple[int, int]]) -> float:
    """Matmul FLOPs (2 per multiply-add) of a prefill on an empty cache: linears + causal QKᵀ and AV.

    The model's last layer caches keys and values for every token but computes the rest (queries,
    attention, output projection, MLP) only for the last token, whose state predicts the first new token."""
    *inner, (n_last, last_block_layers) = blocks
    total = sum(layers * layer_flops(config, n, n_out=n) for n, layers in inner)
    total += (last_block_layers - 1) * layer_flops(config, n_last, n_out=n_last)
    return total + layer_flops(config, n_last, n_out=1)


def layer_flops(config: TextModelConfig, n: int, n_out: int) -> float:
    """One decoder layer over n tokens of which the last n_out produce an output (the rest are only cached)."""
    H, I, hs = config.hidden_size, config.intermediate_size, config.head_dim
    q_width, kv_width = config.num_heads * hs, config.num_kv_heads * hs
    cached_per_token = 2 * 2 * H * kv_width  # k and v projections
    output_per_token = 2 * (H * q_width + q_width * H + 3 * H * I)  # q, o and the MLP
    causal_pairs = n * (n + 1) / 2 - (n - n_out) * (n - n_out + 1) / 2  # query-key pairs of the output rows
    attention = 2 * 2 * config.num_heads * hs * causal_pairs  # QKᵀ and AV
    return n * cached_per_token + n_out * output_per_token + attention


# ---------------------------------------------------------------------------------------------- the run


def measure_length(
    model: LyraTextModel, lm_head: nn.Linear, n_tokens: int, extractors: dict, args: argparse.Namespace
) -> dict:
    prompt = build_prompt(model, n_tokens)
    series = {name: Series() for name in CONFIGS}
    names = list(CONFIGS)
    for round_idx in range(args.repeats):
        order = names[round_idx % len(names) :] + names[: round_idx % len(names)]
        for name in order:
            series[name].runs.append(run_once(model, lm_head, prompt, extractors[name], args))
    return summarize_length(model.config, n_tokens, series, args)


def summarize_length(config: TextModelConfig, n_tokens: int, series: dict[str, Series], args) -> dict:
    row: dict = {}
    base_flops = prefill_flops(config, [(n_tokens, config.num_layers)])
    for name, s in series.items():
        blocks = block_tokens(s.runs[0].result, n_tokens, config.num_layers)
        row[name] = {
            "prefill_s": [r.prefill_s for r in s.runs],
            "median_prefill_s": statistics.median(r.prefill_s for r in s.runs),
            "decode_tokens_per_s": args.decode_tokens / statistics.median(r.decode_s for r in s.runs),
            "peak_bytes": [r.peak_bytes for r in s.runs],
            "median_peak_bytes": statistics.median(r.peak_bytes for r in s.runs),
            "kv_cache_bytes": s.runs[0].kv_cache_bytes,
            "block_tokens": blocks,
            "prefill_flops": prefill_flops(config, blocks),
        }
    base = row["baseline"]
    for name in CONFIGS:
        row[name]["speedup"] = base["median_prefill_s"] / row[name]["median_prefill_s"]
        row[name]["flop_ratio"] = base_flops / row[name]["prefill_flops"]
    return row


def measure(args: argparse.Namespace) -> dict:
    dtype = DTYPES[args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
    model, lm_head = build_model(args, dtype)
    extractors = {name: spec and parse_extract(spec, args.layers) for name, spec in CONFIGS.items()}
    for extractor in extractors.values():  # warm-up: kernels, allocator, thread pools
        run_once(model, lm_head, build_prompt(model, WARMUP_TOKENS), extractor, args)
    lengths = {}
    for n_tokens in args.lengths:
        lengths[n_tokens] = measure_length(model, lm_head, n_tokens, extractors, args)
        print_length(n_tokens, lengths[n_tokens], flush=True)
    return {
        "settings": {**vars(args), "dtype": str(dtype).removeprefix("torch."), "out": str(args.out)},
        "config": {**model.config.__dict__, "head_dim": model.config.head_dim},
        "machine": machine(args),
        "lengths": lengths,
        "verdict": verdict(lengths[args.lengths[-1]]),
    }


def verdict(row: dict) -> dict:
    checked, base = row[CHECKED_CONFIG], row["baseline"]
    return {
        "config": CHECKED_CONFIG,
        "speedup": checked["speedup"],
        "flop_ratio": checked["flop_ratio"],
        "speedup_over_flop_ratio": checked["speedup"] / checked["flop_ratio"],
        "speedup_reaches_target": checked["speedup"] >= TARGET_FRACTION_OF_FLOP_RATIO * checked["flop_ratio"],
        "peak_memory_falls": checked["median_peak_bytes"] < base["median_peak_bytes"],
    }


def machine(args: argparse.Namespace) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "load_average_1min_at_end": os.getloadavg()[0],  # other processes on a shared machine
    }


# ---------------------------------------------------------------------------------------------- output


def print_header(args: argparse.Namespace) -> None:
    print(
        f"extractor: {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, "
        f"intermediate {args.intermediate}, {args.device} {args.dtype or 'default dtype'}, chunk {args.chunk_tokens}, "
        f"median of {args.repeats}, {torch.get_num_threads()} threads"
    )
    print(f"{'tokens':>7} {'config':12} {'prefill s':>10} {'speedup':>8} {'FLOP ratio':>11} {'decode tok/s':>13} "
          f"{'peak MiB':>9} {'KV MiB':>7}  tokens per block")  # fmt: skip


def print_length(n_tokens: int, row: dict, flush: bool = False) -> None:
    for name, r in row.items():
        blocks = "/".join(str(n) for n, _ in r["block_tokens"])
        print(f"{n_tokens:>7} {name:12} {r['median_prefill_s']:10.3f} {r['speedup']:8.2f} {r['flop_ratio']:11.2f} "
              f"{r['decode_tokens_per_s']:13.2f} {r['median_peak_bytes'] / MIB:9.0f} {r['kv_cache_bytes'] / MIB:7.0f}"
              f"  {blocks}", flush=flush)  # fmt: skip


def print_verdict(v: dict, n_tokens: int) -> None:
    target = TARGET_FRACTION_OF_FLOP_RATIO * v["flop_ratio"]
    print(
        f"{v['config']} at {n_tokens} tokens: speedup {v['speedup']:.2f} vs FLOP ratio {v['flop_ratio']:.2f} "
        f"({v['speedup_over_flop_ratio']:.0%} of it; target >= {target:.2f}: "
        f"{'PASS' if v['speedup_reaches_target'] else 'FAIL'}); peak memory falls: "
        f"{'PASS' if v['peak_memory_falls'] else 'FAIL'}"
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--lengths", type=lambda s: [int(n) for n in s.split(",")], default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=4864)
    p.add_argument("--chunk-tokens", type=int, default=None, help="chunked prefill for all three (default: one shot)")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/extractor.json"))
    return p.parse_args()


def main() -> None:
    args = parse_args()
    print_header(args)
    result = measure(args)
    print_verdict(result["verdict"], args.lengths[-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
