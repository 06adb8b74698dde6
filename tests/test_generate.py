"""Sampling rules and the text streamer, checked on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch

from lyra_cli.engine.model.config import SamplingConfig, sampling_from_generation_config
from lyra_cli.engine.run.generate import (
    TextStreamer,
    apply_repetition_penalty,
    choose_token,
    filter_top_k_top_p,
)
from lyra_cli.errors import UsageError


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_top_k_and_top_p_filters() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isinf(filter_top_k_top_p(logits, 2, 1.0)).tolist() == [False, False, True, True]
    # top_p 0.7: 0.5 alone is below, 0.5 + 0.3 reaches it → keep two
    assert torch.isinf(filter_top_k_top_p(logits, 0, 0.7)).tolist() == [False, False, True, True]
    # the most likely token always survives
    assert not math.isinf(filter_top_k_top_p(logits, 0, 0.01)[0])


def test_greedy_and_seeded_sampling() -> None:
    logits = torch.tensor([0.1, 3.0, 0.2])
    none = torch.empty(0, dtype=torch.long)
    assert choose_token(logits, none, SamplingConfig(), None) == 1
    flat = torch.zeros(50)  # uniform: any global-RNG leak would change the draws
    cfg = SamplingConfig(temperature=1.0, seed=3)

    def draws(global_seed: int) -> list[int]:
        torch.manual_seed(global_seed)
        generator = torch.Generator().manual_seed(3)
        return [choose_token(flat, none, cfg, generator) for _ in range(8)]

    assert draws(0) == draws(1)  # only the seeded generator decides
    assert len(set(draws(0))) > 1  # and it does sample


def test_generation_config_top_k_1_is_greedy() -> None:
    cfg = sampling_from_generation_config({"do_sample": True, "temperature": 0.1, "top_k": 1, "top_p": 0.001,
                                           "repetition_penalty": 1.05})  # fmt: skip
    assert cfg.greedy and cfg.repetition_penalty == 1.05
    assert sampling_from_generation_config({}).greedy


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("max_new_tokens", 0)])
def test_bad_sampling_values_are_usage_errors(field: str, value: float) -> None:
    with pytest.raises(UsageError):
        SamplingConfig(**{field: value}).validate()


class _ByteTokenizer:
    """Each id is one UTF-8 byte: multi-byte characters arrive in pieces."""

    def decode(self, ids, skip_special_tokens=True):  # noqa: ANN001, ARG002
        return bytes(ids).decode("utf-8", errors="replace")


class _CountingTokenizer(_ByteTokenizer):
    def __init__(self) -> None:
        self.decoded = 0

    def decode(self, ids, skip_special_tokens=True):  # noqa: ANN001
        self.decoded += len(ids)
        return super().decode(ids, skip_special_tokens)


def test_streamer_decodes_a_window_not_the_whole_answer() -> None:
    tokenizer = _CountingTokenizer()
    streamer = TextStreamer(tokenizer)
    text = "ab中" * 400  # 2000 ids, some characters in three pieces
    deltas = [streamer.push(b) for b in text.encode()] + [streamer.flush()]
    assert "".join(deltas) == text == streamer.emitted
    assert tokenizer.decoded < 10 * len(text.encode())  # re-decoding everything each step: ~2,000,000


def test_streamer_equals_decoding_the_whole_answer_with_the_real_tokenizer(tiny_dir) -> None:
    from lyra_cli.engine.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_dir)
    ids = tokenizer.encode("Hello, wörld! 中文 🙂 tabs\tand\nlines", add_special_tokens=False)
    ids = ids[:5] + [tokenizer.convert_tokens_to_ids("<|im_end|>")] + ids[5:]  # a special token is skipped
    streamer = TextStreamer(tokenizer)
    streamed = "".join(streamer.push(i) for i in ids) + streamer.flush()
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True)


def test_streamer_never_splits_a_character() -> None:
    streamer = TextStreamer(_ByteTokenizer())
    deltas = [streamer.push(b) for b in "é中🙂!".encode()]
    deltas.append(streamer.flush())
    assert "".join(deltas) == "é中🙂!"
    assert all("\ufffd" not in d for d in deltas)
