"""A newcomer's first hour: every hint leads to a command that works, and no message misleads.

The README's examples themselves run in tests/test_readme_examples.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers.synthetic import write_synthetic_set

from lyra_cli.audio.io import SAMPLE_RATE_HZ
from lyra_cli.commands.chat import REPL_HELP, TurnSettings, run_repl
from lyra_cli.commands.common import NOTHING_DROPPED, adapter_line
from lyra_cli.commands.listen import listening_line
from lyra_cli.engine.model.adapters import Adapter, AdapterBank
from lyra_cli.engine.model.runtime import RuntimeRequest, resolve_runtime
from lyra_cli.engine.run.events import Prefilled, TextDelta
from lyra_cli.engine.run.generate import SamplingConfig
from lyra_cli.engine.run.pipeline import Engine, read_media
from lyra_cli.engine.run.prompt import Conversation, TextPart
from lyra_cli.engine.train.loop import trim_log
from lyra_cli.main import run

ONE_HOUR_S = 3600


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> Engine:
    return Engine.load(tiny_dir, resolve_runtime(RuntimeRequest(device="cpu")))


# ---------------------------------------------------------------------------------------- long recordings


def _hinted_commands(err: str) -> list[list[str]]:
    """The ways out a `hint:` line names, as the flags to add: `add --extract 4x0.7 (...), or --max-audio …`."""
    hint = next(line for line in err.splitlines() if line.startswith("hint:"))
    return [shlex.split(flags) for flags in re.findall(r"(--extract \S+|--max-audio \S+)", hint)]


@pytest.mark.slow
def test_every_way_out_of_a_too_long_recording_works(tiny_dir: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """An hour of audio (over the 32,768 positions) is refused with two ways out; both then run as given."""
    hour = tmp_path / "hour.flac"
    tone = 0.1 * np.sin(2 * np.pi * 220 * np.arange(SAMPLE_RATE_HZ) / SAMPLE_RATE_HZ).astype(np.float32)
    with sf.SoundFile(hour, "w", samplerate=SAMPLE_RATE_HZ, channels=1, format="FLAC") as out:
        for _ in range(ONE_HOUR_S):  # one second at a time: an hour of FLAC tone is small on disk
            out.write(tone)
    base = ["longspeech", str(hour), "--ask", "what is it?", "--max-new-tokens", "1", "--no-cache"]
    assert run(base) == 1
    ways_out = _hinted_commands(capsys.readouterr().err)
    assert [flags[0] for flags in ways_out] == ["--extract", "--max-audio"]
    for flags in ways_out:
        assert run([*base, *flags]) == 0, f"the hint's `{shlex.join(flags)}` failed: {capsys.readouterr().err}"
        capsys.readouterr()


def test_the_too_long_hint_names_an_extract_the_model_accepts(tiny_dir: Path, tmp_path: Path, capsys,  # noqa: ANN001
                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The refusal comes before any weights load, from the file's length: cheap to check on a short file."""
    from lyra_cli.audio import io as audio_io

    opened = audio_io.open_audio_stream  # the header of an hour-long file, on a short one
    monkeypatch.setattr(audio_io, "open_audio_stream",
                        lambda path, **kw: dataclasses.replace(opened(path, **kw), duration_s=float(ONE_HOUR_S)))
    assert run(["longspeech", str(Path(__file__).parent.parent / "examples" / "extreme_ironing.mp3"),
                "--ask", "q"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "beyond the model's 32,768 positions" in err
    assert _hinted_commands(err) == [["--extract", "4x0.7"], ["--max-audio", "00:54:30"]]


# ---------------------------------------------------------------------------------------- the extractor


def test_an_extract_that_drops_nothing_is_refused_before_loading(capsys) -> None:  # noqa: ANN001
    for spec in ("4x1", "1x0.5"):
        assert run(["chat", "--text", "hi", "--extract", spec]) == 2
        err = capsys.readouterr().err
        assert "drops nothing" in err and "lyra ·" not in err  # no header: nothing was loaded


def test_an_extract_with_too_few_tokens_to_drop_says_so(tiny_dir: Path, capsys) -> None:  # noqa: ANN001
    assert run(["chat", "--text", "hello", "--extract", "4x0.7", "--max-new-tokens", "1"]) == 0
    assert NOTHING_DROPPED in capsys.readouterr().err  # a text-only prompt: no image/speech token to drop


# ---------------------------------------------------------------------------------------- longspeech output


def test_prefill_line_comes_before_the_answer_and_questions_are_labelled(
    tiny_dir: Path, real: Path, monkeypatch: pytest.MonkeyPatch, capsys  # noqa: ANN001
) -> None:
    """stderr and stdout interleave on a terminal: the prefill summary must be written before the answer."""
    from lyra_cli import console

    order: list[tuple[str, str]] = []
    monkeypatch.setattr(console, "info", lambda text: order.append(("err", text)))
    monkeypatch.setattr(console, "write_answer", lambda text: order.append(("out", text)))
    assert run(["longspeech", str(real / "Hi.mp3"), "--ask", "first?", "--ask", "second?", "--max-new-tokens", "3",
                "--no-cache"]) == 0  # fmt: skip
    out = [text for stream, text in order if stream == "out"]
    assert out[0] == "Q1: first?\n" and "Q2: second?\n" in out
    for label in ("Q1", "Q2"):
        start = next(i for i, (s, t) in enumerate(order) if t.startswith(label))
        prefill = next(i for i, (s, t) in enumerate(order) if i > start and t.startswith("prefill "))
        answer = next(i for i, (s, t) in enumerate(order) if i > start and s == "out")
        assert start < prefill < answer  # label, prefill summary, then the answer text

    order.clear()
    assert run(["longspeech", str(real / "Hi.mp3"), "--ask", "a?", "--ask", "b?", "--max-new-tokens", "2",
                "--json", "-q"]) == 0  # fmt: skip
    records = [json.loads(t) for s, t in order if s == "out"]
    assert [(r["label"], r["question"]) for r in records] == [("Q1", "a?"), ("Q2", "b?")]


def test_prefilled_event_precedes_the_first_text(engine: Engine, real: Path) -> None:
    part = engine.encode(read_media("speech", str(real / "Hi.mp3")))
    events = list(engine.respond(Conversation(), [part, TextPart("what?")], SamplingConfig(max_new_tokens=5)))
    kinds = [type(e).__name__ for e in events]
    assert kinds.count("Prefilled") == 1 and kinds.index("Prefilled") < kinds.index("TextDelta")
    prefilled, done = next(e for e in events if isinstance(e, Prefilled)), events[-1]
    assert (prefilled.prompt_tokens, prefilled.kept_tokens) == (done.prompt_tokens, done.kept_tokens)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)).strip() == done.text


