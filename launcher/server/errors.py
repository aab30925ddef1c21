"""OpenAI-shaped errors: one exception type, the JSON envelope, and a Sanic handler that uses it for everything."""
from __future__ import annotations

import logging

import orjson
from sanic import HTTPResponse
from sanic.exceptions import SanicException
from sanic.handlers import ErrorHandler
from sanic.request import Request

log = logging.getLogger("llm.server")


class APIError(Exception):
    """An error the client sees as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> HTTPResponse:
        return HTTPResponse(orjson.dumps(self.body()), status=self.status, headers=self.headers,
                            content_type="application/json")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def model_not_found(name: object) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", "invalid_request_error", "model", "model_not_found")


def not_ready(phase: str) -> APIError:
    return APIError(503, f"the model is not ready yet (startup phase: {phase})", "service_unavailable_error",
                    None, "model_not_ready", {"Retry-After": "1"})


# Sanic's own HTTP errors (routing, body size, bad framing), as OpenAI types and codes.
_SANIC_ERRORS = {
    400: ("invalid_request_error", None),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    503: ("service_unavailable_error", "service_unavailable"),
}


class OpenAIErrorHandler(ErrorHandler):
    """Every error leaves in OpenAI's envelope: our APIErrors, Sanic's routing/size errors, and bugs (500)."""

    def default(self, request: Request, exception: Exception) -> HTTPResponse:
        if isinstance(exception, APIError):
            return exception.response()
        if isinstance(exception, SanicException):
            status = exception.status_code or 500
            kind, code = _SANIC_ERRORS.get(status, ("invalid_request_error" if status < 500 else "server_error",
                                                    None))
            message = str(exception) or "request failed"
            if status == 404:
                message = f"{request.method} {request.path}: no such route"
            elif status == 405:
                message = f"method {request.method} is not allowed on {request.path}"
            headers = dict(getattr(exception, "headers", None) or {})
            return APIError(status, message, kind, None, code, headers).response()
        log.error("unhandled error on %s %s", request.method if request else "?", request.path if request else "?",
                  exc_info=exception)
        return APIError(500, f"internal server error: {type(exception).__name__}", "server_error", None,
                        "internal_error").response()
