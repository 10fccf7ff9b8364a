"""Shared fixtures. Integration tests run the real stack: a Redis server, a Celery worker process holding
the tiny model, and the Flask app under gunicorn (gevent) over HTTP, driven with the official openai SDK.

Each test session uses its own key prefix and queue names, so it never sees another run's jobs.
"""
from __future__ import annotations

import os
import shutil

# Triton kernels run on CPU tensors under Triton's interpreter (tests/unit/test_paged_attention.py). Triton
# reads this when it is first imported, and bitsandbytes imports it early (at collection), so it is set here,
# before anything: on a machine without an NVIDIA GPU only.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import redis  # noqa: E402

from scripts.stack import DEFAULT_REDIS_URL as REDIS_URL
from scripts.stack import Stack, free_port, stack_env, wait_until  # noqa: F401  (tests import these)

API_KEYS = ["test-key-1", "test-key-2"]
TEST_MAX_MODEL_LEN = 4096


@pytest.fixture(scope="session")
def redis_client():
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.exit(f"no Redis at {REDIS_URL}: run the tests with `make test`, which starts one", returncode=3)
    return client


@pytest.fixture(scope="session")
def stack(redis_client, tmp_path_factory):
    """One API and one worker for the whole session."""
    s = Stack(stack_env(api_keys=tuple(API_KEYS), max_model_len=TEST_MAX_MODEL_LEN),
              tmp_path_factory.mktemp("stack-logs"))
    s.start_worker()
    s.start_api()
    with s.serving():
        yield s


@pytest.fixture(scope="session")
def client(stack):
    return stack.sdk(API_KEYS[0])



@pytest.fixture(scope="session")
def terminal_report(request):
    """Write lines to pytest's terminal even when output is captured: the figures a test measured (chaos,
    fuzzing) belong in `make test`'s output, pass or fail."""
    def write(lines: list[str]) -> None:
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if reporter is None or capture is None:
            print("\n".join(lines))
            return
        with capture.global_and_fixture_disabled():
            for line in lines:
                reporter.write_line(line)
    return write
