"""Our decoder loop (`engine.model.network`) against transformers' Qwen2VLTextModel (SDPA) on the same random weights.

Each run: prefill a prompt of --prompt-tokens, then --new-tokens greedy steps (lm_head -> argmax -> embed ->
one cached decode step). The two implementations run side by side in one process: in each round the two
prefills back to back, then the decode steps interleaved token by token (the order flipped every round), so
load from other processes hits both alike. Warm-up rounds, then --repeats rounds; medians are compared
(best runs are in the JSON too). Prints a table and writes JSON.

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

from lyra_cli.engine.model.config import TextModelConfig
from lyra_cli.engine.model.kvcache import KVCache
from lyra_cli.engine.model.network import LyraTextModel

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


def build_models(
    config: TextModelConfig, device: str, dtype: torch.dtype
) -> tuple[nn.Module, nn.Module, nn.Linear]:
    hf_config = Qwen2VLTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={
            "rope_type": "default",
            "mrope_section": list(config.mrope_section),
            "rope_theta": config.rope_theta,
        },
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


class Generation:
    """One implementation's greedy continuation of the prompt, advanced one timed call at a time."""

    def __init__(
        self, impl: str, model: nn.Module, lm_head: nn.Linear, config: TextModelConfig, args: argparse.Namespace
    ) -> None:
        self.step = new_step(impl, model, config, capacity=args.prompt_tokens + args.new_tokens)
        self.embed, self.lm_head, self.device = model.embed_tokens, lm_head, args.device
        self.position = args.prompt_tokens  # text layout: the next token's M-RoPE position
        self.hidden: Tensor | None = None
        self.tokens: list[Tensor] = []
        self.prefill_s = 0.0
        self.decode_s = 0.0  # summed over steps

    def prefill(self, ids: Tensor) -> None:
        positions = torch.arange(ids.shape[1], device=self.device).expand(3, 1, -1)
        self.prefill_s = self._timed(lambda: self.step(self.embed(ids), positions))

    def decode(self) -> None:
        def one_token() -> Tensor:
            assert self.hidden is not None
            token = self.lm_head(self.hidden[:, -1]).argmax(-1, keepdim=True)  # (1, 1)
            self.tokens.append(token)
            return self.step(self.embed(token), torch.full((3, 1, 1), self.position, device=self.device))

        self.decode_s += self._timed(one_token)
        self.position += 1

    def _timed(self, fn: Callable[[], Tensor]) -> float:
        sync(self.device)
        start = time.perf_counter()
        self.hidden = fn()
        sync(self.device)
        return time.perf_counter() - start


@torch.inference_mode()
def run_round(
    models: dict[str, nn.Module],
    lm_head: nn.Linear,
    config: TextModelConfig,
    args: argparse.Namespace,
    order: tuple[str, ...],
) -> dict[str, Generation]:
    """Both implementations side by side: the two prefills back to back, then the decode steps interleaved
    token by token, so load from other processes on a shared machine hits both alike."""
    ids = torch.arange(args.prompt_tokens, device=args.device).view(1, -1) * 31 % config.vocab_size
    runs = {impl: Generation(impl, models[impl], lm_head, config, args) for impl in order}
    for impl in order:
        runs[impl].prefill(ids)
    for _ in range(args.new_tokens):
        for impl in order:
            runs[impl].decode()
    return runs


def measure(args: argparse.Namespace) -> dict:
    dtype = DTYPES[args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
    config = bench_config(args.hidden, args.layers)
    ours, theirs, lm_head = build_models(config, args.device, dtype)
    models = {"ours": ours, "transformers": theirs}
    timings = {impl: Timings() for impl in IMPLEMENTATIONS}
    for round_idx in range(args.warmup + args.repeats):
        order = IMPLEMENTATIONS if round_idx % 2 == 0 else IMPLEMENTATIONS[::-1]
        runs = run_round(models, lm_head, config, args, order)
        if round_idx < args.warmup:
            continue
        for impl, run in runs.items():
            timings[impl].prefill_s.append(run.prefill_s)
            timings[impl].decode_s.append(run.decode_s)
            timings[impl].tokens = [int(t) for t in run.tokens]
    return summarize(args, config, dtype, timings)


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def summarize(
    args: argparse.Namespace, config: TextModelConfig, dtype: torch.dtype, timings: dict[str, Timings]
) -> dict:
    result: dict = {
        "settings": {**vars(args), "dtype": str(dtype).removeprefix("torch.")},
        "config": {**config.__dict__, "head_dim": config.head_dim},
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
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
            "best_prefill_s": min(t.prefill_s),
            "best_decode_tokens_per_s": args.new_tokens / min(t.decode_s),
        }
    ours, theirs = result["ours"], result["transformers"]
    result["time_ratio_ours_over_transformers"] = {
        "prefill": ours["median_prefill_s"] / theirs["median_prefill_s"],
        "decode": theirs["median_decode_tokens_per_s"] / ours["median_decode_tokens_per_s"],
        "best_prefill": ours["best_prefill_s"] / theirs["best_prefill_s"],
        "best_decode": theirs["best_decode_tokens_per_s"] / ours["best_decode_tokens_per_s"],
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
