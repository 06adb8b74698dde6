"""The FastAPI application: routes, the API key and body-size guard, and errors in OpenAI's shape.

    app = create_app(engine, ServeConfig(model_id="tiny"))   # one worker thread owns the engine
    uvicorn.Server(uvicorn.Config(app)).run()

Routes: `GET /` (the web page), `GET /health`, `GET /v1/models`, `POST /v1/chat/completions`,
`POST /v1/audio/transcriptions`. Everything under `/v1/` needs the API key when one is set; the page and
`/health` do not (a browser cannot send a header to load a page; the page asks for the key itself)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from lyra_cli.serve import chat, internals, protocol
from lyra_cli.serve.errors import INTERNAL_ERROR, ApiError
from lyra_cli.serve.media import MediaLimits
from lyra_cli.serve.media_cache import DEFAULT_CACHED_MEDIA, MediaCache
from lyra_cli.serve.speech import AudioStore
from lyra_cli.serve.worker import DEFAULT_CACHED_CLIENTS, DEFAULT_MAX_QUEUE, DEFAULT_STREAM_INTERVAL_MS, Job, Worker

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from lyra_cli.engine import Engine

log = logging.getLogger(__name__)

API_PREFIX = "/v1/"
PAGE = ("static", "index.html")  # inside this package
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may hold the stream back


@dataclass(frozen=True)
class ServeConfig:
    model_id: str  # what `/v1/models` lists and every response names
    api_key: str | None = None  # None: no key asked for (loopback only; the command enforces it)
    max_request_bytes: int = protocol.DEFAULT_MAX_REQUEST_MB * protocol.MB
    max_queue: int = DEFAULT_MAX_QUEUE
    cached_clients: int = DEFAULT_CACHED_CLIENTS
    stream_interval_ms: float = DEFAULT_STREAM_INTERVAL_MS  # streamed text wakes the event loop at most this often
    media_limits: MediaLimits = MediaLimits()
    speech_cache_dir: Path | None = None  # long recordings' speech tokens are cached here (None: not cached)
    cached_media: int = DEFAULT_CACHED_MEDIA  # encoded images and clips kept for later turns (0: none)


class Service:
    """What the routes share: the engine (used only on the worker's thread), its worker and the settings."""

    def __init__(self, engine: "Engine", config: ServeConfig) -> None:
        self.engine = engine
        self.config = config
        self.worker = Worker(engine, config.max_queue, config.cached_clients, config.stream_interval_ms)
        self.audio_store = AudioStore()  # spoken answers a later request may name by id
        self.speech_cache = internals.speech_cache(config.speech_cache_dir)
        self.media_cache = MediaCache(config.cached_media) if config.cached_media > 0 else None
        self.created = int(time.time())

    def model_card(self) -> dict[str, Any]:
        return {"id": self.config.model_id, "object": "model", "created": self.created, "owned_by": "lyra"}


def create_app(engine: "Engine", config: ServeConfig) -> FastAPI:
    service = Service(engine, config)
    app = FastAPI(title="lyra", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_request_bytes)
    _add_error_handlers(app)
    _add_routes(app, service)
    return app


# -- guard: API key and body size, before any route reads the body ---------------------------------


class Guard:
    """Checks the Bearer key of `/v1/` requests (constant-time) and caps the request body: a declared
    `Content-Length` over the limit is refused before anything is read, and a body that grows past it while
    being read fails its route with a 413 (chunked uploads declare no length)."""

    def __init__(self, app: "ASGIApp", api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: "Scope", receive: "Receive", send: "Send") -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope["path"], headers)
        if refusal is not None:
            return await error_response(refusal)(scope, receive, send)
        await self.app(scope, self._capped(receive), send)

    def _refusal(self, path: str, headers: dict[str, str]) -> ApiError | None:
        if self.api_key is not None and path.startswith(API_PREFIX) and not self._authorized(headers):
            return ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                            code="invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="lyra"'})  # fmt: skip
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return self._too_large()
        return None

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        return hmac.compare_digest(given, self.api_key.encode())  # type: ignore[union-attr]

    def _too_large(self) -> ApiError:
        limit_mb = self.max_body_bytes / protocol.MB
        return ApiError(413, f"the request body is larger than the server's limit of {limit_mb:g} MB",
                        code="request_too_large")  # fmt: skip

    def _capped(self, receive: "Receive") -> "Receive":
        seen = 0

        async def capped() -> "Message":
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise self._too_large()
            return message

        return capped


