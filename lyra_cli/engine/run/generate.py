"""Our decoding loop: prefill once, then one token at a time on the KV cache.

`stream_steps` yields every generated token with the final-norm hidden state that predicted it (the
speech generator consumes those, docs/authors-behaviour.md#speech-generator); `TextStreamer` turns ids into text deltas
that never split a UTF-8 character.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lyra_cli.engine.model.config import SamplingConfig
from lyra_cli.engine.model.kvcache import KVCache
from lyra_cli.engine.model.network import LyraForCausalLM
from lyra_cli.engine.run.prefill import PrefillPlan, PrefillResult, ProgressFn, prefill
from lyra_cli.engine.run.prompt import PromptInputs

REPLACEMENT_CHAR = "\ufffd"  # what a tokenizer returns for an incomplete UTF-8 sequence
END_STATE = -1  # token id of the extra step that carries the end token's own state (`feed_end`)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on the tokens in `seen`.

    Only generated tokens count: the authors generate from `inputs_embeds` with an empty `input_ids`
    (docs/authors-behaviour.md#m-rope-positions), so their penalty never sees the prompt."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    scores = logits.gather(-1, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(-1, seen, scores)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p; the first always stays
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def choose_token(
    logits: torch.Tensor, seen: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None
) -> int:
    """logits (V,) fp32 → next token id."""
    return sample_token(apply_repetition_penalty(logits, seen, cfg.repetition_penalty), cfg, generator)


def sample_token(scores: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> int:
    """Penalized logits (V,) → next token id: argmax, or a draw after temperature and top-k/top-p."""
    if cfg.greedy:
        return int(scores.argmax())
    scores = filter_top_k_top_p(scores / cfg.temperature, cfg.top_k, cfg.top_p)
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


@dataclass(frozen=True)
class StepLogprobs:
    """A step's log-probabilities: of the chosen token, and of the `n` most likely tokens (most likely first)."""

    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob)


def token_logprobs(scores: torch.Tensor, token: int, n: int) -> StepLogprobs:
    """Log-softmax of the penalized logits (V,) in fp32, as OpenAI reports them: after the repetition
    penalty, before temperature and top-k/top-p, so they describe the model, not the sampler."""
    logprobs = torch.log_softmax(scores.float(), dim=-1)
    top = torch.topk(logprobs, min(n, logprobs.shape[-1]))  # sorted, most likely first
    pairs = tuple(zip(top.indices.tolist(), top.values.tolist()))
    return StepLogprobs(float(logprobs[token]), pairs)


@dataclass(frozen=True)
class Step:
    token_id: int
    hidden: torch.Tensor  # (H,) final-norm state that predicted this token
    is_end: bool
    logprobs: StepLogprobs | None = None  # with `cfg.logprobs` set; never for the END_STATE step


def _generator(cfg: SamplingConfig) -> torch.Generator | None:
    if cfg.greedy or cfg.seed is None:
        return None
    return torch.Generator().manual_seed(cfg.seed)


@torch.inference_mode()
def stream_steps(
    model: LyraForCausalLM,
    inputs: PromptInputs,
    *,
    cfg: SamplingConfig,
    end_ids: set[int],
    plan: PrefillPlan | None = None,
    on_prefilled: Callable[[PrefillResult], None] | None = None,
    on_prefill_progress: ProgressFn | None = None,
    feed_end: bool = False,
) -> Iterator[Step]:
    """Prefill `inputs` as `plan` says (None: into a fresh cache, no extractor, no chunking), then yield
    tokens until an end id (yielded with `is_end`) or `max_new_tokens`. Decoding runs on the caches the
    prefill left, which the extractor may have shortened; new tokens keep the original position numbering.

    `on_prefilled(result)` is called once the prefill completed, before the first token. With `feed_end`,
    the end token is fed too and one last step (token -1) carries the state it produces: the state *of*
    the end token, which the speech generator sees in training (docs/authors-behaviour.md#speech-generator)."""
    backbone = model.model
    if plan is None:
        plan = PrefillPlan(KVCache.empty(model.config.text, capacity=inputs.n_tokens + cfg.max_new_tokens))
    result = prefill(backbone, inputs.embeds, inputs.positions, plan, kinds=inputs.kinds,
                     on_progress=on_prefill_progress)  # fmt: skip
    if on_prefilled is not None:
        on_prefilled(result)
    hidden = result.last_hidden  # (1, H)
    generator = _generator(cfg)
    seen = torch.empty(0, dtype=torch.long, device=hidden.device)
    for step in range(cfg.max_new_tokens):
        scores = apply_repetition_penalty(model.logits(hidden)[0], seen, cfg.repetition_penalty)
        token = sample_token(scores, cfg, generator)
        is_end = token in end_ids
        scored = token_logprobs(scores, token, cfg.logprobs) if cfg.logprobs is not None else None
        yield Step(token, hidden[0], is_end, scored)
        if is_end and not feed_end:
            return
        seen = torch.cat([seen, torch.tensor([token], device=seen.device)])
        position = torch.full((3, 1, 1), inputs.next_position + step, device=hidden.device, dtype=torch.long)
        embeds = backbone.embed_tokens(torch.tensor([[token]], device=hidden.device))
        hidden = backbone(embeds, position, plan.cache)[:, -1]
        if is_end:
            yield Step(END_STATE, hidden[0], True)
            return


class TextStreamer:
    """Turns generated ids into text deltas; holds back text that ends in an incomplete character.

    Decodes only a window of the ids (those since the last complete delta, plus the new ones), so a long
    answer costs O(n) decoding instead of re-decoding everything per token. The window starts where an
    earlier delta ended on a whole character, so decoding it alone gives the same characters."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decoded window
        self.read_offset = 0  # ids[prefix_offset:read_offset] is text already emitted
        self._deltas: list[str] = []

    @property
    def emitted(self) -> str:
        """All text returned so far."""
        return "".join(self._deltas)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._delta(final=False)

    def flush(self) -> str:
        return self._delta(final=True)

    def _delta(self, *, final: bool) -> str:
        emitted = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if not final and (len(text) <= len(emitted) or text.endswith(REPLACEMENT_CHAR)):
            return ""  # nothing new yet, or a character whose other bytes are still to come
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._deltas.append(text[len(emitted) :])
        return self._deltas[-1]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
