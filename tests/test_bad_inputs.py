"""A table of bad inputs across every command: each must end in exactly one `error:` line and one `hint:` line,
the right exit code, no traceback, and no file changed or appeared in the test's folder.

Each row is an argv (with `{d}`: the row's own folder, `{model}`: a private copy of the tiny model when the
row damages one, `{real}`: the bundled recordings) plus the files to create first. The runs are in-process
(`lyra_cli.main.run`) and fail before any work, so the table stays fast.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lyra_cli.main import run

SHARD_1, SHARD_2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"
LORA = "speech_lora"
Setup = Callable[[Path], None]


@dataclass(frozen=True)
class Row:
    name: str
    argv: tuple[str, ...]
    code: int
    fragment: str  # must appear in the error or hint
    setup: Setup | None = None  # damages {model} (a copy of tiny) or adds files to {d}
    needs_model: bool = False
    cache_dir: str | None = None  # LYRA_CACHE_DIR for this row (`{d}`-relative)
    disk: str | None = None  # simulate a disk state root cannot produce: a key of DISKS


# ---------------------------------------------------------------------------------------------------------
# What each row finds in its folder: a user's notes, a real recording lyra did not write, folders, a fifo


def _common_files(d: Path, real: Path) -> None:
    (d / "notes.txt").write_text("my notes\n")
    (d / "notes.wav").write_text("not audio, and not lyra's\n")
    shutil.copy(real / "pred_round0.wav", d / "song.wav")  # a real wav lyra did not write
    (d / "afile").write_text("x")
    (d / "adir").mkdir()
    (d / "adir.wav").mkdir()
    (d / "adir.jsonl").mkdir()
    (d / "full").mkdir()
    (d / "full" / "keep.txt").write_text("keep")
    (d / "bad.json").write_text('[{"id": 1}')
    (d / "dict.json").write_text('{"a": 1}')
    (d / "latin1.json").write_bytes(b"\xff\xfe[\x00")
    (d / "empty.json").write_text("[]")
    (d / "s1.jsonl").write_text(json.dumps({"id": "1", "suite": "textvqa-s", "mode": "speech"}) + "\n")
    os.mkfifo(d / "fifo.wav")


def _damage(relative: str, how: Callable[[Path], None]) -> Setup:
    return lambda model: how(model / relative)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage" * 100)


def _folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _bad_json(path: Path) -> None:
    path.write_text("{bad")


def _edit_json(**changes: object) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        data = json.loads(path.read_text())
        data.update(changes)
        path.write_text(json.dumps(data))

    return edit


def _double_r(path: Path) -> None:
    data = json.loads(path.read_text())
    data["r"] = int(data.get("r", 8)) * 2
    path.write_text(json.dumps(data))


def _swap_index(path: Path) -> None:
    """Three keys moved to the other shard in the index: the shards and the index disagree."""
    index = json.loads(path.read_text())
    for key in list(index["weight_map"])[:3]:
        index["weight_map"][key] = SHARD_2 if index["weight_map"][key] == SHARD_1 else SHARD_1
    path.write_text(json.dumps(index))


def _map_to_number(path: Path) -> None:
    path.write_text(json.dumps({"weight_map": {"lm_head.weight": 3}}))


def _unsafe_pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps(collections.OrderedDict(a=os.system)))


def _tensor_list(path: Path) -> None:
    torch.save([torch.zeros(3)], path)


def _wrong_projector_shape(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    state[next(iter(state))] = torch.zeros(3)
    torch.save(state, path)


def _wrong_shard_shape(path: Path) -> None:
    tensors = load_file(str(path))
    tensors[next(iter(tensors))] = torch.zeros(2)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _in_d(write: Callable[[Path], None]) -> Setup:
    """A setup that writes into the row's folder (`model` is `{d}/model`, so its parent is `{d}`)."""
    return lambda model: write(model.parent)


def _user_file_in(folder: str, name: str, text: str = "mine\n") -> Setup:
    def write(d: Path) -> None:
        (d / folder).mkdir(exist_ok=True)
        (d / folder / name).write_text(text)

    return _in_d(write)