# ---------------------------------------------------------------------------------------- the REPL


def test_repl_speech_answers_at_once_and_says_so(engine: Engine, real: Path, capsys) -> None:  # noqa: ANN001
    conversation = Conversation()
    run_repl(engine, conversation, SamplingConfig(max_new_tokens=2),
             [f"/speech {real / 'Hi.mp3'}"], TurnSettings(json_out=True))  # fmt: skip
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and len(conversation.turns) == 1  # answered, without another line
    assert "answering now" in err and "added to the next question" not in err
    assert "/speech PATH: ask it now" in REPL_HELP


def test_ctrl_c_during_an_answer_stops_only_that_answer(engine: Engine, monkeypatch: pytest.MonkeyPatch,
                                                        capsys) -> None:  # noqa: ANN001  # fmt: skip
    from lyra_cli import console

    real_write = console.write_answer
    calls = {"n": 0}

    def write(text: str) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # Ctrl-C arrives while the first answer streams
            raise KeyboardInterrupt
        real_write(text)

    monkeypatch.setattr(console, "write_answer", write)
    conversation = Conversation()
    run_repl(engine, conversation, SamplingConfig(max_new_tokens=8), ["first", "second"])
    err = capsys.readouterr().err
    assert "interrupted" in err
    # the abandoned answer left no turn behind; the next question was answered in the same session
    assert [turn.user[-1].text for turn in conversation.turns] == ["second"]
    assert conversation.turns[0].answer is not None


def test_a_second_ctrl_c_right_after_the_first_ends_the_session(engine: Engine, monkeypatch: pytest.MonkeyPatch,
                                                                capsys) -> None:  # noqa: ANN001  # fmt: skip
    import types

    from lyra_cli import console
    from lyra_cli.commands import chat

    def write(text: str) -> None:
        if text != "\n":  # the REPL's own newline after `interrupted` goes through
            raise KeyboardInterrupt  # every answer is interrupted at its first text

    monkeypatch.setattr(console, "write_answer", write)
    monkeypatch.setattr(chat, "time", types.SimpleNamespace(monotonic=lambda: 100.0))  # both presses at once
    conversation = Conversation()
    with pytest.raises(KeyboardInterrupt):
        run_repl(engine, conversation, SamplingConfig(max_new_tokens=4), ["first", "second", "never"])
    assert conversation.turns == [] and capsys.readouterr().err.count("interrupted") == 1


def test_ctrl_c_at_the_prompt_ends_the_session(engine: Engine) -> None:
    def lines():  # noqa: ANN202
        yield "hello"
        raise KeyboardInterrupt  # pressed at the `you>` prompt

    with pytest.raises(KeyboardInterrupt):
        run_repl(engine, Conversation(), SamplingConfig(max_new_tokens=2), lines())