# -- errors -----------------------------------------------------------------------------------------


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(_request: Request, exc: Exception) -> Response:
        return error_response(exc)  # type: ignore[arg-type]

    async def http_error(_request: Request, exc: Exception) -> Response:
        status = exc.status_code  # type: ignore[attr-defined]
        message = "no such route" if status == 404 else str(exc.detail)  # type: ignore[attr-defined]
        return error_response(ApiError(status, message))

    async def validation_error(_request: Request, exc: Exception) -> Response:
        first = exc.errors()[0] if exc.errors() else {}  # type: ignore[attr-defined]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(ApiError(400, first.get("msg", "invalid request"), param=param))

    async def unexpected(_request: Request, exc: Exception) -> Response:
        log.error("a request failed", exc_info=exc)
        return error_response(INTERNAL_ERROR)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)


# -- routes -----------------------------------------------------------------------------------------


def _add_routes(app: FastAPI, service: Service) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        resource = resources.files("lyra_cli.serve").joinpath(*PAGE)
        if not resource.is_file():
            raise ApiError(404, "this installation has no web page (lyra_cli/serve/static/index.html)")
        return HTMLResponse(resource.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        worker = service.worker
        cache = service.media_cache.stats() if service.media_cache is not None else MediaCache(0).stats()
        return {"status": "ok", "model": service.config.model_id, "queued": worker.queued, "busy": worker.busy,
                "max_queue": worker.max_queue, "media_cache": cache}  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != service.config.model_id:
            raise ApiError(404, f"no model `{model_id}`: this server serves `{service.config.model_id}`",
                           param="model", code="model_not_found")  # fmt: skip
        return service.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        parsed = protocol.parse_chat(await read_json(request))
        spec = await run_in_threadpool(chat_job, service, parsed)  # media decoding stays off the event loop
        try:
            job = service.worker.submit(Job(spec, client_key(request, parsed, service), asyncio.get_running_loop()))
        except ApiError:
            spec.close()
            raise
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        answer = chat.Answer(parsed, spoken_answer(service, parsed))
        try:
            if not parsed.stream:
                return JSONResponse(await chat.complete(job, answer, service.config.model_id))
            first, batches = await chat.first_event(job)
        except BaseException:
            watcher.cancel()
            job.cancel()
            raise
        body = _watched(chat.stream(job, answer, service.config.model_id, first, batches), watcher)
        return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        upload = await read_upload(request)
        decoded = await run_in_threadpool(_decode_upload, service, upload)
        work = TranscriptionJob(decoded, upload.temperature, service.speech_cache)
        try:
            job = service.worker.submit(Job(work, None, asyncio.get_running_loop()))  # keeps no prefix cache
        except ApiError:
            work.close()
            raise
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        try:
            (result,) = [event async for event in chat.job_events(job)]
        finally:
            watcher.cancel()
        from lyra_cli.serve.transcribe import response_body

        body = response_body(result, upload.response_format, language=upload.language)
        return PlainTextResponse(body) if isinstance(body, str) else JSONResponse(body)


async def _watched(body: Any, watcher: asyncio.Task) -> Any:
    try:
        async for piece in body:
            yield piece
    finally:
        watcher.cancel()
        await body.aclose()


async def read_json(request: Request) -> Any:
    """The body as JSON (its size is capped by `Guard` while it is read)."""
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


async def cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel `job` when its client goes away (the body is read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


def client_key(request: Request, parsed: protocol.ChatRequest, service: Service) -> str:
    """Whose prefix cache a request continues: its `user`, else its API key, else its address."""
    if parsed.user:
        return f"user:{parsed.user}"
    auth = request.headers.get("authorization")
    if service.config.api_key is not None and auth:
        return "key:" + hashlib.sha256(auth.encode()).hexdigest()[:16]
    return f"addr:{request.client.host if request.client else '?'}"


def chat_job(service: Service, parsed: protocol.ChatRequest) -> chat.ChatJob:
    """Everything checked and decoded before the request waits in the queue."""
    from lyra_cli.errors import LyraError
    from lyra_cli.serve.errors import from_lyra_error

    engine = service.engine
    try:
        extractor = internals.extractor(engine, parsed.lyra.get("extract"))
    except LyraError as exc:
        raise from_lyra_error(exc, param="lyra.extract") from None
    sampling = chat.sampling_for(engine, parsed)
    voice = _voice(service, parsed)
    history, question = chat.decode_turns(parsed, service.config.media_limits, service.audio_store,
                                          service.media_cache)  # fmt: skip
    return chat.ChatJob(system=parsed.system, history=history, question=question, sampling=sampling,
                        extractor=extractor, extracting=internals.extracting(engine, extractor), voice=voice,
                        speech_cache=service.speech_cache, media_cache=service.media_cache)  # fmt: skip


def _voice(service: Service, parsed: protocol.ChatRequest) -> Any:
    """The engine's voice when the request asks for a spoken answer (its `audio` checked)."""
    from lyra_cli.serve.speech import AudioRequest

    if parsed.audio is None:
        return None
    AudioRequest.from_request(parsed.audio, stream=parsed.stream)
    if service.engine.voice is None:
        raise ApiError(400, "this server gives no spoken answers: its model has no speech generator, or it was "
                            "started with `--no-voice`; ask for `modalities: [\"text\"]`",
                       param="modalities")  # fmt: skip
    return service.engine.voice


def spoken_answer(service: Service, parsed: protocol.ChatRequest) -> Any:
    from lyra_cli.serve.speech import AudioRequest, SpokenAnswer

    if parsed.audio is None:
        return None
    return SpokenAnswer(service.audio_store, AudioRequest.from_request(parsed.audio, stream=parsed.stream).format)


# -- transcriptions ---------------------------------------------------------------------------------

# OpenAI's transcription fields lyra cannot honour: refused rather than ignored
UNSUPPORTED_UPLOAD_FIELDS = ("prompt", "timestamp_granularities[]", "timestamp_granularities", "stream", "include[]",
                             "chunking_strategy")  # fmt: skip
UPLOAD_FIELDS = ("file", "model", "response_format", "language", "temperature")


@dataclass(frozen=True)
class Upload:
    data: bytes
    filename: str | None
    response_format: str
    language: str | None
    temperature: float | None


async def read_upload(request: Request) -> Upload:
    """The multipart form of `/v1/audio/transcriptions`, checked (its size is capped by `Guard`)."""
    from lyra_cli.serve.transcribe import check_response_format

    form = await request.form()
    for name in form:
        if name not in UPLOAD_FIELDS:
            why = "not supported by lyra" if name in UNSUPPORTED_UPLOAD_FIELDS else "unknown"
            raise ApiError(400, f"parameter `{name}` is {why}", param=name, code="unsupported_parameter")
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "`file` must be an uploaded audio file (multipart/form-data)", param="file")
    if not isinstance(form.get("model"), str):
        raise ApiError(400, "`model` is required", param="model")
    return Upload(await upload.read(), upload.filename, check_response_format(form.get("response_format")),
                  _form_text(form.get("language"), "language"), _temperature(form.get("temperature")))  # fmt: skip


def _form_text(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ApiError(400, f"`{name}` must be text", param=name)
    return value or None


def _temperature(value: Any) -> float | None:
    text = _form_text(value, "temperature")
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise ApiError(400, f"`temperature` must be a number, got `{text}`", param="temperature") from None


def _decode_upload(service: Service, upload: Upload) -> Any:
    from lyra_cli.serve.transcribe import decode_upload

    return decode_upload(upload.data, upload.filename, service.config.media_limits)


class TranscriptionJob:
    """The worker's side of a transcription: one event, the `Transcription`; `close` removes the upload."""

    def __init__(self, decoded: Any, temperature: float | None, cache: Any) -> None:
        self.decoded = decoded
        self.temperature = temperature
        self.cache = cache

    def __call__(self, engine: "Engine", check: Any) -> Any:
        from lyra_cli.serve.transcribe import transcribe

        check()
        yield transcribe(engine, self.decoded, temperature=self.temperature, cache=self.cache)

    def close(self) -> None:
        self.decoded.close()
