"""The engine's front door: encode media, build the prompt, pick the adapter, stream events.

    media = [read_media("image", p), read_media("speech", q)]      # decode + validate, no model yet
    engine = Engine.load(model_dir, runtime)
    conv = Conversation()
    parts = [engine.encode(m) for m in media] + [TextPart("...")]
    for event in engine.respond(conv, parts, sampling):
        ...   # TextDelta ... Done
    done = engine.generate(conv, parts)        # the same turn, only its `Done` (or see each event: on_event)

`respond` appends the turn (with its answer) to the conversation, so the next call continues it.
Each turn re-renders the whole conversation: media are encoded once and kept, but the adapter is
chosen afresh for the prompt as it now stands, and speech is re-projected with that adapter's
projector, so every turn runs exactly as the checkpoint expects.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lyra_cli.audio.frontend import AudioFrontEnd
from lyra_cli.audio.io import SAMPLE_RATE_HZ, require_speech
from lyra_cli.audio.windows import split_windows
from lyra_cli.engine.adapters import Adapter, activate, route
from lyra_cli.engine.config import ExtractorConfig
from lyra_cli.engine.events import AudioChunk, Done, Event, Prefilled, TextDelta, TokenLogprob, TopLogprob
from lyra_cli.engine.extractor import evidence_spans, format_spans
from lyra_cli.engine.generate import END_STATE, SamplingConfig, StepLogprobs, TextStreamer, stream_steps
from lyra_cli.engine.loader import LoadedModel, load_model
from lyra_cli.engine.towers import TowerOverrides
from lyra_cli.engine.kvcache import KVCache
from lyra_cli.engine.prefill import FirstBlock, PrefillPlan, PrefillResult, ProgressFn, can_resume
from lyra_cli.engine.prompt import Conversation, Part, PromptInputs, SpeechPart, Turn, VisualPart, build_inputs, render
from lyra_cli.engine.runtime import Runtime
from lyra_cli.engine.speech import encode_speech, project_frames
from lyra_cli.engine.tokenizer import encode_chunk
from lyra_cli.engine.vision import encode_visual, load_image, load_video_frames
from lyra_cli.engine.voice import Voice
from lyra_cli.errors import InputError, setting

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class DecodedImage:
    image: Image.Image
    source: str


@dataclass(frozen=True, eq=False)
class DecodedVideo:
    frames: np.ndarray  # (T, H, W, 3) uint8, already sampled and sized to the official budget
    source: str


@dataclass(frozen=True, eq=False)
class DecodedSpeech:
    wav: np.ndarray  # (n,) float32 mono at SAMPLE_RATE_HZ
    source: str

    @property
    def duration_s(self) -> float:
        return len(self.wav) / SAMPLE_RATE_HZ


Media = DecodedImage | DecodedVideo | DecodedSpeech
MEDIA_KINDS = ("image", "video", "speech")


def read_media(kind: str, path: str | Path, front_end: AudioFrontEnd = AudioFrontEnd()) -> Media:
    """Decode and validate one input file; needs no model, so bad input fails before weights load.

    `front_end` decides how speech becomes 16 kHz mono (ours by default; `AudioFrontEnd.official()`).
    """
    if kind == "image":
        return DecodedImage(load_image(path), str(path))
    if kind == "video":
        frames, _fps = load_video_frames(path)
        return DecodedVideo(frames, str(path))
    if kind == "speech":
        wav = front_end.load(path)
        require_speech(wav, path)
        return DecodedSpeech(wav, str(path))
    raise ValueError(f"unknown media kind {kind!r}; expected one of {MEDIA_KINDS}")


class AudioClock:
    """Numbers the answer's audio chunks and times them: first sample, duration, real-time factor."""

    def __init__(self, sample_rate_hz: int, start: float) -> None:
        self.sample_rate_hz = sample_rate_hz
        self.start = start
        self.samples = 0
        self.first_audio_s: float | None = None

    def chunk(self, samples: np.ndarray) -> AudioChunk | None:
        if len(samples) == 0:
            return None
        if self.first_audio_s is None:
            self.first_audio_s = time.perf_counter() - self.start
        chunk = AudioChunk(samples, self.sample_rate_hz, self.samples / self.sample_rate_hz)
        self.samples += len(samples)
        return chunk

    def timings(self, total_s: float) -> dict[str, float]:
        if self.first_audio_s is None:
            return {}
        audio_s = self.samples / self.sample_rate_hz
        # seconds spent producing the audio per second of audio: below 1, playback never waits
        return {"first_audio_s": self.first_audio_s, "audio_s": audio_s,
                "speech_rtf": (total_s - self.first_audio_s) / audio_s if audio_s else 0.0}  # fmt: skip