# ---------------------------------------------------------------------------------------- messages


def test_a_merged_model_header_names_the_merged_adapter() -> None:
    merged = AdapterBank(available=(), projectors={}, merged=Adapter.SPEECH)
    assert adapter_line(merged) == "adapter merged into the weights: speech (used for every turn)"
    both = AdapterBank(available=(Adapter.LONG_SPEECH,), projectors={}, merged=Adapter.SPEECH)
    merged_text = "adapter merged into the weights: speech (used for every turn)"
    assert adapter_line(both).startswith(f"{merged_text} · adapters long_speech (chosen per turn")
    plain = AdapterBank(available=(Adapter.SPEECH, Adapter.LONG_SPEECH), projectors={})
    assert adapter_line(plain).startswith("adapters speech, long_speech (chosen per turn")
    assert adapter_line(AdapterBank(available=(), projectors={})).startswith("adapters none (")


def test_listen_from_a_file_does_not_ask_to_speak() -> None:
    assert "speak" not in listening_line(Path("talk.wav")) and "`talk.wav`" in listening_line(Path("talk.wav"))
    assert "speak" in listening_line(None)


# ---------------------------------------------------------------------------------------- training data


@pytest.fixture(scope="module")
def synthetic(real: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 records: asr, image+speech, image+text, multi-turn, one with tgt_unit, one long_speech."""
    return write_synthetic_set(tmp_path_factory.mktemp("synth"), real, n_records=6, seed=3)


def test_dry_run_validates_the_data_and_shows_the_precision(tiny_dir: Path, synthetic: Path, tmp_path: Path,
                                                            capsys) -> None:  # noqa: ANN001  # fmt: skip
    assert run(["train", "stage2", "--data", str(synthetic), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    described = json.loads(out)
    assert described["data"] == {"file": str(synthetic), "usable_records": 6, "skipped": {}}
    assert described["precision"] == {"requested": "auto", "device": "cpu", "compute": "float32 weights"}
    assert "6 usable records" in err
    assert run(["train", "stage2", "--data", str(synthetic), "--out", str(tmp_path / "o"), "--dry-run",
                "--precision", "bf16"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["precision"]["compute"] == "autocast bfloat16"
    assert run(["train", "stage2", "--data", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o"),
                "--dry-run"]) == 1  # fmt: skip
    assert "missing.json` does not exist" in capsys.readouterr().err


def test_stage4_skips_and_counts_records_without_units(tiny_dir: Path, synthetic: Path, tmp_path: Path,
                                                       capsys) -> None:  # noqa: ANN001  # fmt: skip
    assert run(["train", "stage4", "--data", str(synthetic), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["data"]["usable_records"] == 1
    assert json.loads(out)["data"]["skipped"] == {"no tgt_unit (stage 4 learns the speech units)": 5}
    assert "1 usable records; skipped: 5 × no tgt_unit" in err
    assert run(["train", "stage4", "--data", str(synthetic), "--out", str(tmp_path / "o"), "--dry-run",
                "--strict"]) == 1  # fmt: skip
    assert "no tgt_unit" in capsys.readouterr().err


def test_stage3_says_when_records_are_not_long_speech(tiny_dir: Path, synthetic: Path, tmp_path: Path,
                                                      capsys) -> None:  # noqa: ANN001  # fmt: skip
    assert run(["train", "stage3", "--data", str(synthetic), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    assert "5 of 6 records have no `long_speech` recording" in capsys.readouterr().err
    assert run(["train", "stage2", "--data", str(synthetic), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    assert "long_speech" not in capsys.readouterr().err  # only stage 3 is about long speech


def test_trim_log_drops_steps_after_the_checkpoint_and_torn_lines(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    trim_log(log, 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    trim_log(tmp_path / "absent.jsonl", 2)  # nothing to trim: nothing written
    assert not (tmp_path / "absent.jsonl").exists()


def test_a_killed_and_resumed_run_logs_each_step_once(tiny_dir: Path, synthetic: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Killed after logging step 3 but before its checkpoint: the resumed run starts at 2 and logs 3 again."""
    from lyra_cli.engine.train.loop import Trainer

    save = Trainer.save_checkpoint

    def save_or_die(self, root):  # noqa: ANN001, ANN202
        if self.step_count == 3:
            raise KeyboardInterrupt  # the kill, after step 3 was logged
        return save(self, root)

    out = tmp_path / "run"
    args = ["train", "stage1", "--data", str(synthetic), "--out", str(out), "--steps", "4", "--save-every", "1",
            "--batch-size", "1", "--grad-accum", "1", "-q", "--no-tensorboard"]  # fmt: skip
    monkeypatch.setattr(Trainer, "save_checkpoint", save_or_die)
    assert run(args) == 130
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    assert run(args) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
