"""`lyra serve`: Lyra behind OpenAI's Chat Completions API (and a web page), on one port.

Every option is checked and the port is bound before any weights load, so a typo or a busy port fails at
once. The model loads once; requests take turns on it (`lyra_cli.serve.worker`). Ctrl-C cancels the
answers under way, closes the connections and exits 130, as every command does when interrupted."""

from __future__ import annotations

import errno
import ipaddress
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from lyra_cli.commands import common, speech_io
from lyra_cli.engine import TINY
from lyra_cli.errors import LyraError, UsageError
from lyra_cli.serve import media, media_cache, protocol, worker  # defaults (light: no FastAPI, no torch)

if TYPE_CHECKING:
    from lyra_cli.engine import Engine

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
API_KEY_ENV = "LYRA_API_KEY"
LOOPBACK_NAMES = ("localhost",)
LISTEN_BACKLOG = 2048  # uvicorn's default
SHUTDOWN_GRACE_S = 5  # after Ctrl-C, how long open connections may take to finish their cancelled answers


HostOption = typer.Option(
    DEFAULT_HOST, "--host", help="Address to listen on (anything but loopback needs --api-key)."
)
PortOption = typer.Option(DEFAULT_PORT, "--port", help="Port to listen on (0: any free port, printed at start).")
ApiKeyOption = typer.Option(
    None, "--api-key", envvar=API_KEY_ENV, show_envvar=True,
    help="Require `Authorization: Bearer KEY` on /v1/ requests (read from $LYRA_API_KEY when not given).",
)  # fmt: skip
MaxMediaOption = typer.Option(
    float(media.DEFAULT_MAX_PART_MB), "--max-media-mb", help="Largest media part (image, audio, video), in MB."
)
MaxAudioOption = typer.Option(
    media.DEFAULT_MAX_AUDIO_S, "--max-audio-s", help="Longest audio part, in seconds (over 30 s: the long-speech path)."
)
MaxQueueOption = typer.Option(
    worker.DEFAULT_MAX_QUEUE, "--max-queue", help="Requests that may wait for the model; more get a 503."
)
MaxRequestOption = typer.Option(
    float(protocol.DEFAULT_MAX_REQUEST_MB), "--max-request-mb", help="Largest request body, in MB (413 beyond)."
)
CachedClientsOption = typer.Option(
    worker.DEFAULT_CACHED_CLIENTS, "--cached-clients",
    help="Clients whose last prompt's KV cache is kept for their next turn (0: none).",
)  # fmt: skip
StreamIntervalOption = typer.Option(
    worker.DEFAULT_STREAM_INTERVAL_MS, "--stream-interval-ms",
    help="Streamed text goes out at most this often, in milliseconds (0: each token as it comes); the first "
         "token, speech and the end go at once. Tokens further apart than this always go out one by one.",
)  # fmt: skip
MaxFramesOption = typer.Option(media.DEFAULT_MAX_VIDEO_FRAMES, "--max-video-frames", help="Most frames in a video.")
CachedMediaOption = typer.Option(
    media_cache.DEFAULT_CACHED_MEDIA, "--cached-media",
    help="Encoded images and audio clips kept for a conversation's later turns, by content (0: none).",
)  # fmt: skip


class PortInUseError(LyraError):
    """The port is taken by another program."""