@dataclass
class PrefixCache:
    """The KV cache of the last prompt, kept so that the next prompt sharing its beginning (a follow-up
    question about the same recording, the next turn of a chat) prefills only what is new."""

    embeds: torch.Tensor  # (1, T, H) the prompt the cache was built from
    positions: torch.Tensor  # (3, 1, T)
    adapter: Adapter
    cache: KVCache
    extractor: ExtractorConfig | None = None  # on: only block 1 of the cache is reusable ...
    first_block: FirstBlock | None = None  # ... with this state, from its prefill's result

    def shared_tokens(self, inputs: PromptInputs, adapter: Adapter) -> int:
        """How many leading tokens of `inputs` this cache already holds (at most all but the last)."""
        if adapter is not self.adapter:  # other LoRA weights: other keys and values
            return 0
        n = min(self.embeds.shape[1], inputs.n_tokens - 1)
        same = (self.embeds[0, :n] == inputs.embeds[0, :n]).all(-1) & (
            self.positions[:, 0, :n] == inputs.positions[:, 0, :n]
        ).all(0)
        mismatch = (~same).nonzero()
        return int(mismatch[0]) if mismatch.numel() else n


class Engine:
    def __init__(self, loaded: LoadedModel, *, reuse_prefix: bool = True) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.reuse_prefix = reuse_prefix
        self._prefix: PrefixCache | None = None
        self.voice: Voice | None = None  # `generate` speaks with it unless told otherwise (`lyra_cli.engine.load`)

    @classmethod
    def load(cls, model_dir: Path, runtime: Runtime, overrides: TowerOverrides | None = None) -> "Engine":
        return cls(load_model(model_dir, runtime, overrides))

    def sampling(self, **overrides: object) -> SamplingConfig:
        """The model's generation_config defaults with `overrides` on top (None keeps a default), validated."""
        config = replace(self.loaded.sampling_defaults, **{k: v for k, v in overrides.items() if v is not None})
        config.validate()
        return config

    # -- media --------------------------------------------------------------------------------

    def _vision(self):  # noqa: ANN202
        tower = self.model.model.vision_tower
        if tower is None or self.loaded.visual is None:
            raise InputError("this model has no vision tower",
                             f"drop {setting('image')}/{setting('video')} for this model")  # fmt: skip
        return tower.vision_tower, self.loaded.visual

    def encode(self, media: Media) -> Part:
        """Decoded media → an encoded prompt part (ViT tokens, or Whisper frames for speech)."""
        if isinstance(media, DecodedSpeech):
            tower = self.model.model.speech_tower
            if tower is None:
                raise InputError("this model has no speech tower", f"drop {setting('speech')} for this model")
            return encode_speech(tower.speech_tower, self.loaded.adapters, split_windows(media.wav), media.source)
        tower, processor = self._vision()
        if isinstance(media, DecodedImage):
            visual = processor.images([media.image])
        else:
            visual = processor.video(media.frames)
        return VisualPart(encode_visual(tower, visual), _grid(visual.grid_thw), visual.kind, media.source)

    # -- prompt -------------------------------------------------------------------------------

    def prepare(self, conversation: Conversation) -> tuple[PromptInputs, Adapter]:
        """Render the conversation, activate the routed adapter and build the prefill inputs."""
        adapter = route(part.n_windows for part in conversation.speech_parts())
        adapter = activate(self.model, self.loaded.adapters, adapter)
        projector = self.loaded.adapters.projector(adapter)
        embed = self.model.model.embed_tokens
        inputs = build_inputs(
            render(conversation),
            encode_text=lambda text: encode_chunk(self.loaded.tokenizer, text),
            embed_ids=lambda ids: embed(ids.to(embed.weight.device)),
            project_speech=lambda part: speech_tokens(part, adapter, projector),
        )
        return inputs, adapter

    # -- generation ---------------------------------------------------------------------------

    def respond(
        self,
        conversation: Conversation,
        parts: Sequence[Part],
        sampling: SamplingConfig,
        *,
        extractor: ExtractorConfig | None = None,
        chunk_tokens: int | None = None,
        voice: Voice | None = None,
        started_at: float | None = None,
        on_prefill_progress: ProgressFn | None = None,
    ) -> Iterator[Event]:
        """Add a user turn, stream the answer (text, and audio chunks with a `voice`), record it.

        Timings count from `started_at` (a `time.perf_counter()` value, e.g. the end of the user's
        speech) when given, else from this call.

        `extractor` (None: the config's, which the release ships off) drops multimodal tokens block by
        block during prefill; `chunk_tokens` bounds prefill activations for long prompts.
        `on_prefill_progress(done, total)` follows the prefill chunk by chunk, in token-layers."""
        if not parts:
            raise InputError("nothing to answer: the turn has no text, image, video or speech",
                             f"give {setting('text')} or media")  # fmt: skip
        turn = Turn(list(parts))
        conversation.turns.append(turn)
        try:
            if extractor is None and self.loaded.config.extractor.enabled:
                extractor = self.loaded.config.extractor
            yield from self._answer(conversation, turn, sampling, extractor, chunk_tokens, voice, started_at,
                                    on_prefill_progress)  # fmt: skip
        finally:
            if turn.answer is None:  # interrupted: the turn never happened
                conversation.turns.remove(turn)

    def generate(
        self,
        conversation: Conversation,
        parts: Sequence[Part],
        sampling: SamplingConfig | None = None,
        *,
        on_event: Callable[[Event], None] | None = None,
        **options: object,
    ) -> Done:
        """`respond` run to its end: the turn's `Done`, every event before it handed to `on_event` as it comes.

        `sampling` None: the model's generation_config; `voice` defaults to `self.voice`; other `options`
        are `respond`'s. An exception (from the engine or `on_event`) closes the turn at once, so an
        unfinished turn leaves the conversation then, not at garbage collection."""
        options.setdefault("voice", self.voice)
        sampling = self.loaded.sampling_defaults if sampling is None else sampling
        events = self.respond(conversation, parts, sampling, **options)  # type: ignore[arg-type]
        try:
            for event in events:
                if isinstance(event, Done):
                    return event
                if on_event is not None:
                    on_event(event)
        finally:
            events.close()
        raise AssertionError("respond ended without Done")  # respond always ends with Done

    def _answer(
        self,
        conversation: Conversation,
        turn: Turn,
        sampling: SamplingConfig,
        extractor: ExtractorConfig | None,
        chunk_tokens: int | None,
        voice: Voice | None,
        started_at: float | None,
        on_prefill_progress: ProgressFn | None,
    ) -> Iterator[Event]:
        start = started_at if started_at is not None else time.perf_counter()
        inputs, adapter = self.prepare(conversation)
        streamer = TextStreamer(self.loaded.tokenizer)
        first_token_s = None
        n_new, stop = 0, "length"
        logprobs: list[TokenLogprob] = []  # stays empty unless `sampling.logprobs` is set
        sent = 0  # logprobs already carried by a delta
        prefilled: list[tuple[PrefillResult, float]] = []  # the prefill's result, and when it completed
        plan = self._plan(inputs, adapter, extractor, chunk_tokens, inputs.n_tokens + sampling.max_new_tokens)
        speaking = voice.start() if voice is not None else None
        audio = AudioClock(voice.sample_rate_hz if voice is not None else 1, start)
        steps = stream_steps(self.model, inputs, cfg=sampling, end_ids=self.loaded.end_ids, plan=plan,
                             on_prefilled=lambda result: prefilled.append((result, time.perf_counter() - start)),
                             on_prefill_progress=on_prefill_progress,
                             feed_end=voice is not None and voice.config.aligned)  # fmt: skip
        def kept_tokens() -> int:
            if not prefilled:
                return inputs.n_tokens
            # a resumed prefill's kept set covers the whole prompt, a plain one's only what it computed
            return int(prefilled[0][0].kept_index.numel()) + plan.computed_from

        for step in steps:
            if first_token_s is None:
                first_token_s = time.perf_counter() - start
                self._keep(inputs, adapter, plan, prefilled[0][0])  # the prefill completed: keep it for the next prompt
                prefill_s = prefilled[0][1] if prefilled else first_token_s
                yield Prefilled(prompt_tokens=inputs.n_tokens, kept_tokens=kept_tokens(), prefill_s=prefill_s,
                                reused_tokens=plan.reused_tokens)
            if speaking is not None:
                chunk = audio.chunk(speaking.push(step))
                if chunk is not None:
                    yield chunk
            if step.is_end:
                stop = "end"
                if step.token_id != END_STATE and speaking is not None and voice.config.aligned:
                    continue  # the end token's own state follows as one more step
                break
            n_new += 1
            if step.logprobs is not None:
                logprobs.append(self.token_logprob(step.token_id, step.logprobs))
            delta = streamer.push(step.token_id)
            if delta:
                yield TextDelta(delta, tuple(logprobs[sent:]))
                sent = len(logprobs)
        tail = streamer.flush()
        if tail or sent < len(logprobs):  # tokens with no text of their own still get their logprobs out
            yield TextDelta(tail, tuple(logprobs[sent:]))
        if speaking is not None:
            chunk = audio.chunk(speaking.finish())
            if chunk is not None:
                yield chunk
        total = time.perf_counter() - start
        turn.answer = streamer.emitted.strip()
        first = first_token_s if first_token_s is not None else total
        result = prefilled[0][0] if prefilled else None
        prefill_s = prefilled[0][1] if prefilled else total
        yield Done(
            text=turn.answer,
            prompt_tokens=inputs.n_tokens,
            new_tokens=n_new,
            adapter=adapter.value,
            stop_reason=stop,
            timings={"first_token_s": first, "prefill_s": prefill_s, "decode_s": total - first, "total_s": total,
                     **audio.timings(total)},  # fmt: skip
            kept_tokens=kept_tokens(),
            evidence=_evidence(inputs, result.kept_index) if result is not None and result.drops else [],
            reused_tokens=plan.reused_tokens,
            units=speaking.all_units if speaking is not None else [],
            logprobs=logprobs if sampling.logprobs is not None else None,
        )

    def token_logprob(self, token_id: int, scored: StepLogprobs) -> TokenLogprob:
        """A step's log-probabilities with each token's text (see `TokenLogprob`)."""
        top = tuple(TopLogprob(self.token_text(i), i, lp) for i, lp in scored.top)
        return TokenLogprob(self.token_text(token_id), token_id, scored.logprob, top)

    def token_text(self, token_id: int) -> str:
        """One id decoded on its own: no clean-up of spaces (it would eat the space of ` .`), special
        tokens kept (an alternative may be the end token)."""
        return self.loaded.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _plan(
        self,
        inputs: PromptInputs,
        adapter: Adapter,
        extractor: ExtractorConfig | None,
        chunk_tokens: int | None,
        capacity: int,
    ) -> PrefillPlan:
        """This turn's prefill: the cache to fill, how many of the prompt's first tokens it already holds,
        the state of block 1 to resume from (extractor on), and whether to keep block 1 for the next prompt.

        The extractor's drops depend on the question, so with it only block 1 (the layers before the first
        drop) of a shared beginning is reused; the deeper layers are rebuilt (`PrefillPlan.resume`)."""
        previous, self._prefix = self._prefix, None  # kept again only after this prompt's prefill completes
        enabled = extractor if extractor is not None and extractor.enabled else None  # a disabled one drops nothing
        reused, first = 0, None
        if previous is not None and previous.extractor == enabled:
            if enabled is None:
                reused = previous.shared_tokens(inputs, adapter)
            elif previous.first_block is not None and can_resume(
                previous.first_block, inputs.kinds, enabled, self.model.config.text.num_layers
            ):
                first = previous.first_block
                reused = previous.shared_tokens(inputs, adapter)
        if reused:
            cache = previous.cache  # type: ignore[union-attr]
            cache.keep_first_block(first.n_layers if first is not None else cache.num_layers, reused)
        else:
            cache, first = KVCache.empty(self.model.config.text, capacity=capacity), None
        return PrefillPlan(cache, reused, first, enabled, chunk_tokens, keep_first_block=self.reuse_prefix)

    def _keep(self, inputs: PromptInputs, adapter: Adapter, plan: PrefillPlan, result: PrefillResult) -> None:
        """Keep this prompt's cache for the next prompt that shares its beginning; only call once its
        prefill completed (a cut-short prefill leaves a cache no prompt can build on)."""
        if self.reuse_prefix:
            self._prefix = PrefixCache(inputs.embeds, inputs.positions, adapter, plan.cache, plan.extractor,
                                       result.first_block)  # fmt: skip


