"""Our decoder loop (`engine.llm`) against transformers' Qwen2VLTextModel (SDPA) on the same random weights.

Each run: prefill a prompt of --prompt-tokens, then --new-tokens greedy steps (lm_head -> argmax -> embed ->
one cached decode step). The two implementations alternate within one process (warm-up, then --repeats
rounds, the order flipped every round) and the medians are compared. Prints a table and writes JSON.

    python -m benchmarks.decoder                       # CPU fp32, 2048 + 64 tokens, 8 layers of 1024
    python -m benchmarks.decoder --device cuda --layers 28 --hidden 3584
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import transformers
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

from lyra_cli.engine.config import TextModelConfig
from lyra_cli.engine.llm import KVCache, LyraTextModel

HEAD_DIM = 64
QUERY_HEADS_PER_KV_HEAD = 4
QWEN2_MROPE_SECTION = (16, 24, 24)  # for head_dim 128; scaled to HEAD_DIM below
FFN_RATIO = 2.75  # Qwen2 sizes: 1024 -> 2816
FFN_MULTIPLE = 256
VOCAB_SIZE = 32000
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMPLEMENTATIONS = ("ours", "transformers")

# step(embeds (1, T, H), positions (3, 1, T)) -> last hidden state (1, T, H), carrying its own cache.
Step = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Timings:
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def bench_config(hidden: int, layers: int) -> TextModelConfig:
    heads = hidden // HEAD_DIM
    scale = HEAD_DIM // 2 / sum(QWEN2_MROPE_SECTION)
    section = tuple(int(s * scale) for s in QWEN2_MROPE_SECTION)
    intermediate = -(-int(hidden * FFN_RATIO) // FFN_MULTIPLE) * FFN_MULTIPLE
    return TextModelConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=max(1, heads // QUERY_HEADS_PER_KV_HEAD),
        mrope_section=section,  # type: ignore[arg-type]
    )


def build_models(config: TextModelConfig, device: str, dtype: torch.dtype) -> tuple[nn.Module, nn.Module, nn.Linear]:
    hf_config = Qwen2VLTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "mrope_section": list(config.mrope_section), "rope_theta": config.rope_theta},
        bos_token_id=None,
        eos_token_id=None,
    )
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    theirs = Qwen2VLTextModel(hf_config).eval()  # transformers' own random init
    ours = LyraTextModel(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    nn.init.normal_(lm_head.weight, std=0.02)
    return ours.to(device, dtype), theirs.to(device, dtype), lm_head.to(device, dtype)


def new_step(impl: str, model: nn.Module, config: TextModelConfig, capacity: int) -> Step:
    if impl == "ours":
        cache = KVCache.empty(config, capacity=capacity)  # what our generate loop does: prompt + new tokens
        return lambda embeds, positions: model(embeds, positions, cache)
    hf_cache = DynamicCache(config=model.config)
    return lambda embeds, positions: model(
        inputs_embeds=embeds, position_ids=positions, past_key_values=hf_cache, use_cache=True
    ).last_hidden_state


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def run_once(impl: str, model: nn.Module, lm_head: nn.Linear, args: argparse.Namespace, config: TextModelConfig) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds, generated token ids) of one prompt + greedy continuation."""
    n_prompt = args.prompt_tokens
    ids = torch.arange(n_prompt, device=args.device).view(1, -1) * 31 % config.vocab_size
    positions = torch.arange(n_prompt, device=args.device).expand(3, 1, -1)  # text layout
    step = new_step(impl, model, config, capacity=n_prompt + args.new_tokens)
    embed = model.embed_tokens
    sync(args.device)
    start = time.perf_counter()
    hidden = step(embed(ids), positions)
    sync(args.device)
    prefill_s = time.perf_counter() - start
    tokens: list[int] = []
    start = time.perf_counter()
    for i in range(args.new_tokens):
        token = lm_head(hidden[:, -1]).argmax(-1, keepdim=True)  # (1, 1)
        tokens.append(token)
        hidden = step(embed(token), torch.full((3, 1, 1), n_prompt + i, device=args.device))
    sync(args.device)
    decode_s = time.perf_counter() - start
    return prefill_s, decode_s, [int(t) for t in tokens]


def measure(args: argparse.Namespace) -> dict:
    dtype = DTYPES[args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
    config = bench_config(args.hidden, args.layers)
    ours, theirs, lm_head = build_models(config, args.device, dtype)
    models = {"ours": ours, "transformers": theirs}
    timings = {impl: Timings() for impl in IMPLEMENTATIONS}
    for round_idx in range(args.warmup + args.repeats):
        order = IMPLEMENTATIONS if round_idx % 2 == 0 else IMPLEMENTATIONS[::-1]
        for impl in order:
            prefill_s, decode_s, tokens = run_once(impl, models[impl], lm_head, args, config)
            if round_idx >= args.warmup:
                timings[impl].prefill_s.append(prefill_s)
                timings[impl].decode_s.append(decode_s)
                timings[impl].tokens = tokens
    return summarize(args, config, dtype, timings)


def summarize(args: argparse.Namespace, config: TextModelConfig, dtype: torch.dtype, timings: dict[str, Timings]) -> dict:
    result: dict = {
        "settings": {**vars(args), "dtype": str(dtype).removeprefix("torch.")},
        "config": {**config.__dict__, "head_dim": config.head_dim},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            # other processes on a shared machine show up here and as outliers in the per-run lists
            "load_average_1min_at_end": os.getloadavg()[0],
        },
        "greedy_tokens_agree": timings["ours"].tokens == timings["transformers"].tokens,
    }
    for impl, t in timings.items():
        decode_s = statistics.median(t.decode_s)
        result[impl] = {
            "prefill_s": t.prefill_s,
            "decode_s": t.decode_s,
            "median_prefill_s": statistics.median(t.prefill_s),
            "median_decode_tokens_per_s": args.new_tokens / decode_s,
        }
    ours, theirs = result["ours"], result["transformers"]
    result["time_ratio_ours_over_transformers"] = {
        "prefill": ours["median_prefill_s"] / theirs["median_prefill_s"],
        "decode": theirs["median_decode_tokens_per_s"] / ours["median_decode_tokens_per_s"],
    }
    return result


def print_table(result: dict) -> None:
    s, c = result["settings"], result["config"]
    print(
        f"decoder: {c['num_layers']} layers, hidden {c['hidden_size']}, heads {c['num_heads']}/{c['num_kv_heads']}, "
        f"{s['prompt_tokens']} prompt + {s['new_tokens']} new tokens, {s['device']} {s['dtype']}, "
        f"median of {s['repeats']} (torch {result['machine']['torch']}, {result['machine']['cpu_threads']} threads)"
    )
    print(f"{'':14}{'prefill s':>12}{'decode tok/s':>15}")
    for impl in IMPLEMENTATIONS:
        r = result[impl]
        print(f"{impl:14}{r['median_prefill_s']:12.3f}{r['median_decode_tokens_per_s']:15.2f}")
    ratio = result["time_ratio_ours_over_transformers"]
    print(f"{'time ratio':14}{ratio['prefill']:12.3f}{ratio['decode']:15.3f}   (ours / transformers, <= 1.05 passes)")
    print(f"greedy tokens agree: {result['greedy_tokens_agree']}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/decoder.json"))
    return p.parse_args()


def main() -> None:
    args = parse_args()
    result = measure(args)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result["settings"]["out"] = str(args.out)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