def serve(
    host: str = HostOption,
    port: int = PortOption,
    api_key: str | None = ApiKeyOption,
    max_queue: int = MaxQueueOption,
    max_request_mb: float = MaxRequestOption,
    cached_clients: int = CachedClientsOption,
    stream_interval_ms: float = StreamIntervalOption,
    no_voice: bool = typer.Option(False, "--no-voice", help="Do not load the speech generator and vocoder."),
    max_media_mb: float = MaxMediaOption,
    max_audio_s: float = MaxAudioOption,
    max_image_pixels: int = typer.Option(media.DEFAULT_MAX_IMAGE_PIXELS, "--max-image-pixels", help="Largest image."),
    max_video_s: float = typer.Option(media.DEFAULT_MAX_VIDEO_S, "--max-video-s", help="Longest video, in seconds."),
    max_video_frames: int = MaxFramesOption,
    cached_media: int = CachedMediaOption,
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Neither read nor write the speech-token cache for long recordings."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No header on stderr (the URL still prints)."),
    chunk_units: int = speech_io.ChunkUnitsOption,
    vocoder: Path | None = speech_io.VocoderOption,
    ctc_aligned: bool = speech_io.CtcAlignedOption,
    model: str = common.ModelOption,
    vision_tower: Path | None = common.VisionTowerOption,
    speech_tower: Path | None = common.SpeechTowerOption,
    device: str = common.DeviceOption,
    dtype: str = common.DtypeOption,
    load_8bit: bool = common.Load8bitOption,
    load_4bit: bool = common.Load4bitOption,
    device_map: str = common.DeviceMapOption,
    max_memory: str | None = common.MaxMemoryOption,
) -> None:
    """Serve Lyra over an OpenAI-compatible HTTP API."""
    from lyra_cli.engine import resolve_model

    settings = ServerSettings.checked(host, port, api_key, max_queue, max_request_mb, cached_clients, stream_interval_ms)
    require_server_packages()
    limits = media_limits(max_media_mb, max_audio_s, max_image_pixels, max_video_s, max_video_frames)
    if cached_media < 0:
        raise UsageError(f"bad --cached-media value `{cached_media}`", "--cached-media must be ≥ 0 (0: no cache)")
    cache_dir = speech_cache_dir(no_cache)
    request = common.runtime_request(device, dtype, load_8bit, load_4bit, device_map, max_memory)
    overrides = common.tower_overrides(vision_tower, speech_tower, vocoder)
    if chunk_units < 1:
        raise UsageError(f"--chunk-units must be ≥ 1, got `{chunk_units}`", "the authors use 40")
    sock = bind(settings.host, settings.port)  # a busy port fails before the model loads
    try:
        model_dir = resolve_model(model)
        engine = _load(model, model_dir, request, overrides, quiet)
        voice_note = _load_voice(engine, vocoder, chunk_units, ctc_aligned, no_voice)
        served = ServedModel(model_id(model, model_dir), limits, cache_dir, voice_note, cached_media)
        _run(engine, settings, sock, served, quiet)
    finally:
        sock.close()


@dataclass(frozen=True)
class ServerSettings:
    host: str
    port: int
    api_key: str | None
    max_queue: int
    max_request_bytes: int
    cached_clients: int
    stream_interval_ms: float = worker.DEFAULT_STREAM_INTERVAL_MS

    @classmethod
    def checked(cls, host: str, port: int, api_key: str | None, max_queue: int, max_request_mb: float,
                cached_clients: int, stream_interval_ms: float = worker.DEFAULT_STREAM_INTERVAL_MS) -> "ServerSettings":  # fmt: skip
        api_key = api_key or None  # an empty $LYRA_API_KEY is no key
        if not is_loopback(host) and api_key is None:
            raise UsageError(
                f"--host `{host}` is reachable from other machines, and no API key is set",
                f"give --api-key KEY (or set ${API_KEY_ENV}), or keep the default --host {DEFAULT_HOST}",
            )
        checks = [(0 <= port <= 65535, "--port", port, "0..65535"),
                  (max_queue >= 1, "--max-queue", max_queue, "≥ 1"),
                  (max_request_mb > 0, "--max-request-mb", max_request_mb, "> 0"),
                  (cached_clients >= 0, "--cached-clients", cached_clients, "≥ 0"),
                  (stream_interval_ms >= 0, "--stream-interval-ms", stream_interval_ms, "≥ 0 (0: every token)")]  # fmt: skip
        for ok, flag, value, rule in checks:
            if not ok:
                raise UsageError(f"bad {flag} value `{value}`", f"{flag} must be {rule}")
        return cls(host, port, api_key, max_queue, int(max_request_mb * protocol.MB), cached_clients, stream_interval_ms)


def require_server_packages() -> None:
    import importlib.util

    from lyra_cli.errors import MissingDependencyError

    for package in ("fastapi", "uvicorn", "multipart"):
        if importlib.util.find_spec(package) is None:
            name = "python-multipart" if package == "multipart" else package
            raise MissingDependencyError(name, "`lyra serve`", extra="serve")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a busy port is a clear error (uvicorn serves on it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets that say they are TCP;
    # with it on, a response's second write waits for the client's delayed ACK (40 ms per keep-alive request)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(f"port `{port}` on `{host}` is already in use",
                                 "another program (or `lyra serve`) listens there: pick another --port") from None
        raise UsageError(f"cannot listen on `{host}:{port}`: {exc.strerror or exc}",
                         "check --host and --port") from None
    sock.listen(LISTEN_BACKLOG)  # from now on connections wait in the backlog until uvicorn accepts them
    return sock


def model_id(spec: str, model_dir: Path) -> str:
    """The name `/v1/models` lists: `tiny`, or the model folder's name."""
    return TINY if spec == TINY else model_dir.name


def _load(spec: str, model_dir: Path, request, overrides, quiet: bool) -> "Engine":  # noqa: ANN001
    from lyra_cli.console import info
    from lyra_cli.engine import Engine
    from lyra_cli.engine.model.runtime import resolve_runtime

    engine = Engine.load(model_dir, resolve_runtime(request), overrides)
    if not quiet:
        for line in common.header_lines(engine.loaded, spec):
            info(line)
    return engine


