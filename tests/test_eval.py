"""`lyra eval` on tiny data sets in the authors' layout: every suite end to end on the tiny model, both
modes, scores recomputed from files without a model, kill-and-resume, shards and their merge, bad data.

The tiny model answers noise, so scores are mostly 0: the tests check counts, skip reasons, prompts,
files and hand-computed scores of hand-written predictions, not answer quality.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.eval_fixtures import EXPECTED, JFK_TEXT, OCR_SUFFIX, build_all

from lyra_cli.engine.eval import runner
from lyra_cli.engine.eval.runner import read_predictions
from lyra_cli.engine.eval.suites import SUITES, Piece, layout, load_items
from lyra_cli.engine.run.prompt import SpeechPart, TextPart, VisualPart, render_user
from lyra_cli.main import run

FAST = ["--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def data(real: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_all(real, tmp_path_factory.mktemp("Lyra_Eval"))


def lyra_eval(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict | None, str]:
    code = run(["eval", *args])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 and out.strip() else None, err


def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading weights fails loudly: proves a path never loads the model."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("lyra_cli.engine.run.pipeline.Engine.load", refuse)
    monkeypatch.setattr("lyra_cli.engine.model.loader.load_model", refuse)


def answers_by_id(path: Path) -> dict[str, tuple]:
    return {r["id"]: (r.get("prediction"), r.get("skipped")) for r in read_predictions(path).records}


# ---------------------------------------------------------------------------------------------------
# Every suite, both modes, end to end


@pytest.mark.parametrize(("suite", "mode"), list(EXPECTED))
def test_suite_end_to_end_on_the_tiny_model(suite: str, mode: str, data: Path, tmp_path: Path, tiny_dir: Path,  # noqa: ARG001
                                            capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "run.jsonl"
    code, summary, err = lyra_eval(capsys, suite, "--data", str(data), "--mode", mode, "--out", str(out), *FAST)
    assert code == 0, err
    answered, skipped = EXPECTED[(suite, mode)]
    assert (summary["count"], summary["skipped"], summary["missing"]) == (answered, skipped, 0)
    assert summary["suite"] == suite and summary["mode"] == mode and summary["metric"] == SUITES[suite].metrics[0]
    records = read_predictions(out).records
    assert len(records) == len({r["id"] for r in records}) == answered + sum(skipped.values())
    for record in records:
        assert ("prediction" in record) != ("skipped" in record)
        if "prediction" in record:
            assert record["prompt_tokens"] > 0 and 0 < record["new_tokens"] <= 3 and record["seconds"] > 0
        else:
            assert record["detail"]  # the reason names the file or line
    if summary["score"] is not None:
        assert summary["tokens_per_s"] > 0 and summary["samples_per_s"] > 0
    assert SUITES[suite].metrics[0] in err and "answered" in err  # the table on stderr


def test_mmvet_exports_for_the_online_grader(data: Path, tmp_path: Path, tiny_dir: Path,  # noqa: ARG001
                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    code, summary, _ = lyra_eval(capsys, "mmvet-s", "--data", str(data), "--out", str(tmp_path / "mm.jsonl"), "-q", *FAST)
    assert code == 0 and summary["score"] is None and "GPT judge" in summary["notes"][0]  # no judge: no score
    export = json.loads(Path(summary["mmvet_export"]).read_text())
    predictions = answers_by_id(tmp_path / "mm.jsonl")
    assert list(export) == ["v1_0", "v1_1"]
    assert export == {f"v1_{qid}": prediction for qid, (prediction, _) in predictions.items()}  # each answer, by key


def test_mmvet_judge_grades_against_mm_vet_ground_truth(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    predictions = tmp_path / "mm.jsonl"
    predictions.write_text('{"id": "0", "prediction": "two horses"}\n{"id": "1", "prediction": "a cat"}\n')
    seen = []

    def judge(records, *, base_url, api_key, model):  # noqa: ANN001, ANN202
        seen.extend((r.question_id, r.answer, r.prediction, base_url, api_key, model) for r in records)
        return [1.0, 0.2]

    monkeypatch.setattr("lyra_cli.engine.eval.mmvet.judge_mmvet", judge)
    monkeypatch.setenv("LYRA_JUDGE_API_KEY", "sk-test")
    no_model(monkeypatch)
    code, summary, err = lyra_eval(capsys, "mmvet-s", "--data", str(data), "--score-only", str(predictions),
                                   "--judge-url", "http://judge.local/v1", "--judge-model", "gpt-4-0613", "-q")  # fmt: skip
    assert code == 0, err
    assert summary["score"] == pytest.approx(60.0) and summary["count"] == 2
    assert seen[0] == ("0", "horses", "two horses", "http://judge.local/v1", "sk-test", "gpt-4-0613")


# ---------------------------------------------------------------------------------------------------
# Prompts


def _as_text(segments: list) -> str:
    names = {VisualPart: "<image>", SpeechPart: "<speech>"}
    return "".join(seg if isinstance(seg, str) else names[type(seg)] for seg in segments)


def _parts(pieces: list[Piece]) -> list:
    image = VisualPart(torch.zeros(1, 1), (1, 2, 2), "image", "x.png")
    speech = SpeechPart(1, 1.0, "q.mp3")
    return [image if p.kind == "image" else speech if p.kind == "speech" else TextPart(p.value) for p in pieces]


@pytest.mark.parametrize(("suite", "mode", "expected"), [
    ("docvqa-s", "speech", "<|vision_start|><image><|vision_end|><speech>"),
    ("docvqa-s", "text", "<|vision_start|><image><|vision_end|>What is the total?"),
    ("chartqa-s", "speech", "<|vision_start|><image><|vision_end|><speech>"),
    ("mmvet-s", "text", "<|vision_start|><image><|vision_end|>What is shown in the painting?"),
    ("textvqa-s", "speech", "<|vision_start|><image><|vision_end|><speech>" + OCR_SUFFIX),
    ("textvqa-s", "text", "<|vision_start|><image><|vision_end|>what is the man doing?" + OCR_SUFFIX),
    ("librispeech", "speech", "<speech>\n\nRecord the spoken words as text."),
])  # fmt: skip
def test_official_prompt_per_suite_and_mode(suite: str, mode: str, expected: str, data: Path) -> None:
    item = load_items(SUITES[suite], data)[0]
    pieces = layout(SUITES[suite], item, mode)
    assert not isinstance(pieces, runner.Skip), pieces
    assert _as_text(render_user(_parts(pieces))) == expected


def test_text_mode_asks_without_the_recording(data: Path, tmp_path: Path, tiny_dir: Path,  # noqa: ARG001
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    tokens = {}
    for mode in ("speech", "text"):
        out = tmp_path / f"{mode}.jsonl"
        assert lyra_eval(capsys, "docvqa-s", "--data", str(data), "--mode", mode, "--out", str(out), "-q", *FAST)[0] == 0
        tokens[mode] = {r["id"]: r["prompt_tokens"] for r in read_predictions(out).records if "prediction" in r}
    # the spoken question is 300 speech tokens (one 30 s window); the written one a handful of text tokens
    assert all(tokens["speech"][i] - tokens["text"][i] > 250 for i in tokens["text"])


# ---------------------------------------------------------------------------------------------------
# Scores from a file, no model


def test_score_only_gives_hand_computed_scores_without_a_model(data: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    no_model(monkeypatch)
    doc = tmp_path / "doc.jsonl"
    doc.write_text('{"id": "1", "prediction": "42"}\n{"id": "2", "prediction": "staff"}\n'
                   '{"id": "99", "prediction": "?"}\n')  # fmt: skip
    code, summary, err = lyra_eval(capsys, "docvqa-s", "--data", str(data), "--score-only", str(doc), "-q")
    assert code == 0, err
    assert summary["score"] == pytest.approx(50.0)  # "42" matches; "staff" ≠ "all staff"
    assert summary["metrics"]["anls"] == pytest.approx(100 * (1 + (1 - 4 / 9)) / 2)  # lev("staff", "all staff") = 4
    assert summary["skipped"] == {"unknown id": 1, "unreadable record": 1} and summary["missing"] == 1


def test_score_only_reads_the_authors_answer_files(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """`model_lyra_image_speech.py` writes {question_id, prompt, text}; TextVQA repeats the image id, so lines
    are matched by (image, question from the prompt), as `eval_textvqa.py` does, not by their order."""
    no_model(monkeypatch)
    official = tmp_path / "merge.jsonl"
    lines = [("sign01", "what number is on the sign?", "41"), ("iron01", "what is the man doing?", "Ironing."),
             ("sign01", "What does the sign say?", "stop")]  # the sign's two questions in the other order
    official.write_text("".join(json.dumps({"question_id": qid, "prompt": question + OCR_SUFFIX, "text": text,
                                            "answer_id": "x"}) + "\n" for qid, question, text in lines))  # fmt: skip
    code, summary, _ = lyra_eval(capsys, "textvqa-s", "--data", str(data), "--score-only", str(official), "-q")
    assert code == 0 and summary["count"] == 3
    assert summary["score"] == pytest.approx(100 * (0 + 1 + 1) / 3)  # 9 of 10 annotators said "stop": full credit

    asr = tmp_path / "asr.jsonl"
    asr.write_text(json.dumps({"speech": "test-clean/61/70968/61-70968-0000.flac", "text": JFK_TEXT}) + "\n"
                   + json.dumps({"id": "test-clean/61/70968/61-70968-0001.wav", "prediction": "a reply spoken by lira"})
                   + "\n")  # fmt: skip
    code, summary, _ = lyra_eval(capsys, "librispeech", "--data", str(data), "--score-only", str(asr), "-q")
    assert code == 0 and summary["score"] == pytest.approx(100 / 27)  # one substitution in 22 + 5 words


# ---------------------------------------------------------------------------------------------------
# Runs that survive


def test_kill_and_resume_equals_one_uninterrupted_run(data: Path, tmp_path: Path, tiny_dir: Path,  # noqa: ARG001
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    args = ["textvqa-s", "--data", str(data), "-q", *FAST]
    whole = tmp_path / "whole.jsonl"
    _, uninterrupted, _ = lyra_eval(capsys, *args, "--out", str(whole))

    asked = []
    original = runner.answer_item
    monkeypatch.setattr(runner, "answer_item", lambda engine, suite, item, *a: asked.append(item.id) or
                        original(engine, suite, item, *a))  # fmt: skip
    resumed_file = tmp_path / "resumed.jsonl"
    assert lyra_eval(capsys, *args, "--out", str(resumed_file), "--limit", "2")[0] == 0  # "killed" after two
    code, resumed, _ = lyra_eval(capsys, *args, "--out", str(resumed_file))
    assert code == 0 and resumed["resumed"] == 2
    assert asked == ["iron01", "sign01", "sign01#2", "gone01"]  # nothing asked twice
    assert resumed_file.read_text().count('"id"') == 4
    assert answers_by_id(resumed_file) == answers_by_id(whole)
    assert runner.Summary(**resumed).comparable() == runner.Summary(**uninterrupted).comparable()


def test_a_line_torn_by_a_kill_is_cut_off_and_redone(data: Path, tmp_path: Path, tiny_dir: Path,  # noqa: ARG001
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    args = ["textvqa-s", "--data", str(data), "-q", *FAST]
    whole = tmp_path / "whole.jsonl"
    _, uninterrupted, _ = lyra_eval(capsys, *args, "--out", str(whole))
    lines = whole.read_bytes().splitlines(keepends=True)
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # killed while writing line 3
    assert read_predictions(torn).torn_tail
    code, resumed, _ = lyra_eval(capsys, *args, "--out", str(torn))
    assert code == 0 and resumed["resumed"] == 2
    assert [r["id"] for r in read_predictions(torn).records] == [r["id"] for r in read_predictions(whole).records]
    assert answers_by_id(torn) == answers_by_id(whole) and not read_predictions(torn).torn_tail
    assert runner.Summary(**resumed).comparable() == runner.Summary(**uninterrupted).comparable()


def test_resume_refuses_a_file_of_another_run(data: Path, tmp_path: Path, tiny_dir: Path,  # noqa: ARG001
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "run.jsonl"
    assert lyra_eval(capsys, "chartqa-s", "--data", str(data), "--out", str(out), "-q", *FAST)[0] == 0
    code, _, err = lyra_eval(capsys, "chartqa-s", "--data", str(data), "--out", str(out), "--mode", "text", *FAST)
    assert code == 2 and "another run" in err and "--no-resume" in err
    code, summary, _ = lyra_eval(capsys, "chartqa-s", "--data", str(data), "--out", str(out), "--mode", "text",
                                 "--no-resume", "-q", *FAST)  # fmt: skip
    assert code == 0 and summary["resumed"] == 0 and {r["mode"] for r in read_predictions(out).records} == {"text"}


def test_shards_merged_equal_the_unsharded_run(data: Path, tmp_path: Path, tiny_dir: Path,  # noqa: ARG001
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    args = ["textvqa-s", "--data", str(data), "-q", *FAST]
    _, whole, _ = lyra_eval(capsys, *args, "--out", str(tmp_path / "whole.jsonl"))
    shards = []
    for index in range(2):
        shards.append(tmp_path / f"shard{index}.jsonl")
        code, part, _ = lyra_eval(capsys, *args, "--shard", f"{index}/2", "--out", str(shards[-1]))
        assert code == 0 and part["count"] + sum(part["skipped"].values()) == 2
    assert run(["eval", "merge", str(tmp_path / "merged.jsonl"), *map(str, shards)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records"] == 4 and report["shards"] == ["0/2", "1/2"]
    merged = tmp_path / "merged.jsonl"
    assert answers_by_id(merged) == answers_by_id(tmp_path / "whole.jsonl")
    assert [r["index"] for r in read_predictions(merged).records] == [0, 1, 2, 3]  # data order
    _, scored, _ = lyra_eval(capsys, *args, "--score-only", str(merged))
    assert runner.Summary(**scored).comparable() == runner.Summary(**whole).comparable()


def test_merge_refuses_an_incomplete_or_inconsistent_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def line(shard: str, prediction: str, item_id: str = "1") -> str:
        return json.dumps({"id": item_id, "index": 0, "suite": "docvqa-s", "mode": "speech", "shard": shard,
                           "prediction": prediction, "settings": {}}) + "\n"  # fmt: skip

    (tmp_path / "a.jsonl").write_text(line("0/3", "x"))
    (tmp_path / "b.jsonl").write_text(line("1/3", "y", "2"))
    code = run(["eval", "merge", str(tmp_path / "m.jsonl"), str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")])
    assert code == 2 and "2/3 are missing" in capsys.readouterr().err
    (tmp_path / "c.jsonl").write_text(line("1/2", "y"))  # the same id answered differently
    (tmp_path / "a.jsonl").write_text(line("0/2", "x"))
    code = run(["eval", "merge", str(tmp_path / "m.jsonl"), str(tmp_path / "a.jsonl"), str(tmp_path / "c.jsonl")])
    assert code == 1 and "two different answers" in capsys.readouterr().err
    assert not (tmp_path / "m.jsonl").exists()


def test_shard_auto_under_a_launcher_merges_on_rank_0(data: Path, tmp_path: Path, tiny_dir: Path,  # noqa: ARG001
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun and `accelerate launch` set them, one process per rank."""
    args = ["docvqa-s", "--data", str(data), "--shard", "auto", "--out", str(tmp_path / "run.jsonl"), "-q", *FAST]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):  # rank 0 last: it waits for rank 1's file to be complete, then merges
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        code, summary, err = lyra_eval(capsys, *args)
        assert code == 0, err
    assert (tmp_path / "run.shard-1-of-2.jsonl").is_file() and (tmp_path / "run.shard-0-of-2.jsonl").is_file()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    _, alone, _ = lyra_eval(capsys, "docvqa-s", "--data", str(data), "--out", str(tmp_path / "alone.jsonl"), "-q", *FAST)
    assert runner.Summary(**summary).comparable() == runner.Summary(**alone).comparable()
    assert answers_by_id(tmp_path / "run.jsonl") == answers_by_id(tmp_path / "alone.jsonl")


