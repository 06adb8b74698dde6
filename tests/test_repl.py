"""The multi-turn REPL: media commands, /reset, errors that end a line but not the session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lyra_cli.commands.chat import TurnSettings, run_repl
from lyra_cli.engine.model.runtime import RuntimeRequest, resolve_runtime
from lyra_cli.engine.run.generate import SamplingConfig
from lyra_cli.engine.run.pipeline import Engine
from lyra_cli.engine.run.prompt import Conversation


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> Engine:
    return Engine.load(tiny_dir, resolve_runtime(RuntimeRequest(device="cpu")))


def test_repl_turns_media_reset_and_errors(engine: Engine, real: Path, capsys) -> None:  # noqa: ANN001
    conv = Conversation()
    lines = [
        f"/image {real / 'extreme_ironing.jpg'}",
        "what is unusual here?",  # answered with the image: adapter none
        f"/speech {real / 'extreme_ironing.mp3'}",  # speech is a question by itself
        "/image does-not-exist.jpg",  # error, session continues
        "/bogus",
        "/reset",
        "hello",
        "/exit",
        "never answered",
    ]
    run_repl(engine, conv, SamplingConfig(max_new_tokens=2), lines, TurnSettings(json_out=True))
    out, err = capsys.readouterr()
    turns = [json.loads(line) for line in out.splitlines()]
    assert [t["adapter"] for t in turns] == ["none", "speech", "none"]
    assert [i["kind"] for i in turns[0]["inputs"]] == ["image", "text"]
    assert turns[2]["prompt_tokens"] < turns[1]["prompt_tokens"]  # /reset dropped the history
    assert "does-not-exist.jpg" in err and "unknown command `/bogus`" in err
    assert len(conv.turns) == 1  # only "hello" after /reset