def _load_voice(engine: "Engine", vocoder: Path | None, chunk_units: int, aligned: bool, off: bool) -> str:
    """Speech out when the model has a speech generator and a vocoder is found; what the header says."""
    if off:
        return "speech out: off (--no-voice)"
    try:
        engine.voice = speech_io.load_voice_for(engine.loaded, vocoder, chunk_units, aligned)
    except LyraError as exc:
        if vocoder is not None:  # asked for by name: its failure is the user's to fix
            raise
        return f"speech out: off ({exc.message})"
    return f"speech out: on ({engine.voice.sample_rate_hz} Hz vocoder, {chunk_units} units per chunk)"


@dataclass(frozen=True)
class ServedModel:
    """What the server says and checks about the model it serves."""

    name: str
    limits: media.MediaLimits
    speech_cache_dir: Path | None
    voice_note: str
    cached_media: int = media_cache.DEFAULT_CACHED_MEDIA  # encoded media parts kept for later turns


def media_limits(max_media_mb: float, max_audio_s: float, max_image_pixels: int, max_video_s: float,
                 max_video_frames: int) -> media.MediaLimits:  # fmt: skip
    checks = [(max_media_mb > 0, "--max-media-mb", max_media_mb), (max_audio_s > 0, "--max-audio-s", max_audio_s),
              (max_image_pixels > 0, "--max-image-pixels", max_image_pixels),
              (max_video_s > 0, "--max-video-s", max_video_s),
              (max_video_frames > 0, "--max-video-frames", max_video_frames)]  # fmt: skip
    for ok, flag, value in checks:
        if not ok:
            raise UsageError(f"bad {flag} value `{value}`", f"{flag} must be > 0")
    return media.MediaLimits(int(max_media_mb * media.MIB), max_audio_s, max_image_pixels, max_video_s,
                             max_video_frames)


def speech_cache_dir(no_cache: bool) -> Path | None:
    """Where long recordings' speech tokens are cached (`lyra longspeech`'s cache), checked writable."""
    if no_cache:
        return None
    from lyra_cli.engine.run.speech_cache import default_cache_dir
    from lyra_cli.fileio import CACHE_DIR_ENV
    from lyra_cli.outputs import check_cache_dir

    root = default_cache_dir()
    check_cache_dir(root, env=CACHE_DIR_ENV, can_do_without="--no-cache")
    return root


def _run(engine: "Engine", settings: ServerSettings, sock: socket.socket, served: ServedModel,
         quiet: bool) -> None:  # fmt: skip
    import logging

    import uvicorn

    from lyra_cli.console import info
    from lyra_cli.serve.app import ServeConfig, create_app

    name = served.name
    config = ServeConfig(model_id=name, api_key=settings.api_key, max_request_bytes=settings.max_request_bytes,
                         max_queue=settings.max_queue, cached_clients=settings.cached_clients,
                         stream_interval_ms=settings.stream_interval_ms,
                         media_limits=served.limits, speech_cache_dir=served.speech_cache_dir,
                         cached_media=served.cached_media)  # fmt: skip
    app = create_app(engine, config)
    service = app.state.service
    verbose = logging.getLogger().level <= logging.INFO
    server = _server(uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose,
                                    timeout_graceful_shutdown=SHUTDOWN_GRACE_S, lifespan="off"),
                     on_exit=service.worker.cancel_all)  # fmt: skip
    if not quiet:
        info(served.voice_note)
        info(f"model id `{name}` · at most {settings.max_queue} waiting requests · "
             f"API key {'required' if settings.api_key else 'off (loopback only)'}")  # fmt: skip
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    # on stdout, even with -q: the address is this command's output (with --port 0, the only way to learn it)
    typer.echo(f"lyra serve: http://{shown}:{port} (OpenAI API at /v1, web page at /) · Ctrl-C stops")
    try:
        server.run(sockets=[sock])
    finally:
        service.worker.stop()
    if server.interrupted:  # uvicorn re-raises Ctrl-C itself, unless SIGINT was ignored when it started
        raise KeyboardInterrupt


def _server(config, on_exit):  # noqa: ANN001, ANN202
    """uvicorn's server, cancelling the answers under way when asked to stop (defined here: uvicorn is
    imported only when a server starts)."""
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server that also cancels the answers under way when asked to stop (Ctrl-C): streamed
        answers end at their next step, so connections close within the grace period."""

        def __init__(self, config: uvicorn.Config, on_exit) -> None:  # noqa: ANN001
            super().__init__(config)
            self._on_exit = on_exit
            self.interrupted = False

        def handle_exit(self, sig: int, frame) -> None:  # noqa: ANN001
            self.interrupted = self.interrupted or sig == signal.SIGINT
            self._on_exit()
            super().handle_exit(sig, frame)

    return Server(config, on_exit)