def test_rank_0_gives_up_when_a_rank_never_finishes(tmp_path: Path) -> None:
    shard = tmp_path / "run.shard-1-of-2.jsonl"
    shard.write_text('{"id": "a"}\n')
    clock = iter(range(100))
    with pytest.raises(runner.LyraError, match="did not finish in time"):
        runner.wait_for_shards({shard: {"a", "b"}}, timeout_s=3, sleep=lambda _s: None, clock=lambda: next(clock))


# ---------------------------------------------------------------------------------------------------
# Bad input: errors before any weights load


def test_usage_errors_name_the_valid_choices(data: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    no_model(monkeypatch)
    code, _, err = lyra_eval(capsys, "vqav2", "--data", str(data))
    assert code == 2 and "unknown eval suite `vqav2`" in err and "textvqa-s, docvqa-s" in err and "needle" in err
    code, _, err = lyra_eval(capsys, "librispeech", "--data", str(data), "--mode", "text")
    assert code == 2 and "no `text` mode" in err
    code, _, err = lyra_eval(capsys, "docvqa-s", "--data", str(data), "--shard", "2/2")
    assert code == 2 and "out of range" in err
    code, _, err = lyra_eval(capsys, "docvqa-s", "--data", str(data), "--judge-url", "http://x")
    assert code == 2 and "MM-Vet" in err


def test_missing_data_is_an_error_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    no_model(monkeypatch)
    code, _, err = lyra_eval(capsys, "docvqa-s", "--data", str(tmp_path / "nowhere"))
    assert code == 1 and "does not exist" in err and "Traceback" not in err
    code, _, err = lyra_eval(capsys, "chartqa-s", "--data", str(tmp_path))
    assert code == 1 and "Chartvqa_human/lyra_chartvqa_audio.jsonl" in err


def test_data_dir_may_be_the_suite_folder_itself(data: Path) -> None:
    suite = SUITES["chartqa-s"]
    assert [i.id for i in load_items(suite, data / "Chartvqa_human")] == [i.id for i in load_items(suite, data)]


def test_speech_falls_back_from_mp3_to_wav_and_bad_records_are_skips(data: Path, tmp_path: Path) -> None:
    items = {item.id: item for item in load_items(SUITES["textvqa-s"], data)}
    assert items["sign01"].speech.name == "tv1.wav"  # no tv1.mp3: the authors' fallback
    assert items["sign01#2"].answers == ("42",) * 10  # second question about the same image
    broken = load_items(SUITES["docvqa-s"], data)[2]
    assert broken.problem is not None and broken.problem.reason == "unreadable record"
    assert "line 3" in broken.problem.detail
    shutil.copytree(data / "Docvqa_val", tmp_path / "Docvqa_val")
    (tmp_path / "Docvqa_val" / "lyra_docvqa_audio.jsonl").write_text('[1, 2]\n{"image": "x.png"}\n')
    reasons = [i.problem.reason for i in load_items(SUITES["docvqa-s"], tmp_path)]
    assert reasons == ["unreadable record", "unreadable record"]


def test_eval_help_imports_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys; from lyra_cli.main import run\n"
            "rc = run(['eval', '--help']) + run(['eval', 'docvqa-s', '--help']); print('TORCH', 'torch' in sys.modules, rc)")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "textvqa-s" in result.stdout and "--score-only" in result.stdout and "TORCH False 0" in result.stdout


