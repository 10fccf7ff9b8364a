"""Structured logs: one JSON object per line, from the API and the workers alike.

    {"timestamp": "2025-01-01T12:00:00.123Z", "level": "INFO", "logger": "workers", "message": "...",
     "service": "worker", "pid": 1234, "job_id": "chatcmpl-..."}

`job_id` is present on every line logged while a job is bound to the current context (`job_context(...)`
or `bind_job(...)`), absent otherwise. The binding is a contextvar, so it is per thread (each Celery pool
thread runs its own job: a new thread starts with an empty context) and per greenlet (greenlet >= 1.0 gives
every greenlet its own context, so each gevent request greenlet of the API has its own).

What never reaches a log line: API keys (the configured keys, and anything shaped like `Bearer <token>` or
`sk-...`, are masked in messages and exception text), and prompt or completion text (no code here logs it;
`extra=` fields with names such as `prompt`, `messages`, `content`, `authorization`, `api_key` are dropped).
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import logging
import os
import re
import sys
from typing import Iterable, Iterator, Optional

_job_id: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("llmq_job_id", default=None)

# Attributes every LogRecord has: anything else on a record came from `extra=` and is passed through.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime",
                                                                                     "taskName"}
# `extra=` names that could carry secrets or user text: never emitted.
SENSITIVE_FIELDS = frozenset({"api_key", "api_keys", "authorization", "headers", "token", "password", "secret",
                              "prompt", "prompt_text", "messages", "content", "text", "body", "data"})
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")
_SK_KEY = re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}")
REDACTED = "[REDACTED]"


# --- the job id of the current thread / greenlet
def bind_job(job_id: Optional[str]) -> contextvars.Token:
    """Tag every later log line of this context (thread, greenlet) with `job_id`; returns a token for
    `unbind_job`. Prefer `job_context` where there is a block to wrap."""
    return _job_id.set(job_id)


def unbind_job(token: Optional[contextvars.Token] = None) -> None:
    """Undo a `bind_job` (with its token), or clear the binding (without one)."""
    if token is not None:
        _job_id.reset(token)
    else:
        _job_id.set(None)


@contextlib.contextmanager
def job_context(job_id: Optional[str]) -> Iterator[None]:
    """`with job_context(job_id): ...`: every log line inside carries `job_id`; the previous binding is
    restored on exit (so a pool thread that runs job after job never leaks one job's id into the next)."""
    token = _job_id.set(job_id)
    try:
        yield
    finally:
        _job_id.reset(token)


def current_job_id() -> Optional[str]:
    return _job_id.get()


# --- formatting
class JsonFormatter(logging.Formatter):
    def __init__(self, service: str, secrets: Iterable[str] = ()):
        super().__init__()
        self.service = service
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
        return _SK_KEY.sub(REDACTED, text)

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the line
            message = f"{record.msg!r} % {record.args!r}"
        entry = {
            "timestamp": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)
                                     .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": self.redact(message),
            "service": self.service,
            "pid": record.process,
        }
        job_id = getattr(record, "job_id", None) or _job_id.get()
        if job_id:
            entry["job_id"] = job_id
        for key, value in vars(record).items():
            if key in _RECORD_ATTRS or key in entry or key.startswith("_") or key.lower() in SENSITIVE_FIELDS:
                continue
            entry[key] = value if isinstance(value, (int, float, bool, type(None))) else self.redact(str(value))
        if record.exc_info:
            entry["exception"] = self.redact(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exception"] = self.redact(record.exc_text)
        if record.stack_info:
            entry["stack"] = self.redact(self.formatStack(record.stack_info))
        return json.dumps(entry, ensure_ascii=False, default=str)


class _JsonHandler(logging.StreamHandler):
    """Marks the handler setup_logging installed, so a second call replaces it instead of adding one."""


def _default_stream():
    stream = sys.stderr
    # Under Celery's redirect_stdouts, sys.stderr is a proxy that logs: writing logs to it would loop.
    if type(stream).__name__ == "LoggingProxy" or stream is None:
        stream = sys.__stderr__
    return stream


def _configured_secrets() -> list[str]:
    try:
        from config.settings import get_settings
        return list(get_settings().api_keys)
    except Exception:
        return []


def setup_logging(service: str, level=None, stream=None, secrets: Optional[Iterable[str]] = None,
                  take_over_celery: bool = False) -> logging.Handler:
    """Make the root logger emit JSON lines tagged with `service` ("api", "worker", ...). Idempotent: a
    second call replaces the handler the first installed, and plain console handlers (basicConfig's) are
    removed (one line per record). `level` defaults to LOG_LEVEL (env or setting; INFO). `secrets` (default:
    the configured API keys) are masked wherever they appear. Gunicorn's own loggers of this process, if set
    up, are switched to the same handler. `take_over_celery=True` (the worker) connects Celery's
    `setup_logging` signal, so that the Celery worker keeps this configuration instead of installing its own
    text handlers (and does not redirect stdout/stderr into its logger)."""
    if level is None:
        level = os.environ.get("LOG_LEVEL") or _settings_level() or "INFO"
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            level = logging.INFO
    handler = _JsonHandler(stream if stream is not None else _default_stream())
    handler.setFormatter(JsonFormatter(service, _configured_secrets() if secrets is None else secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        # Ours from an earlier call, and plain console handlers (basicConfig's): one line per record. Other
        # handlers (a test runner's capture, a file handler someone added on purpose) stay.
        if type(old) in (_JsonHandler, logging.StreamHandler):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings.warn(...) becomes a JSON line too (logger "py.warnings")
    for name in ("gunicorn.error", "gunicorn.access"):
        logger = logging.getLogger(name)
        if logger.handlers:  # inside a gunicorn worker: its logs become JSON lines too
            logger.handlers = [handler]
    if take_over_celery:
        _connect_celery(level)
    return handler


def _settings_level() -> Optional[str]:
    try:
        from config.settings import get_settings
        return getattr(get_settings(), "log_level", None)
    except Exception:
        return None


_celery_connected = False


def _connect_celery(level: int) -> None:
    global _celery_connected
    if _celery_connected:
        return
    from celery.signals import setup_logging as celery_setup_logging

    def keep_our_logging(loglevel=None, **_):  # a receiver: Celery then leaves logging alone
        if loglevel:
            logging.getLogger().setLevel(loglevel)

    celery_setup_logging.connect(keep_our_logging, weak=False)
    _celery_connected = True
