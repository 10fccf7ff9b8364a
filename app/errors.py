"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with the right HTTP status."""
from __future__ import annotations

import logging
from typing import Optional

import redis
from flask import Flask, jsonify
from kombu.exceptions import OperationalError as BrokerError
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
               415: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
               504: "timeout"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None, headers: Optional[dict] = None, **extra):
        super().__init__(message)
        self.status = status
        self.body = {"message": message, "type": type or ERROR_TYPES.get(status, "server_error"),
                     "param": param, "code": code, **extra}
        self.headers = headers or {}

    def response(self):
        resp = jsonify({"error": self.body})
        resp.status_code = self.status
        resp.headers.update(self.headers)
        if self.status in (500, 504):  # the SDK retries 5xx: don't let it run a failed generation again
            resp.headers.setdefault("x-should-retry", "false")
        return resp


def from_validation_error(exc: ValidationError) -> APIError:
    """The first problem pydantic found, with the offending field as `param` (e.g. messages[0].role)."""
    first = exc.errors()[0]
    param = ""
    for part in first["loc"]:
        if isinstance(part, str) and _is_union_tag(part):  # e.g. ("stop", "str"): the field is "stop"
            continue
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif first["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        message = f"Invalid value for '{param}': {message}."
    return APIError(400, message, param=param or None, code="invalid_value" if first["type"] != "missing"
                    else "missing_required_parameter")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_union_tag(part: str) -> bool:
    """pydantic names the union member it tried inside `loc`: `str`, `list[str]`, `function-after[...]`."""
    return part in _TYPE_TAGS or "[" in part or part[:1].isupper()


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(APIError)
    def _api_error(exc: APIError):
        return exc.response()

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.code)
        return APIError(exc.code or 500, exc.description or exc.name, code=code).response()

    @app.errorhandler(redis.ConnectionError)
    @app.errorhandler(redis.TimeoutError)
    @app.errorhandler(BrokerError)
    def _queue_unavailable(exc: Exception):
        log.warning("queue unavailable: %s", exc)
        return APIError(503, "The job queue is unavailable; retry shortly.", code="queue_unavailable",
                        headers={"Retry-After": "5"}).response()

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error")
        return APIError(500, "The server had an error while processing your request.",
                        code="internal_error").response()
