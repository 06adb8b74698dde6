"""How many `lyra_cli` modules one turn crosses: one question of `lyra longspeech` and one spoken answer
of `lyra chat --speak` on the tiny model (issue 12: a turn should cross fewer modules).

Each command runs in this process through `lyra_cli.main.run`, the entry point the `lyra` script calls,
with a `sys.setprofile` / `threading.setprofile` hook (the vocoder and the speaker run threads) that
records the module of every Python function called while the command's function runs (not the parsing of
the command line). A call inside model loading (`Engine.load`, `load_voice`, `resolve_model`: the dynamic
extent of each) counts for the command (`command` column) but not for the turn; everything else the
command does — checking and decoding the inputs, encoding them, prefill, generation, speech out,
rendering — is the turn. Each command runs once unmeasured first, so every module is already imported
and a module counts only when one of its functions runs, not because its import ran.

    python -m benchmarks.turn_modules                  # ~30 s
    python -m benchmarks.turn_modules --out benchmarks/results/turn_modules.json

The recording is the real clips of /work/shared/data/real (or examples/) one after another, repeated to
3 minutes. The speaker is ALSA's file plugin (a temporary ~/.asoundrc), so `--speak` plays somewhere on a
machine without a sound card; the speech-token cache is a temporary folder, emptied before the measured run.
Prints a table and writes JSON (default benchmarks/results/turn_modules.json).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
REAL = Path("/work/shared/data/real")
CLIPS = ("jfk.flac", "extreme_ironing.mp3", "Hi.mp3", "movement.mp3", "Chinese_painting.mp3")
RECORDING_S = 180
PAUSE_S = 0.5
PACKAGE = "lyra_cli"
# Model loading: calls inside these (by qualified name) belong to the command, not to the turn.
LOADING = frozenset({"Engine.load", "load_voice", "resolve_model"})
ASOUNDRC = """\
pcm.!default {{ type asym playback.pcm "lyra_speaker" capture.pcm "lyra_null" }}
pcm.lyra_speaker {{ type plug slave {{ pcm "lyra_speaker_tap" format S16_LE rate 16000 channels 1 }} }}
pcm.lyra_speaker_tap {{ type file slave.pcm "lyra_null" file "{out}" format "raw" }}
pcm.lyra_null {{ type null }}
"""


class ModuleRecorder:
    """A profile hook: the `lyra_cli` modules whose Python functions ran inside the command's function
    (`turn`, less model loading) and inside model loading (`loading`)."""

    def __init__(self, command: str) -> None:
        self.command = command  # the command function's qualified name: `chat`, `longspeech`
        self.turn: set[str] = set()
        self.loading: set[str] = set()
        self._in_command = 0  # not per thread: the vocoder's and the speaker's threads belong to the turn
        self._in_loading = 0

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event not in ("call", "return"):
            return
        module = frame.f_globals.get("__name__", "")
        if not (module == PACKAGE or module.startswith(PACKAGE + ".")):
            return
        step = 1 if event == "call" else -1
        name = frame.f_code.co_qualname
        if name == self.command and module.startswith(f"{PACKAGE}.commands."):
            self._in_command += step
        elif name in LOADING:
            self._in_loading += step
        if event == "call" and self._in_command > 0:
            (self.loading if self._in_loading > 0 or name in LOADING else self.turn).add(module)

    @contextlib.contextmanager
    def active(self) -> Iterator[ModuleRecorder]:
        threading.setprofile(self)
        sys.setprofile(self)
        try:
            yield self
        finally:
            sys.setprofile(None)
            threading.setprofile(None)


def _recording(path: Path) -> Path:
    import numpy as np
    import soundfile as sf

    from lyra_cli.audio.features import SAMPLE_RATE_HZ
    from lyra_cli.audio.io import load_audio

    source = REAL if REAL.is_dir() else REPO / "examples"
    clips = [load_audio(source / name) for name in CLIPS if (source / name).is_file()]
    pause = np.zeros(int(PAUSE_S * SAMPLE_RATE_HZ), dtype=np.float32)
    cycle = np.concatenate([x for clip in clips for x in (clip, pause)])
    n = RECORDING_S * SAMPLE_RATE_HZ
    sf.write(path, np.tile(cycle, n // len(cycle) + 1)[:n], SAMPLE_RATE_HZ)
    return path


def _run(argv: list[str]) -> None:
    from lyra_cli.main import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run(argv)
    if code != 0:
        raise SystemExit(f"lyra {' '.join(argv)}: exit {code}\n{err.getvalue()}")


def _measure(name: str, argv: list[str], speech_cache: Path) -> dict:
    """`argv[0]` is the command, and the name of its function."""
    _run(argv)  # imports every module the command needs, builds the tiny model once
    shutil.rmtree(speech_cache, ignore_errors=True)  # the measured turn encodes and caches afresh
    with ModuleRecorder(argv[0]).active() as recorder:
        _run(argv)
    command = recorder.turn | recorder.loading
    engine = sorted(m for m in recorder.turn if m.startswith(f"{PACKAGE}.engine"))
    return {"command": name, "argv": argv, "turn_modules": len(recorder.turn),
            "turn_engine_modules": len(engine), "command_modules": len(command),
            "turn": sorted(recorder.turn), "loading_only": sorted(recorder.loading - recorder.turn)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "turn_modules.json")
    parser.add_argument("--label", default="", help="Recorded in the JSON (e.g. `before`, `after`).")
    parser.add_argument("--list", action="store_true", help="Also print each turn's modules.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        from lyra_cli.engine.model.tiny import tiny_model_dir

        tiny = tiny_model_dir()  # found in (or built into) the usual cache
        os.environ["LYRA_CACHE_DIR"] = str(tmp / "cache")  # the speech-token cache: ours, emptied per run
        (tmp / "cache").mkdir()
        (tmp / "cache" / tiny.name).symlink_to(tiny)
        home = tmp / "home"
        home.mkdir()
        (home / ".asoundrc").write_text(ASOUNDRC.format(out=tmp / "speaker.raw"))
        os.environ["HOME"] = str(home)  # read by ALSA when sounddevice first loads PortAudio
        speech_cache = tmp / "cache" / "speech"
        recording = _recording(tmp / "three_minutes.flac")
        source = REAL if REAL.is_dir() else REPO / "examples"
        common = ["--model", "tiny", "--max-new-tokens", "16", "--seed", "0", "-q"]
        rows = [
            _measure("longspeech (1 question)", ["longspeech", str(recording), "--ask", "summarize", *common],
                     speech_cache),
            _measure("chat --speak (image + speech)", ["chat", "--image", str(source / "extreme_ironing.jpg"),
                     "--speech", str(source / "extreme_ironing.mp3"), "--speak", "--output-device", "lyra_speaker",
                     *common], speech_cache),
        ]  # fmt: skip

    print(f"{'command':<32} {'turn':>5} {'engine':>7} {'command':>8}")
    for row in rows:
        print(f"{row['command']:<32} {row['turn_modules']:>5} {row['turn_engine_modules']:>7} "
              f"{row['command_modules']:>8}")  # fmt: skip
        if args.list:
            print("  " + " ".join(m.removeprefix(PACKAGE + ".") for m in row["turn"]))
    machine = {"platform": platform.platform(), "python": platform.python_version(), "recording_s": RECORDING_S}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"label": args.label, "machine": machine, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