def _checkpoint(damage: Callable[[Path], None]) -> Setup:
    """A run folder whose only checkpoint has a readable state and a damaged file."""

    def write(d: Path) -> None:
        step = d / "run" / "checkpoints" / "step-00000001"
        step.mkdir(parents=True)
        state = {"step": 1, "position": 1, "stage": "stage1", "total_steps": 2, "seed": 0, "names": [],
                 "world_size": 1}  # fmt: skip
        (step / "trainer_state.json").write_text(json.dumps(state))
        save_file({"x": torch.zeros(1)}, str(step / "trainable.safetensors"))
        torch.save({"optimizer": {}, "scheduler": {}}, step / "optimizer.pt")
        torch.save({"ranks": [{}]}, step / "rng.pt")
        damage(step)

    return _in_d(write)


def _failing_probe(code: int) -> Callable[[pytest.MonkeyPatch], None]:
    """Creating any file fails with `code` (tests run as root, which permission bits do not stop)."""

    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        def mkstemp(*args: object, **kwargs: object) -> tuple[int, str]:
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr("lyra_cli.outputs.tempfile.mkstemp", mkstemp)

    return patch


def _nearly_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lyra_cli.outputs.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))


DISKS = {"full": _failing_probe(errno.ENOSPC), "read-only": _failing_probe(errno.EROFS),
         "no permission": _failing_probe(errno.EACCES), "nearly full": _nearly_full}  # fmt: skip

CHAT = ("chat", "--text", "hi", "--max-new-tokens", "2")
WITH_MODEL = ("-m", "{model}")
HI = "{real}/Hi.mp3"
STAGE1 = ("train", "stage1", "--data", "{d}/notes.txt", "--steps", "1")
NEEDLE = ("eval", "needle", "--haystack", "{real}/jfk.flac", "--needle", HI, "--question", "q", "--answer", "a",
          "--lengths", "20s")  # fmt: skip
TRAIN_DATA = ("--data", "{d}/synth/train.json", "--steps", "1", "--no-tensorboard", "-q")

