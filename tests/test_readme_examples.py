"""Every `lyra …` command in README.md's code blocks runs as written on the tiny model.

The commands are read from the README itself, so an example added there is tested here. Each one runs in a
scratch folder where the files it names exist (copies of the real recordings and images, a synthetic
training set), with `-m/--model PATH` dropped (the tiny model is the default). Two mappings keep it fast,
and change nothing a command means: answers are capped at a few tokens, and training at 2 steps. Commands
that need what a test machine lacks are skipped by an explicit rule with its reason (`SKIPS`); a command
no rule covers must run.
"""

from __future__ import annotations

import io
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from helpers.synthetic import write_synthetic_set
from lyra_cli.main import run

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = README.parent / "examples"
ANSWER_TOKENS = "4"  # `--max-new-tokens` added where the command sets none: random weights talk until the cap
TRAIN_STEPS = "2"  # `--steps` for training commands (the README's 2000 would take hours on CPU)
MODEL_FLAGS = ("-m", "--model")
OUTPUT_FLAGS = ("--speech-out", "--out")
ANSWERING = ("chat", "longspeech", "listen")
# Files the examples name, by extension: the real file whose content stands in for them. `.m4a` gets the mp3's
# bytes: FFmpeg reads a file by its content, not its name, so this still runs the `.m4a` path of the CLI.
STAND_INS = {".jpg": "extreme_ironing.jpg", ".png": "extreme_ironing.jpg", ".mp3": "extreme_ironing.mp3",
             ".flac": "jfk.flac", ".wav": "pred_round0.wav", ".m4a": "Hi.mp3", ".mp4": "movement.mp4"}  # fmt: skip

# (pattern in the command, reason): what a CPU-only test machine cannot run.
SKIPS = [
    (r"--speak\b", "plays through a sound card"),
    (r"^lyra listen( -m \S+)?$", "listens to a microphone"),
    (r"--input-device", "listens to a microphone"),
    (r"--list-devices", "needs the PortAudio library and sound devices"),
    (r"^lyra chat -m \S+ --load-4bit$", "opens the REPL, which needs a terminal"),
    (r"^lyra eval (textvqa-s|docvqa-s|chartqa-s|mmvet-s|librispeech)\b", "needs the Lyra_Eval data sets"),
    (r"--judge-url", "needs a judge endpoint on the network"),
    (r"^lyra eval needle\b", "builds 10-60 minute recordings (tests/test_needle.py runs it at small sizes)"),
    (r"^torchrun\b", "starts several processes (tests/test_train_distributed.py runs two)"),
    (r"^(\S+=\S+ )?lyra serve\b", "serves until stopped (tests/test_serve_cli.py starts it and stops it with Ctrl-C)"),
]

# (pattern, reason): commands that run, but too long for the default suite (`pytest -m slow` runs them).
SLOW = [
    (r"^lyra train stage\d\b(?!.*--dry-run)", "trains for real (minutes on 2 cores; tests/test_train_cli.py is faster)"),
    (r"^lyra train merge\b", "merges what the slow training example wrote"),
]


def readme_commands() -> list[str]:
    """The `lyra …` (and `torchrun … lyra_cli …`) lines of the README's bash blocks, continuations joined,
    comments and a leading `scripts/setup.sh && .venv/bin/` stripped; `echo … |` kept in front."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            line = re.sub(r"^.*&& \.venv/bin/(?=lyra )", "", line)
            if re.match(r"^(lyra |torchrun |echo .*\| *lyra )", line):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def _skip_reason(command: str) -> str | None:
    return next((reason for pattern, reason in SKIPS if re.search(pattern, command)), None)


def _prepared_args(command: str, workdir: Path, real: Path) -> tuple[list[str], str | None]:
    """argv for `run` and the stdin text: model flags dropped, named input files created in `workdir`."""
    stdin = None
    if command.startswith("echo "):
        echoed, _, command = command.partition("|")
        stdin = shlex.split(echoed)[1] + "\n"
    args = shlex.split(command)[1:]  # without `lyra`
    argv: list[str] = []
    i = 0
    while i < len(args):
        if args[i] in MODEL_FLAGS:
            i += 2
            continue
        if args[0] == "info" and i == 1 and not args[i].startswith("-"):  # `lyra info DIR`: DIR is the model
            i += 1
            continue
        if i > 0 and args[i - 1] not in OUTPUT_FLAGS:
            _create_input(args[i], args[i - 1], workdir, real)
        argv.append(args[i])
        i += 1
    if argv[0] in ANSWERING and "--max-new-tokens" not in argv:
        argv += ["--max-new-tokens", ANSWER_TOKENS]
    if argv[0] == "train" and argv[1].startswith("stage") and "--dry-run" not in argv:
        argv = _with_value(argv, "--steps", TRAIN_STEPS)
    if argv[0] == "longspeech" and "--ask" not in argv and stdin is None:
        stdin = "What is said?\n"  # piped questions, one per line: the README's `ask>` prompt without a terminal
    return argv, stdin


def _with_value(argv: list[str], flag: str, value: str) -> list[str]:
    if flag in argv:
        argv = list(argv)
        argv[argv.index(flag) + 1] = value
        return argv
    return [*argv, flag, value]


def _create_input(value: str, flag: str, workdir: Path, real: Path) -> None:
    """Make the file or folder an example names, unless it exists (or is made by an earlier example)."""
    path = workdir / value
    if path.exists() or value.startswith("-"):
        return
    if flag == "--data" and path.suffix in (".json", ".jsonl"):
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(write_synthetic_set(workdir, real, n_records=4, seed=1), path)  # media under workdir
    elif flag in ("--image-folder", "--speech-folder"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(workdir, target_is_directory=True)  # the synthetic set's paths resolve below it too
    elif path.suffix.lower() in STAND_INS:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real / STAND_INS[path.suffix.lower()], path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One scratch folder for all examples, in README order: `train merge` uses what `train stage2` wrote."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "examples").symlink_to(EXAMPLES, target_is_directory=True)
    return folder


COMMANDS = readme_commands()
PARAMS = [pytest.param(c, marks=pytest.mark.slow) if any(re.search(p, c) for p, _ in SLOW) else c for c in COMMANDS]


def test_the_readme_has_examples_for_every_command() -> None:
    """The parser still finds the README's examples (a broken parse would make the test below vacuous)."""
    names = {shlex.split(c.partition("| ")[2] or c)[1] for c in COMMANDS if not c.startswith("torchrun")}
    assert {"chat", "longspeech", "listen", "train", "eval"} <= names
    assert any("--extract 4x0.7" in c for c in COMMANDS)


@pytest.mark.parametrize("command", PARAMS)
def test_readme_example_runs(command: str, workdir: Path, real: Path, tiny_dir: Path,
                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    reason = _skip_reason(command)
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.chdir(workdir)
    argv, stdin = _prepared_args(command, workdir, real)
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = run(argv)
    err = capsys.readouterr().err
    assert code == 0, f"`{command}` (run as `lyra {shlex.join(argv)}`) exited {code}:\n{err[-2000:]}"
