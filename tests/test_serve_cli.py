"""`lyra serve` as a command: refused settings fail before the model loads, a busy port is a clear error, and
Ctrl-C cancels the answer under way and exits 130."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.request import Request, urlopen

import pytest
from helpers.signals import sigint_default

from lyra_cli.commands.serve import is_loopback
from lyra_cli.main import run

pytest.importorskip("fastapi")

REPO = Path(__file__).resolve().parent.parent
STOP_TIMEOUT_S = 60  # a wait for the process, not a timing


@pytest.fixture(autouse=True)
def _no_key_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LYRA_API_KEY", raising=False)


def test_a_reachable_host_needs_an_api_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--host `0.0.0.0`" in err and "--api-key" in err and "LYRA_API_KEY" in err


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                                 ("localhost", True), ("0.0.0.0", False), ("::", False),
                                                 ("192.168.1.4", False), ("example.com", False)])  # fmt: skip
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("flags", [["--max-queue", "0"], ["--port", "70000"], ["--max-request-mb", "0"],
                                   ["--max-audio-s", "-1"], ["--cached-clients", "-1"], ["--stream-interval-ms", "-1"]])  # fmt: skip
def test_bad_settings_are_usage_errors(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["serve", *flags]) == 2
    assert flags[0] in capsys.readouterr().err


def test_cached_media_reaches_the_server(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from lyra_cli.commands import serve

    seen = []
    monkeypatch.setattr(serve, "_run", lambda _engine, _settings, _sock, served, _q: seen.append(served.cached_media))
    assert run(["serve", "--port", "0", "--no-voice", "-q", "--cached-media", "0"]) == 0
    assert run(["serve", "--port", "0", "--no-voice", "-q"]) == 0
    assert seen == [0, serve.media_cache.DEFAULT_CACHED_MEDIA]
    assert run(["serve", "--cached-media", "-1"]) == 2
    assert "--cached-media" in capsys.readouterr().err


def test_a_busy_port_is_an_error_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run(["serve", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"port `{port}`" in err and "already in use" in err and "--port" in err


def test_ctrl_c_cancels_the_answer_under_way_and_exits_130(tiny_dir: Path) -> None:  # tiny_dir: built, in the cache
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lyra_cli.main", "serve", "--port", "0", "--no-voice", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=sigint_default,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()  # the address, printed once the model is loaded
        assert line.startswith("lyra serve: http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[2]
        with urlopen(f"{url}/health", timeout=STOP_TIMEOUT_S) as response:
            assert json.loads(response.read())["model"] == "tiny"
        streaming = _stream_in_background(url)
        assert streaming["started"].wait(STOP_TIMEOUT_S), "the answer never started"
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=STOP_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err


def _stream_in_background(url: str) -> dict:
    """A long streamed answer read in a thread; `started` is set once its first text arrived."""
    state = {"started": threading.Event()}
    body = json.dumps({"model": "tiny", "stream": True, "max_tokens": 5000,
                       "messages": [{"role": "user", "content": "talk"}]}).encode()  # fmt: skip

    def read() -> None:
        request = Request(f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
        try:
            with urlopen(request, timeout=STOP_TIMEOUT_S) as response:
                for raw in response:
                    if raw.startswith(b"data: ") and b'"content"' in raw:
                        state["started"].set()
        except OSError:  # the server went away mid-answer: what this test does to it
            pass

    threading.Thread(target=read, daemon=True).start()
    return state


def test_a_model_without_a_speech_generator_serves_text_only(tiny_copy: Path) -> None:
    import lyra_cli.engine as api
    from lyra_cli.commands.serve import _load_voice

    (tiny_copy / "speech_generator.safetensors").unlink()
    engine = api.load(tiny_copy, device="cpu")
    note = _load_voice(engine, None, chunk_units=40, aligned=False, off=False)
    assert engine.voice is None and note.startswith("speech out: off") and "speech generator" in note
    assert _load_voice(engine, None, chunk_units=40, aligned=False, off=True) == "speech out: off (--no-voice)"


def test_connections_to_the_bound_socket_have_nagle_off() -> None:
    """asyncio (and so uvicorn) sets TCP_NODELAY only on sockets that say they are TCP; without it every
    keep-alive response waits ~40 ms for the client's delayed ACK."""
    import asyncio

    from lyra_cli.commands.serve import bind

    async def nodelay_of_accepted() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def accepted(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        sock = bind("127.0.0.1", 0)
        server = await asyncio.start_server(accepted, sock=sock)
        async with server:
            _reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            value = await asyncio.wait_for(seen, STOP_TIMEOUT_S)
            writer.close()
        return value

    assert asyncio.run(nodelay_of_accepted()) == 1
