"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

Every failure a request can cause becomes an `ApiError`; a `LyraError` from the engine keeps its message
(the same words as the command line) with its settings named as the request's fields. Nothing else ever
reaches a response body: an unexpected exception is a 500 with a fixed message, never a traceback."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lyra_cli.errors import LyraError

# the `type` OpenAI gives each status
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}

# engine settings (see `lyra_cli.errors.setting`) as the request names them
REQUEST_FIELDS = {
    "max_new_tokens": "max_tokens",
    "logprobs": "top_logprobs",
    "speech": "input_audio",
    "image": "image_url",
    "video": "video_url",
    "text": "messages",
    "extract": "lyra.extract",
    "official_audio": "lyra.official_audio",
}


class ApiError(Exception):
    """A failed request: HTTP `status` and OpenAI's error object; `headers` go on the response
    (`Retry-After` on 503, `WWW-Authenticate` on 401)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def field_name(setting: str) -> str:
    """An engine setting as the request names it (`max_new_tokens` -> `max_tokens`)."""
    return REQUEST_FIELDS.get(setting, setting)


def from_lyra_error(error: LyraError, *, status: int = 400, param: str | None = None) -> ApiError:
    """The engine's message and hint in one line, settings named as request fields; `param` defaults to
    the setting at fault."""
    message, hint = error.render(field_name)
    text = f"{message} ({hint})" if hint else message
    at_fault = param if param is not None else (field_name(error.setting) if error.setting else None)
    return ApiError(status, text, param=at_fault, code=type(error).__name__)


INTERNAL_ERROR = ApiError(500, "the server failed while answering; its log has the details", code="internal_error")