def speech_tokens(part: SpeechPart, adapter: Adapter, projector: torch.nn.Module) -> torch.Tensor:
    """The clip's tokens for `adapter`: its stored ones when that adapter projected them, else from its frames."""
    if part.tokens is not None and part.adapter is adapter:
        return part.tokens
    if part.frames is None:
        encoded_for = part.adapter.value if part.adapter is not None else "no"
        raise InputError(
            f"`{part.source}` was encoded for the {encoded_for} adapter only",
            "ask about a long recording in its own conversation (/reset first)",
        )
    return project_frames(projector, part.frames)


def _evidence(inputs: PromptInputs, kept: torch.Tensor) -> list[dict]:
    """The seconds of each speech clip that survived the extractor's last drop.

    Spans are clipped to the recording: the zero padding of its last window has tokens too, and a
    kept padding token says nothing about what was heard."""
    spans = evidence_spans(kept, inputs.kinds, inputs.clip_index, inputs.token_in_clip)
    evidence = []
    for i, (source, duration_s) in enumerate(inputs.speech_sources):
        clipped = [(start, min(end, duration_s)) for start, end in spans.get(i, []) if start < duration_s]
        evidence.append({"source": source, "spans": [list(s) for s in clipped], "text": format_spans(clipped)})
    return evidence


def _grid(grid_thw: torch.Tensor) -> tuple[int, int, int]:
    t, h, w = (int(v) for v in grid_thw.reshape(-1, 3)[0])
    return t, h, w