# fmt: off
ROWS = [
    # --- chat / listen: --speech-out -----------------------------------------------------------------
    Row("speech-out is a folder", (*CHAT, "--speech-out", "{d}/adir.wav"), 2, "is a folder"),
    Row("speech-out under a file", (*CHAT, "--speech-out", "{d}/afile/x.wav"), 2, "is a file, not a folder"),
    Row("speech-out in a missing folder", (*CHAT, "--speech-out", "{d}/missing/x.wav"), 2, "does not exist"),
    Row("speech-out over a user's file", (*CHAT, "--speech-out", "{d}/notes.wav"), 2, "--overwrite"),
    Row("speech-out over a wav lyra did not write", (*CHAT, "--speech-out", "{d}/song.wav"), 2, "not written by lyra"),
    Row("speech-out on a fifo", (*CHAT, "--speech-out", "{d}/fifo.wav"), 2, "not a regular file"),
    Row("speech-out in /proc", (*CHAT, "--speech-out", "/proc/lyra-test.wav"), 2, "cannot write"),
    Row("speech-out name too long", (*CHAT, "--speech-out", "{d}/" + "a" * 300 + ".wav"), 2, "longer than"),
    Row("speech-out not a wav", (*CHAT, "--speech-out", "{d}/answer.mp3"), 2, "must end in .wav"),
    Row("speech-out on a full disk", (*CHAT, "--speech-out", "{d}/new.wav"), 2, "the disk is full", disk="full"),
    Row("speech-out on a read-only disk", (*CHAT, "--speech-out", "{d}/new.wav"), 2, "read-only", disk="read-only"),
    Row("listen speech-out over a user's file", ("listen", "--input-file", HI, "--speech-out", "{d}/notes.wav"), 2,
        "not written by lyra"),
    Row("listen speech-out is a folder", ("listen", "--input-file", HI, "--speech-out", "{d}/adir.wav"), 2,
        "is a folder"),
    Row("listen input is a folder", ("listen", "--input-file", "{d}/adir"), 1, "adir"),
    Row("listen input is text", ("listen", "--input-file", "{d}/notes.txt"), 1, "notes.txt"),
    # --- chat inputs ---------------------------------------------------------------------------------
    Row("speech is a folder", ("chat", "--speech", "{d}/adir"), 1, "adir"),
    Row("speech is text", ("chat", "--speech", "{d}/notes.txt"), 1, "notes.txt"),
    Row("image is text", ("chat", "--image", "{d}/notes.txt", "--text", "hi"), 1, "notes.txt"),
    Row("video is text", ("chat", "--video", "{d}/notes.txt", "--text", "hi"), 1, "notes.txt"),
    Row("image missing", ("chat", "--image", "{d}/none.jpg", "--text", "hi"), 1, "none.jpg"),
    # --- model folders -------------------------------------------------------------------------------
    Row("model folder empty", (*CHAT, "-m", "{d}/adir"), 1, "config.json"),
    Row("model is a file", (*CHAT, "-m", "{d}/notes.txt"), 1, "is a file"),
    Row("model missing", (*CHAT, "-m", "{d}/none"), 1, "does not exist"),
    Row("shard truncated", (*CHAT, *WITH_MODEL), 1, SHARD_1, _damage(SHARD_1, _truncate), True),
    Row("shard garbage", (*CHAT, *WITH_MODEL), 1, "unreadable", _damage(SHARD_2, _garbage), True),
    Row("shard is a folder", (*CHAT, *WITH_MODEL), 1, "is a folder", _damage(SHARD_1, _folder), True),
    Row("shards disagree with the index", (*CHAT, *WITH_MODEL), 1, "has no tensor", _damage(INDEX, _swap_index), True),
    Row("index not JSON", (*CHAT, *WITH_MODEL), 1, "not valid JSON", _damage(INDEX, _bad_json), True),
    Row("index maps to a number", (*CHAT, *WITH_MODEL), 1, "not a file name", _damage(INDEX, _map_to_number), True),
    Row("shard with a wrong shape", (*CHAT, *WITH_MODEL), 1, "has shape", _damage(SHARD_2, _wrong_shard_shape), True),
    Row("config not JSON", (*CHAT, *WITH_MODEL), 1, "config.json", _damage("config.json", _bad_json), True),
    Row("config is a folder", (*CHAT, *WITH_MODEL), 1, "config.json", _damage("config.json", _folder), True),
    Row("generation config not JSON", (*CHAT, *WITH_MODEL), 1, "generation_config.json",
        _damage("generation_config.json", _bad_json), True),
    Row("adapter config not JSON", (*CHAT, *WITH_MODEL), 1, "adapter_config.json",
        _damage(f"{LORA}/adapter_config.json", _bad_json), True),
    Row("adapter r disagrees with weights", (*CHAT, *WITH_MODEL), 1, "disagree",
        _damage(f"{LORA}/adapter_config.json", _double_r), True),
    Row("adapter r not a number", (*CHAT, *WITH_MODEL), 1, "must be numbers",
        _damage(f"{LORA}/adapter_config.json", _edit_json(r="x")), True),
    Row("adapter weights truncated", (*CHAT, *WITH_MODEL), 1, "adapter_model.safetensors",
        _damage(f"{LORA}/adapter_model.safetensors", _truncate), True),
    Row("adapter weights a folder", (*CHAT, *WITH_MODEL), 1, "is a folder",
        _damage(f"{LORA}/adapter_model.safetensors", _folder), True),
    Row("projector garbage", (*CHAT, *WITH_MODEL), 1, "cannot be read safely",
        _damage(f"{LORA}/non_lora_trainables.bin", _garbage), True),
    Row("projector truncated", (*CHAT, *WITH_MODEL), 1, "non_lora_trainables.bin",
        _damage(f"{LORA}/non_lora_trainables.bin", _truncate), True),
    Row("projector needs code to unpickle", (*CHAT, *WITH_MODEL), 1, "cannot be read safely",
        _damage(f"{LORA}/non_lora_trainables.bin", _unsafe_pickle), True),
    Row("projector not a dict", (*CHAT, *WITH_MODEL), 1, "dict of tensors",
        _damage(f"{LORA}/non_lora_trainables.bin", _tensor_list), True),
    Row("projector wrong shape", (*CHAT, *WITH_MODEL), 1, "the model needs",
        _damage(f"{LORA}/non_lora_trainables.bin", _wrong_projector_shape), True),
    Row("speech generator truncated", (*CHAT, *WITH_MODEL, "-q", "--speech-out", "{d}/new.wav"), 1,
        "speech_generator.safetensors", _damage("speech_generator.safetensors", _truncate), True),
    Row("info on a damaged index", ("info", *WITH_MODEL), 1, "not valid JSON", _damage(INDEX, _bad_json), True),
    Row("info on an empty folder", ("info", "-m", "{d}/adir"), 1, "config.json"),
    # --- longspeech and the cache --------------------------------------------------------------------
    Row("longspeech file is a folder", ("longspeech", "{d}/adir", "--ask", "q"), 1, "adir"),
    Row("longspeech file is text", ("longspeech", "{d}/notes.txt", "--ask", "q"), 1, "notes.txt"),
    Row("longspeech cache dir is a file", ("longspeech", HI, "--ask", "q"), 2, "--no-cache", cache_dir="afile"),
    Row("tiny model cache dir is a file", CHAT, 2, "LYRA_CACHE_DIR", cache_dir="afile"),
    Row("tiny model cache dir under a file", CHAT, 2, "is a file", cache_dir="afile/cache"),
    Row("cache info on a file", ("cache", "info"), 2, "is a file", cache_dir="afile"),
    Row("cache clear on a file", ("cache", "clear"), 2, "is a file", cache_dir="afile"),
    # --- eval ----------------------------------------------------------------------------------------
    Row("eval out over a user's file", ("eval", "textvqa-s", "--data", "{d}", "--out", "{d}/notes.txt"), 2,
        "not written by lyra"),
    Row("eval out over a user's file, no resume", ("eval", "textvqa-s", "--data", "{d}", "--out", "{d}/notes.txt",
                                                    "--no-resume"), 2, "--overwrite"),
    Row("eval out is a folder", ("eval", "librispeech", "--data", "{d}", "--out", "{d}/adir.jsonl"), 2, "is a folder"),
    Row("eval out under a file", ("eval", "docvqa-s", "--data", "{d}", "--out", "{d}/afile/run.jsonl"), 2,
        "is a file, not a folder"),
    Row("eval MM-Vet export over a user's file", ("eval", "mmvet-s", "--data", "{d}", "--out", "{d}/run.jsonl"), 2,
        "MM-Vet export", _user_file_in(".", "run.mmvet.json", "[1, 2]")),
    Row("eval data is a file", ("eval", "textvqa-s", "--data", "{d}/notes.txt", "--out", "{d}/new.jsonl"), 1,
        "notes.txt"),
    Row("eval data missing", ("eval", "chartqa-s", "--data", "{d}/none", "--out", "{d}/new.jsonl"), 1, "none"),
    Row("eval merge over a user's file", ("eval", "merge", "{d}/notes.txt", "{d}/s1.jsonl"), 2, "not written by lyra"),
    Row("eval merge into a folder", ("eval", "merge", "{d}/adir", "{d}/s1.jsonl"), 2, "is a folder"),
    Row("eval merge shard is a folder", ("eval", "merge", "{d}/new.jsonl", "{d}/adir"), 1, "is a folder"),
    Row("eval merge shard is a user's file", ("eval", "merge", "{d}/new.jsonl", "{d}/notes.txt"), 1,
        "not a lyra predictions file"),
    Row("eval out on a read-only disk", ("eval", "docvqa-s", "--data", "{d}", "--out", "{d}/new.jsonl"), 2,
        "read-only", disk="read-only"),
    Row("eval merge output is a shard", ("eval", "merge", "{d}/s1.jsonl", "{d}/s1.jsonl"), 2, "both"),
    Row("needle out is a file", (*NEEDLE, "--out", "{d}/afile"), 2, "is a file, not a folder"),
    Row("needle out over a user's json", (*NEEDLE, "--out", "{d}/nd"), 2, "not written by lyra",
        _user_file_in("nd", "needle.json", "{}")),
    Row("needle out over a user's png", (*NEEDLE, "--out", "{d}/nd"), 2, "not written by lyra",
        _user_file_in("nd", "needle.png", "not a png")),
    # --- train ---------------------------------------------------------------------------------------
    Row("train data is a folder", ("train", "stage1", "--data", "{d}/adir", "--out", "{d}/o"), 1, "is a folder"),
    Row("train data missing", ("train", "stage1", "--data", "{d}/none.json", "--out", "{d}/o"), 1, "does not exist"),
    Row("train out is a file", (*STAGE1, "--out", "{d}/afile"), 2, "is a file, not a folder"),
    Row("train out under a file", (*STAGE1, "--out", "{d}/afile/run"), 2, "is a file, not a folder"),
    Row("train out holds a user's result", (*STAGE1, "--out", "{d}/mine"), 2, "--overwrite",
        _user_file_in("mine", "mm_speech_projector.bin")),
    Row("train out holds a user's metrics", (*STAGE1, "--out", "{d}/mine"), 2, "not written by lyra",
        _user_file_in("mine", "metrics.jsonl")),
    Row("train checkpoints is a file", (*STAGE1, "--out", "{d}/run"), 2, "is a file, not a folder",
        _user_file_in("run", "checkpoints")),
    Row("train out without permission", (*STAGE1, "--out", "{d}/o"), 2, "permission denied", disk="no permission"),
    Row("train data not JSON", ("train", "stage1", "--data", "{d}/bad.json", "--out", "{d}/o"), 1, "not valid JSON"),
    Row("train data a dict", ("train", "stage2", "--data", "{d}/dict.json", "--out", "{d}/o"), 1, "not a list"),
    Row("train data not UTF-8", ("train", "stage3", "--data", "{d}/latin1.json", "--out", "{d}/o"), 1, "UTF-8"),
    Row("train data empty", ("train", "stage1", "--data", "{d}/empty.json", "--out", "{d}/o", "-q"), 1, "has no record stage1 can use"),
    Row("train setting of the wrong type", (*STAGE1, "--out", "{d}/o", "--set", "lora_r=abc"), 2, "must be a int"),
    Row("train unknown setting", (*STAGE1, "--out", "{d}/o", "--set", "nonsense=1"), 2, "unknown setting"),
    Row("train invalid setting", (*STAGE1, "--out", "{d}/o", "--set", "learning_rate=-1"), 2, "learning_rate"),
    Row("train --set without =", (*STAGE1, "--out", "{d}/o", "--set", "lr"), 2, "KEY=VALUE"),
    Row("train config is a folder", (*STAGE1, "--out", "{d}/o", "--config", "{d}/adir"), 1, "is a folder"),
    Row("train config not JSON", (*STAGE1, "--out", "{d}/o", "--config", "{d}/bad.json"), 1, "not valid JSON"),
    Row("train config a list", (*STAGE1, "--out", "{d}/o", "--config", "{d}/empty.json"), 1, "mapping"),
    Row("train bad precision", (*STAGE1, "--out", "{d}/o", "--precision", "fp8"), 2, "--precision"),
    Row("resume: damaged weights", ("train", "stage1", *TRAIN_DATA, "--out", "{d}/run"), 1, "--no-resume",
        _checkpoint(lambda step: _garbage(step / "trainable.safetensors"))),
    Row("resume: optimizer needs code to unpickle", ("train", "stage1", *TRAIN_DATA, "--out", "{d}/run"), 1,
        "optimizer.pt", _checkpoint(lambda step: _unsafe_pickle(step / "optimizer.pt"))),
    Row("resume: state not JSON", ("train", "stage1", *TRAIN_DATA, "--out", "{d}/run"), 1, "trainer_state.json",
        _checkpoint(lambda step: _bad_json(step / "trainer_state.json"))),
    Row("merge out is a file", ("train", "merge", "--out", "{d}/afile"), 2, "is a file, not a folder"),
    Row("merge out under a file", ("train", "merge", "--out", "{d}/afile/m"), 2, "is a file, not a folder"),
    Row("merge out not empty", ("train", "merge", "--out", "{d}/full"), 1, "not empty"),
    Row("merge out on a nearly full disk", ("train", "merge", "--out", "{d}/m"), 2, "MB free", disk="nearly full"),
    Row("merge out on a full disk", ("train", "merge", "--out", "{d}/m"), 2, "the disk is full", disk="full"),
    Row("merge unknown adapter", ("train", "merge", "--out", "{d}/m", "--adapter", "vision"), 2, "unknown adapter"),
    Row("merge a truncated adapter", ("train", "merge", *WITH_MODEL, "--out", "{d}/m"), 1, "adapter_model.safetensors",
        _damage(f"{LORA}/adapter_model.safetensors", _truncate), True),
    Row("merge a truncated shard", ("train", "merge", *WITH_MODEL, "--out", "{d}/m"), 1, SHARD_1,
        _damage(SHARD_1, _truncate), True),
    # --- usage errors --------------------------------------------------------------------------------
    Row("unknown option", ("chat", "--bogus"), 2, "lyra chat --help"),
    Row("unknown stage", ("train", "stage9"), 2, "lyra train --help"),
    Row("missing argument", ("eval", "merge"), 2, "Missing argument"),
    Row("not an integer", ("chat", "--max-new-tokens", "abc", "--text", "x"), 2, "--max-new-tokens"),
    Row("unknown suite", ("eval", "vqav2", "--data", "{d}"), 2, "unknown eval suite"),
    Row("extra argument", ("info", "a", "b"), 2, "lyra info --help"),
]
# fmt: on


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root`: kind, and for files size, mtime and content hash."""
    state: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            state[key] = ("other",)
        elif path.is_dir():
            state[key] = ("dir",)
        else:
            stat = path.stat()
            state[key] = ("file", stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def test_the_table_is_large_and_spans_every_command() -> None:
    assert len(ROWS) >= 60 and len({row.name for row in ROWS}) == len(ROWS)
    commands = {row.argv[0] if row.argv[0] not in ("train", "eval", "cache") else " ".join(row.argv[:2])
                for row in ROWS}  # fmt: skip
    for command in ("chat", "listen", "longspeech", "info", "cache info", "cache clear", "eval merge", "eval needle",
                    "train stage1", "train stage2", "train stage3", "train merge"):  # fmt: skip
        assert command in commands, command


@pytest.fixture(scope="module")
def synth(real: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers.synthetic import write_synthetic_set

    folder = tmp_path_factory.mktemp("synth")
    write_synthetic_set(folder, real, n_records=2, seed=1)
    return folder


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_input(row: Row, tiny_dir: Path, real: Path, synth: Path, tmp_path: Path,
                   capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    d = tmp_path
    _common_files(d, real)
    model = d / "model"
    if row.needs_model:
        shutil.copytree(tiny_dir, model)
    if "{d}/synth" in " ".join(row.argv):
        shutil.copytree(synth, d / "synth")
    if row.setup is not None:
        row.setup(model)
    if row.disk is not None:
        DISKS[row.disk](monkeypatch)
    if row.cache_dir is not None:
        monkeypatch.setenv("LYRA_CACHE_DIR", str(d / row.cache_dir))
    monkeypatch.setattr("sys.stdin.isatty", lambda: False, raising=False)
    argv = [arg.format(d=d, model=model, real=real) for arg in row.argv]
    before = snapshot(d)
    capsys.readouterr()

    code = run(argv)

    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == row.code, err
    assert "Traceback" not in err
    assert [line.split(":")[0] for line in lines] == ["error", "hint"], err
    assert row.fragment in err, err
    assert snapshot(d) == before, "a file changed or appeared"


def _damaged_mp3(real: Path, path: Path) -> Path:
    """Hi.mp3 cut after its first frame header and filled with noise: libmpg123 prints `Note:` lines on it."""
    data = (real / "Hi.mp3").read_bytes()
    start = data.find(b"\xff\xfb")
    path.write_bytes(data[: start + 4] + bytes(range(256)) * 20)
    return path


@pytest.mark.slow  # two fresh interpreters: the notes are written by C code to fd 2, out of capsys' reach
def test_library_noise_reaches_the_terminal_only_with_verbose(tiny_copy: Path, real: Path, tmp_path: Path) -> None:
    """A damaged mp3 (mpg123 notes, FFmpeg warnings) and a projector pickle that makes torch warn: without -v
    stderr holds the error and its hint (and lyra's own warning); with -v the library's warning shows."""
    import subprocess
    import sys

    _unsafe_pickle(tiny_copy / LORA / "non_lora_trainables.bin")
    argv = ["chat", "--speech", str(_damaged_mp3(real, tmp_path / "damaged.mp3")), "-m", str(tiny_copy)]
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    plain = subprocess.run([sys.executable, "-m", "lyra_cli.main", *argv], capture_output=True, text=True, env=env,
                           check=False)  # fmt: skip
    # lyra's own warning (it skipped a damaged packet) stays; nothing from the libraries does
    lines = [line for line in plain.stderr.splitlines() if line.strip() and not line.startswith("WARNING lyra_cli.")]
    assert plain.returncode == 1 and [line.split(":")[0] for line in lines] == ["error", "hint"], plain.stderr
    verbose = subprocess.run([sys.executable, "-m", "lyra_cli.main", "-v", *argv], capture_output=True, text=True,
                             env=env, check=False)  # fmt: skip
    assert verbose.returncode == 1 and "UserWarning" in verbose.stderr and "Traceback" not in verbose.stderr
