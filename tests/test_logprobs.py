"""`--logprobs`: the log-probabilities the engine reports are those of the logits it decoded from.

The logits are captured where the engine computes them (`model.logits`) and the chosen ids where it
draws them (`sample_token`); the expected values are recomputed here by hand: the CTRL penalty over the
tokens generated before, then log-softmax in fp32, with no temperature."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lyra_cli.engine.model.loader import load_model
from lyra_cli.engine.model.runtime import RuntimeRequest, resolve_runtime
from lyra_cli.engine.run import generate
from lyra_cli.engine.run.events import Done, TextDelta
from lyra_cli.engine.model.config import MAX_LOGPROBS, SamplingConfig
from lyra_cli.engine.run.pipeline import Engine
from lyra_cli.engine.run.prompt import Conversation, TextPart
from lyra_cli.errors import UsageError
from lyra_cli.main import run

TOLERANCE = 1e-5
QUESTION = "what is in the picture?"
SPEECH = Path(__file__).resolve().parent.parent / "examples" / "extreme_ironing.mp3"


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> Engine:
    return Engine(load_model(tiny_dir, resolve_runtime(RuntimeRequest(device="cpu"))), reuse_prefix=False)


def answer(engine: Engine, sampling: SamplingConfig,
           monkeypatch: pytest.MonkeyPatch) -> tuple[list, Done, list[torch.Tensor], list[int]]:  # fmt: skip
    """(the turn's text deltas, its Done, the raw logits of every step, the ids the sampler chose)."""
    raw: list[torch.Tensor] = []
    chosen: list[int] = []
    logits, sample = engine.model.logits, generate.sample_token

    def recording_logits(hidden: torch.Tensor) -> torch.Tensor:
        out = logits(hidden)
        raw.append(out[0].detach().clone())
        return out

    def recording_sample(scores: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> int:
        chosen.append(sample(scores, cfg, generator))
        return chosen[-1]

    monkeypatch.setattr(engine.model, "logits", recording_logits)
    monkeypatch.setattr(generate, "sample_token", recording_sample)
    events = list(engine.respond(Conversation(), [TextPart(QUESTION)], sampling))
    done = events[-1]
    assert isinstance(done, Done)
    return [e for e in events if isinstance(e, TextDelta)], done, raw, chosen


def penalized(logits: torch.Tensor, previous: list[int], penalty: float) -> torch.Tensor:
    """The CTRL repetition penalty, written out token by token."""
    out = logits.clone()
    for token in set(previous):
        out[token] = out[token] * penalty if out[token] < 0 else out[token] / penalty
    return out


def check_entries(done: Done, deltas: list, raw: list[torch.Tensor], chosen: list[int], *, penalty: float,
                  n: int) -> list[torch.Tensor]:  # fmt: skip
    """Every assertion shared by the runs; returns the expected log-probabilities per step."""
    entries = done.logprobs
    assert entries is not None and len(entries) == done.new_tokens > 0
    ids = [e.id for e in entries]
    assert ids == chosen[: len(ids)]  # an end token is chosen but not part of the answer
    assert len(chosen) == len(ids) + (done.stop_reason == "end")
    assert [e for d in deltas for e in d.logprobs] == entries  # the deltas carry each token once, in order
    assert "".join(d.text for d in deltas).strip() == done.text
    expected = []
    for step, entry in enumerate(entries):
        logprobs = torch.log_softmax(penalized(raw[step], ids[:step], penalty).double(), -1)
        expected.append(logprobs)
        assert abs(entry.logprob - float(logprobs[entry.id])) < TOLERANCE
        top = torch.topk(logprobs, n)
        assert [t.id for t in entry.top_logprobs] == top.indices.tolist()
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and len(values) == n
        assert all(abs(v - float(w)) < TOLERANCE for v, w in zip(values, top.values))
        if n and entry.logprob >= values[-1]:
            assert entry.id in [t.id for t in entry.top_logprobs]
    return expected


@pytest.mark.parametrize("penalty", [1.0, 2.0])
def test_greedy_logprobs_are_the_log_softmax_of_the_penalized_logits(
    engine: Engine, penalty: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    sampling = SamplingConfig(max_new_tokens=8, repetition_penalty=penalty, logprobs=5)
    deltas, done, raw, chosen = answer(engine, sampling, monkeypatch)
    expected = check_entries(done, deltas, raw, chosen, penalty=penalty, n=5)
    for entry, logprobs in zip(done.logprobs, expected):
        assert entry.id == int(logprobs.argmax())  # greedy on the penalized logits
        assert entry.logprob == entry.top_logprobs[0].logprob and entry.id == entry.top_logprobs[0].id
    if penalty != 1.0:  # the penalty shows in the numbers: they are not those of the raw logits
        plain = [float(torch.log_softmax(raw[i].double(), -1)[e.id]) for i, e in enumerate(done.logprobs)]
        assert max(abs(p - e.logprob) for p, e in zip(plain, done.logprobs)) > 1e-3


def test_sampled_logprobs_are_not_temperature_scaled(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    temperature = 1.7
    sampling = SamplingConfig(temperature=temperature, top_k=50, top_p=0.95, seed=7, max_new_tokens=8,
                              repetition_penalty=1.0, logprobs=3)  # fmt: skip
    deltas, done, raw, chosen = answer(engine, sampling, monkeypatch)
    check_entries(done, deltas, raw, chosen, penalty=1.0, n=3)
    scaled = [float(torch.log_softmax(raw[i].double() / temperature, -1)[e.id]) for i, e in enumerate(done.logprobs)]
    assert max(abs(s - e.logprob) for s, e in zip(scaled, done.logprobs)) > 1e-3


def test_a_character_split_over_tokens_carries_both_logprobs_on_its_delta(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = engine.loaded.tokenizer
    first, second = tokenizer.convert_tokens_to_ids(["Ã", "©"])  # the two bytes of `é`, byte-level pieces
    space_a = tokenizer.encode(" a")[0]
    forced = iter([space_a, first, second, space_a])
    monkeypatch.setattr(generate, "sample_token", lambda *_args: next(forced))
    events = list(engine.respond(Conversation(), [TextPart(QUESTION)], SamplingConfig(max_new_tokens=4, logprobs=1)))
    deltas = [(e.text, [lp.id for lp in e.logprobs]) for e in events if isinstance(e, TextDelta)]
    assert deltas == [(" a", [space_a]), ("é", [first, second]), (" a", [space_a])]
    assert [lp.token for lp in events[-1].logprobs] == [" a", "\ufffd", "\ufffd", " a"]  # a half character alone


def test_logprobs_zero_gives_the_chosen_token_only(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    deltas, done, raw, chosen = answer(engine, SamplingConfig(max_new_tokens=4, logprobs=0), monkeypatch)
    check_entries(done, deltas, raw, chosen, penalty=1.0, n=0)
    assert all(entry.top_logprobs == () for entry in done.logprobs)


def test_off_computes_no_logprobs(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object) -> None:
        raise AssertionError("log-probabilities computed without --logprobs")

    monkeypatch.setattr(generate, "token_logprobs", refuse)
    events = list(engine.respond(Conversation(), [TextPart(QUESTION)], SamplingConfig(max_new_tokens=4)))
    assert events[-1].logprobs is None
    assert all(e.logprobs == () for e in events if isinstance(e, TextDelta))


def test_token_text_is_the_single_id_decoded(engine: Engine) -> None:
    tokenizer = engine.loaded.tokenizer
    text = "a , b . it's 42 apples"  # spaces before punctuation survive: no clean-up
    assert "".join(engine.token_text(i) for i in tokenizer.encode(text)) == text
    assert engine.token_text(tokenizer.convert_tokens_to_ids("<|im_end|>")) == "<|im_end|>"


@pytest.mark.parametrize(("value", "ok"), [(None, True), (0, True), (MAX_LOGPROBS, True), (-1, False), (21, False)])
def test_logprobs_range(value: int | None, ok: bool) -> None:
    config = SamplingConfig(logprobs=value)
    if ok:
        config.validate()
    else:
        with pytest.raises(UsageError, match="bad logprobs value") as error:
            config.validate()
        assert error.value.setting == "logprobs"  # `lyra` shows it as --logprobs (test_bad_logprobs_is_a_usage_error_before_any_model)


# ---------------------------------------------------------------------------------------------------
# Commands


def lyra(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", [["chat", "--text", "hi"], ["longspeech", str(SPEECH), "--ask", "hi"]])
def test_bad_logprobs_is_a_usage_error_before_any_model(capsys: pytest.CaptureFixture[str], command: list[str],
                                                        tmp_path: Path) -> None:  # fmt: skip
    code, _, err = lyra(capsys, *command, "--logprobs", "21", "--model", str(tmp_path / "no-such-model"))
    assert code == 2, err
    assert "error: bad --logprobs value `21`" in err and "hint: --logprobs must be 0..20" in err
    assert "no-such-model" not in err and "Traceback" not in err


def check_json_entries(record: dict, n: int) -> None:
    """The shape the issue asks for, exactly."""
    assert len(record["logprobs"]) == record["new_tokens"] > 0
    for entry in record["logprobs"]:
        assert list(entry) == ["token", "id", "logprob", "top_logprobs"]
        assert isinstance(entry["token"], str) and isinstance(entry["id"], int) and isinstance(entry["logprob"], float)
        assert len(entry["top_logprobs"]) == n
        for top in entry["top_logprobs"]:
            assert list(top) == ["token", "id", "logprob"]
        values = [t["logprob"] for t in entry["top_logprobs"]]
        assert values == sorted(values, reverse=True)


def test_chat_json_and_stderr_table(capsys: pytest.CaptureFixture[str], tiny_dir: Path) -> None:  # noqa: ARG001
    args = ["chat", "--text", QUESTION, "--max-new-tokens", "5", "--logprobs", "2", "-q"]
    code, out, err = lyra(capsys, *args, "--json")
    assert code == 0, err
    record = json.loads(out)
    check_json_entries(record, 2)
    assert err == ""  # with --json the logprobs are in the record only
    code, out, err = lyra(capsys, *args)  # greedy: the same answer, now as text and a table
    assert code == 0 and out.strip() == record["answer"]
    rows = [line.split() for line in err.splitlines()]
    assert rows[0][:3] == ["token", "id", "logprob"]  # shown with --quiet: it is what was asked for
    # (id, logprob) pairs: only the id column is a bare number (the tokens are quoted)
    table = [(int(row[i]), float(row[i + 1])) for row in rows[1:] for i in range(len(row) - 1)
             if row[i].isdigit() and row[i + 1].startswith("-")]  # fmt: skip
    assert table == [(e["id"], round(e["logprob"], 4)) for e in record["logprobs"]]


def test_chat_without_logprobs_has_no_field(capsys: pytest.CaptureFixture[str], tiny_dir: Path) -> None:  # noqa: ARG001
    code, out, _ = lyra(capsys, "chat", "--text", QUESTION, "--max-new-tokens", "2", "--json", "-q")
    assert code == 0 and "logprobs" not in json.loads(out)


def test_longspeech_json_has_logprobs(
    capsys: pytest.CaptureFixture[str], tiny_dir: Path, real: Path  # noqa: ARG001
) -> None:
    code, out, err = lyra(capsys, "longspeech", str(real / "jfk.flac"), "--ask", "who speaks?", "--max-new-tokens", "3",
                          "--logprobs", "1", "--json", "-q", "--no-cache")  # fmt: skip
    assert code == 0, err
    check_json_entries(json.loads(out), 1)


@pytest.fixture(scope="module")
def textvqa(real: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers.eval_fixtures import BUILDERS

    root = tmp_path_factory.mktemp("Lyra_Eval")
    BUILDERS["textvqa-s"](real, root)
    return root


def test_eval_predictions_carry_logprobs_and_resume_and_merge(
    textvqa: Path, tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture[str]  # noqa: ARG001
) -> None:
    from lyra_cli.engine.eval.runner import read_predictions

    args = ["eval", "textvqa-s", "--data", str(textvqa), "-q", "--max-new-tokens", "3"]
    plain, out = tmp_path / "plain.jsonl", tmp_path / "run.jsonl"
    code, plain_summary, _ = lyra(capsys, *args, "--out", str(plain))
    assert code == 0
    assert lyra(capsys, *args, "--out", str(out), "--logprobs", "2", "--limit", "2")[0] == 0  # "killed" after two
    code, summary, err = lyra(capsys, *args, "--out", str(out), "--logprobs", "2")
    assert code == 0, err
    summary, plain_summary = json.loads(summary), json.loads(plain_summary)
    assert summary["resumed"] == 2
    assert (summary["score"], summary["count"], summary["skipped"]) == (
        plain_summary["score"], plain_summary["count"], plain_summary["skipped"])  # the scorers ignore them
    records = read_predictions(out).records
    answered = [r for r in records if "skipped" not in r]
    assert answered and all(r["settings"]["logprobs"] == 2 for r in records)
    for record in answered:
        check_json_entries(record, 2)
    by_id = {r["id"]: r["prediction"] for r in read_predictions(plain).records if "skipped" not in r}
    assert {r["id"]: r["prediction"] for r in answered} == by_id  # the same answers, with their logprobs
    code, _, err = lyra(capsys, *args, "--out", str(out))  # without the flag: another run, not mixed in
    assert code == 2 and "logprobs" in err and "another run" in err

    halves = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]  # the file cut in two keeps its logprobs when merged
    lines = out.read_text().splitlines(keepends=True)
    halves[0].write_text("".join(lines[::2]))
    halves[1].write_text("".join(lines[1::2]))
    merged = tmp_path / "merged.jsonl"
    assert lyra(capsys, "eval", "merge", str(merged), *map(str, halves))[0] == 0
    assert read_predictions(merged).records == sorted(records, key=lambda r: r["index"])


def test_eval_bad_logprobs_is_a_usage_error_before_loading(textvqa: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("lyra_cli.engine.run.pipeline.Engine.load", refuse)
    code, _, err = lyra(capsys, "eval", "textvqa-s", "--data", str(textvqa), "--logprobs", "-1")
    assert code == 2 and "bad --logprobs value `-1`" in err
