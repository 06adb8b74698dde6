"""Typed events of the pipeline. Commands render them; tests assert on them; nothing else is printed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a step: its text, id and log-probability."""

    token: str
    id: int
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the step's most likely alternatives (OpenAI's fields).

    Log-softmax of the step's logits in fp32 after the repetition penalty, before temperature and
    top-k/top-p. `token` is that single id decoded on its own, special tokens by name; a byte-level piece
    that is only part of a UTF-8 character decodes to U+FFFD, as the tokenizer gives it."""

    token: str
    id: int
    logprob: float
    top_logprobs: tuple[TopLogprob, ...] = ()  # most likely first; empty with `--logprobs 0`

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["top_logprobs"] = list(record["top_logprobs"])
        return record


@dataclass(frozen=True)
class TextDelta:
    """New answer text, in order; the concatenation of all deltas is the answer.

    With log-probabilities asked for, `logprobs` holds those of the tokens whose text this delta
    completes (a token held back as part of a character rides on the next delta), so the deltas of a
    turn carry every generated token exactly once, in order."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, eq=False)
class AudioChunk:
    """New answer audio, in order: float32 mono samples at `sample_rate_hz`, starting at `start_s`."""

    samples: "np.ndarray"
    sample_rate_hz: int
    start_s: float


@dataclass(frozen=True)
class Progress:
    """Long work under way: `done` of `total` in `unit` (e.g. seconds of audio)."""

    stage: str
    done: float
    total: float
    unit: str = ""


@dataclass(frozen=True)
class Prefilled:
    """The prompt is read: sent once, before the first answer text, so a summary prints before the answer."""

    prompt_tokens: int
    kept_tokens: int  # prompt tokens left after the extractor (= prompt_tokens when it dropped nothing)
    prefill_s: float
    reused_tokens: int = 0  # prompt tokens whose keys/values came from the previous prompt's cache (as `Done`'s)


@dataclass(frozen=True)
class Done:
    """The turn finished. Timings in seconds, token counts exact."""

    text: str
    prompt_tokens: int
    new_tokens: int
    adapter: str
    stop_reason: str  # "end" (an end token) | "length" (max new tokens)
    timings: dict[str, float] = field(default_factory=dict)
    kept_tokens: int = 0  # prompt tokens left after the extractor (= prompt_tokens when it is off)
    # per speech clip (in prompt order): its source and the (start_s, end_s) spans the extractor kept
    evidence: list[dict] = field(default_factory=list)
    reused_tokens: int = 0  # prompt tokens whose keys/values came from the previous prompt's cache
    units: list[int] = field(default_factory=list)  # the spoken answer's speech units (empty without a voice)
    logprobs: list[TokenLogprob] | None = None  # one per generated token when asked for (`SamplingConfig.logprobs`)

    @property
    def evidence_text(self) -> str:
        return "; ".join(f"{e['source']}: {e['text'] or 'nothing kept'}" for e in self.evidence)

    @property
    def tokens_per_s(self) -> float:
        decode_s = self.timings.get("decode_s", 0.0)
        return self.new_tokens / decode_s if decode_s > 0 else 0.0


Event = TextDelta | AudioChunk | Progress | Prefilled | Done
