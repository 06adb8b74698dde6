"""The command line: answers on stdout, one-line errors with hints on stderr, exit codes 1 and 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lyra_cli.main import run

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
IMAGE, SPEECH = EXAMPLES / "extreme_ironing.jpg", EXAMPLES / "extreme_ironing.mp3"
FAST = ["--max-new-tokens", "4", "--quiet"]


def lyra(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def test_help_lists_commands_and_imports_no_torch() -> None:
    code = "import sys; from lyra_cli.main import run; rc = run(['--help']); print('TORCH', 'torch' in sys.modules, rc)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "chat" in result.stdout and "info" in result.stdout
    assert "TORCH False 0" in result.stdout


def test_console_script_exit_codes(tmp_path: Path) -> None:
    env = {**os.environ, "LYRA_CACHE_DIR": str(tmp_path)}
    bad = subprocess.run([sys.executable, "-m", "lyra_cli.main", "chat", "--device", "tpu", "--text", "hi"],
                         capture_output=True, text=True, env=env)  # fmt: skip
    assert bad.returncode == 2 and "tpu" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "lyra_cli.main", "chat", "--image", "nope.jpg", "--text", "hi"],
                             capture_output=True, text=True, env=env)  # fmt: skip
    assert missing.returncode == 1 and "nope.jpg" in missing.stderr and "Traceback" not in missing.stderr


def test_one_shot_image_and_speech_streams_an_answer(capsys, tiny_dir: Path) -> None:  # noqa: ANN001
    code, out, err = lyra(capsys, "chat", "--image", str(IMAGE), "--speech", str(SPEECH), "--max-new-tokens", "8")
    assert code == 0, err
    assert out.endswith("\n") and len(out.strip()) > 0
    assert "random weights" in err and "cpu, fp32" in err


def test_json_output_has_answer_timings_and_counts(capsys, tiny_dir: Path) -> None:  # noqa: ANN001
    code, out, _ = lyra(capsys, "chat", "--speech", str(SPEECH), "--text", "what is he doing?", "--json", *FAST)
    assert code == 0
    record = json.loads(out)
    assert record["adapter"] == "speech" and record["new_tokens"] <= 4
    assert record["prompt_tokens"] > 300  # one 30 s window = 300 speech tokens, plus the template
    assert set(record["timings"]) == {"first_token_s", "prefill_s", "decode_s", "total_s"}
    assert [i["kind"] for i in record["inputs"]] == ["speech", "text"]
    assert record["inputs"][0]["windows"] == 1


@pytest.mark.parametrize("flag,label", [("--load-8bit", "8bit"), ("--load-4bit", "4bit")])
def test_quantized_tiny_model_answers(capsys, tiny_dir: Path, flag: str, label: str) -> None:  # noqa: ANN001
    code, out, err = lyra(capsys, "chat", flag, "--text", "hello", "--max-new-tokens", "4")
    assert code == 0, err
    assert f"cpu, fp32, {label}" in err
    assert out.strip()


def test_info_describes_the_folder(capsys, tiny_dir: Path) -> None:  # noqa: ANN001
    code, out, _ = lyra(capsys, "info", "--json")
    described = json.loads(out)
    assert code == 0 and described["adapters"] == ["speech_lora", "long_speech_lora"]
    assert described["extractor"] == "off"


# -- bad input: one line, a hint, exit 1 (usage: 2), before any weights load where possible ----------


def test_missing_image(capsys) -> None:  # noqa: ANN001
    code, _, err = lyra(capsys, "chat", "--image", "missing.jpg", "--text", "hi")
    assert code == 1
    assert_one_line_error(err, "missing.jpg")


def test_text_file_as_audio_and_image(capsys, tmp_path: Path) -> None:  # noqa: ANN001
    note = tmp_path / "note.mp3"
    note.write_text("not audio at all\n" * 20)
    code, _, err = lyra(capsys, "chat", "--speech", str(note))
    assert code == 1
    assert_one_line_error(err, "note.mp3")
    picture = tmp_path / "note.jpg"
    picture.write_text("not an image\n")
    code, _, err = lyra(capsys, "chat", "--image", str(picture), "--text", "hi")
    assert code == 1
    assert_one_line_error(err, "note.jpg")


def test_silent_audio(capsys, tmp_path: Path) -> None:  # noqa: ANN001
    import numpy as np
    import soundfile as sf

    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, dtype=np.float32), 16000)
    code, _, err = lyra(capsys, "chat", "--speech", str(silent))
    assert code == 1
    assert_one_line_error(err, "silent.wav")


def test_model_folder_without_config(capsys, tmp_path: Path) -> None:  # noqa: ANN001
    code, _, err = lyra(capsys, "chat", "--model", str(tmp_path), "--text", "hi")
    assert code == 1
    assert_one_line_error(err, "config.json")


def test_model_folder_with_missing_shard(capsys, tiny_copy: Path) -> None:  # noqa: ANN001
    shard = sorted(tiny_copy.glob("model-*.safetensors"))[-1]
    shard.unlink()
    code, _, err = lyra(capsys, "chat", "--model", str(tiny_copy), "--text", "hi")
    assert code == 1
    assert_one_line_error(err, shard.name)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--dtype", "fp8"], "fp8"),
        (["--device", "tpu"], "tpu"),
        (["--load-8bit", "--load-4bit"], "--load-8bit"),
        (["--temperature", "-1"], "--temperature"),
    ],
)
def test_unknown_flag_values_are_usage_errors(capsys, args: list[str], fragment: str) -> None:  # noqa: ANN001
    code, _, err = lyra(capsys, "chat", "--text", "hi", *args)
    assert code == 2
    assert_one_line_error(err, fragment)


def test_no_question_without_terminal_is_a_usage_error(capsys, monkeypatch) -> None:  # noqa: ANN001
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, _, err = lyra(capsys, "chat", "--image", str(IMAGE))
    assert code == 2
    assert_one_line_error(err, "no question")


def test_debug_lets_the_exception_through(capsys) -> None:  # noqa: ANN001
    with pytest.raises(Exception, match="missing.jpg"):
        run(["--debug", "chat", "--image", "missing.jpg", "--text", "hi"])


def test_chat_with_the_extractor_reports_kept_tokens(capsys, tiny_dir: Path) -> None:  # noqa: ANN001
    code, out, _ = lyra(capsys, "chat", "--image", str(IMAGE), "--speech", str(SPEECH), "--text", "what now?",
                        "--extract", "2x0.5", "--json", *FAST)  # fmt: skip
    record = json.loads(out)
    assert code == 0 and record["kept_tokens"] < record["prompt_tokens"]
    assert record["evidence"][0]["source"].endswith("extreme_ironing.mp3")


def test_bad_extract_spec_is_a_usage_error(capsys) -> None:  # noqa: ANN001
    code, _, err = lyra(capsys, "chat", "--text", "hi", "--extract", "3y0.5")
    assert code == 2
    assert_one_line_error(err, "3y0.5", "BLOCKSxRATIO")


@pytest.mark.parametrize(("argv", "message"), [
    (["chat", "--bogus"], "No such option: --bogus"),
    (["train", "stage9"], "No such command 'stage9'"),
    (["eval", "merge"], "Missing argument"),
])  # fmt: skip
def test_usage_errors_exit_2_without_a_traceback(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
