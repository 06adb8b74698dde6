"""8-bit / 4-bit replacement of the decoder's linears with bitsandbytes, on CPU.

Contracts: exactly the chosen linears are replaced (by type and count); norms, embeddings and skipped names
are untouched; the quantized model's logits stay close to full precision, through prefill and cached decode.
"""

from __future__ import annotations

import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lyra_cli.engine.model.config import TextModelConfig
from lyra_cli.engine.model.kvcache import KVCache
from lyra_cli.engine.model.network import INIT_STD, LyraTextModel, RMSNorm
from lyra_cli.engine.model.quant import describe_quantization, quantize_linears
from lyra_cli.errors import MissingDependencyError

bnb = pytest.importorskip("bitsandbytes")

# hidden and intermediate >= 64 and multiples of 64, kv width 32: shapes bnb's CPU 4-bit kernel accepts.
CONFIG = TextModelConfig(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    mrope_section=(2, 3, 3),
)
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down
# Logits cosine to full precision, Qwen2 init (std 0.02): measured 0.9999 (8-bit) and 0.995 (4-bit) in fp32
# and bf16. (Random nets amplify errors with depth and weight scale: std 0.1 gives 0.957 for 4-bit.)
MIN_COSINE = {"8bit": 0.999, "4bit": 0.98}
# One layer against a float matmul with its own dequantized weight: measured 3e-3 (4-bit, bf16 CPU kernel)
# and 7e-3 (8-bit, int8 activations), relative.
MAX_LAYER_REL_ERROR = 2e-2
BNB_CLASS = {"8bit": "Linear8bitLt", "4bit": "Linear4bit"}
N_PROMPT, N_DECODE_STEPS = 24, 3
INT8_MAX = 127


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = LyraTextModel(CONFIG)
        self.lm_head = nn.Linear(CONFIG.hidden_size, CONFIG.vocab_size, bias=False)


def tiny_lm(dtype: torch.dtype) -> TinyLM:
    torch.manual_seed(0)
    lm = TinyLM()
    lm.model.init_weights()
    nn.init.normal_(lm.lm_head.weight, std=INIT_STD)
    return lm.to(dtype).eval()


def run_logits(lm: TinyLM) -> Tensor:
    """Logits of a prefill and greedy cached decode steps, (N_PROMPT + N_DECODE_STEPS, vocab), fp32."""
    ids = torch.arange(N_PROMPT).view(1, -1) * 7 % CONFIG.vocab_size
    cache, outputs = KVCache.empty(CONFIG), []
    embeds = lm.model.embed_tokens(ids)
    positions = torch.arange(N_PROMPT).expand(3, 1, -1)
    with torch.no_grad():
        for step in range(N_DECODE_STEPS + 1):
            logits = lm.lm_head(lm.model(embeds, positions, cache))[0].float()
            outputs.append(logits)
            embeds = lm.model.embed_tokens(ids[:, step : step + 1])  # fixed tokens: same path for both
            positions = torch.full((3, 1, 1), N_PROMPT + step)
    return torch.cat(outputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantized_decoder_stays_close(mode: str, dtype: torch.dtype) -> None:
    reference = run_logits(tiny_lm(dtype))
    lm = tiny_lm(dtype)
    norms_before = {n: p.clone() for n, p in lm.named_parameters() if "norm" in n or "embed" in n}
    count = quantize_linears(lm, mode, compute_dtype=dtype, skip=lambda name: name == "lm_head")

    assert count == LINEARS_PER_LAYER * CONFIG.num_layers
    quantized = [n for n, m in lm.named_modules() if type(m).__name__ == BNB_CLASS[mode]]
    assert len(quantized) == count and all(n.startswith("model.layers.") for n in quantized)
    assert type(lm.lm_head) is nn.Linear and lm.lm_head.weight.dtype == dtype
    assert all(isinstance(layer.input_layernorm, RMSNorm) for layer in lm.model.layers)
    for name, param in lm.named_parameters():
        if name in norms_before:
            assert torch.equal(param, norms_before[name]), name
    attn = lm.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None
    weight_dtype = torch.int8 if mode == "8bit" else torch.uint8
    assert attn.q_proj.weight.dtype == weight_dtype

    logits = run_logits(lm)
    assert torch.isfinite(logits).all()
    cosine = F.cosine_similarity(logits.flatten(), reference.flatten(), dim=0).item()
    assert cosine > MIN_COSINE[mode], cosine


def dequantized_weight(layer: nn.Module) -> Tensor:
    """The float weight a bnb layer represents, (out, in)."""
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    return layer.weight.data.float() * layer.weight.SCB.float()[:, None] / INT8_MAX


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_each_layer_computes_with_its_own_weights(mode: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(128, 64)).eval()
    weight = net[0].weight.detach().clone()
    quantize_linears(net, mode, compute_dtype=torch.float32)
    expected = dequantized_weight(net[0])  # before the first call: CPU 4-bit repacks the weight there
    assert (expected - weight).norm() / weight.norm() < (0.12 if mode == "4bit" else 0.01)  # NF4 ~0.09
    x = torch.randn(5, 128)
    with torch.no_grad():
        y = net(x)
    reference = x @ expected.T + net[0].bias
    assert ((y - reference).norm() / reference.norm()).item() < MAX_LAYER_REL_ERROR


def test_biases_are_kept_exactly() -> None:
    lm = tiny_lm(torch.float32)
    bias = lm.model.layers[1].self_attn.v_proj.bias.detach().clone()
    quantize_linears(lm.model, "4bit", compute_dtype=torch.float32)
    assert torch.equal(lm.model.layers[1].self_attn.v_proj.bias, bias)


def test_cpu_4bit_keeps_unsupported_shapes_in_full_precision(caplog: pytest.LogCaptureFixture) -> None:
    # bnb's packed CPU 4-bit kernel needs in_features % 64 == 0 and out_features % 32 == 0; without the
    # guard the 96 -> 64 layer fails at its first eval forward ("shape '[64, 1]' is invalid").
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 64)).eval()
    with caplog.at_level(logging.WARNING, logger="lyra_cli.engine.model.quant"):
        assert quantize_linears(net, "4bit", compute_dtype=torch.float32) == 1
    assert isinstance(net[0], bnb.nn.Linear4bit) and type(net[1]) is nn.Linear
    assert "`1` (96 -> 64) in full precision" in caplog.text
    with torch.no_grad():
        assert net(torch.randn(2, 64)).shape == (2, 64)


def test_int8_cast_warning_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    lm = tiny_lm(torch.float32)
    quantize_linears(lm.model, "8bit", compute_dtype=torch.float32)
    with caplog.at_level(logging.WARNING):
        run_logits(lm)
    assert sum("cast from" in r.getMessage() for r in caplog.records) <= 1


def test_describe_quantization() -> None:
    assert describe_quantization("4bit", torch.bfloat16) == "4-bit NF4, double quantization, compute bf16"
    assert describe_quantization("8bit") == "8-bit LLM.int8(), outlier threshold 6"
    with pytest.raises(ValueError, match="valid: 8bit, 4bit"):
        describe_quantization("3bit")  # type: ignore[arg-type]


def test_missing_bitsandbytes_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(MissingDependencyError) as info:
        quantize_linears(nn.Sequential(nn.Linear(64, 64)), "8bit", compute_dtype=torch.float32)
    assert "bitsandbytes" in info.value.message and "lyra-cli[quant]" in (info.value.hint or "")