@pytest.mark.slow
def test_a_real_kill_then_resume_equals_one_uninterrupted_run(data: Path, tmp_path: Path, tiny_dir: Path,  # noqa: ARG001
                                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """SIGKILL the process as soon as its first prediction is on disk, then resume in a new run.

    Slow (long answers in a separate process): the default run keeps the in-process stop after two items
    (`test_kill_and_resume_equals_one_uninterrupted_run`) and the line torn by a kill
    (`test_a_line_torn_by_a_kill_is_cut_off_and_redone`); this one adds a real SIGKILL at an arbitrary moment.
    """
    import os
    import signal
    import subprocess
    import sys
    import time

    args = ["textvqa-s", "--data", str(data), "-q", "--max-new-tokens", "150"]
    killed = tmp_path / "killed.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "lyra_cli.main", "eval", *args, "--out", str(killed)],
                            env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if killed.is_file() and killed.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = len(read_predictions(killed).records)
    assert proc.returncode == -signal.SIGKILL and 1 <= done_before < 4  # really cut short
    code, resumed, _ = lyra_eval(capsys, *args, "--out", str(killed))
    assert code == 0 and resumed["resumed"] == done_before
    whole = tmp_path / "whole.jsonl"
    _, uninterrupted, _ = lyra_eval(capsys, *args, "--out", str(whole))
    assert answers_by_id(killed) == answers_by_id(whole)
    assert runner.Summary(**resumed).comparable() == runner.Summary(**uninterrupted).comparable()


def test_a_broken_generation_config_is_a_one_line_error(data: Path, tiny_copy: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    (tiny_copy / "generation_config.json").write_text("{not json")
    code, _, err = lyra_eval(capsys, "textvqa-s", "--data", str(data), "-m", str(tiny_copy), "--limit", "1",
                             "--out", str(tmp_path / "p.jsonl"))  # fmt: skip
    assert code == 1 and "generation_config.json" in err and "Traceback" not in err
