"""Headless Chromium for the browser tests, driven by Playwright for Python.

Playwright's own browser download is not used (no internet): the tests launch the system's Chromium
(Debian's `chromium` package, /usr/bin/chromium, or CHROMIUM_PATH). Where Playwright or Chromium is
missing or does not start, the tests are skipped, unless REQUIRE_BROWSER is set (CI sets it), in which
case they fail.
"""
from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _browser_required() -> bool:
    return os.environ.get("REQUIRE_BROWSER", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(reason: str):
    if _browser_required():
        pytest.fail(f"REQUIRE_BROWSER is set, but {reason}", pytrace=False)
    pytest.skip(f"{reason} (set REQUIRE_BROWSER=1 to make this a failure)")


def _chromium_path() -> str | None:
    for candidate in (os.environ.get("CHROMIUM_PATH"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    """Module-scoped: Playwright's sync API keeps an asyncio loop running in this thread until it stops, and
    later tests (asyncio.run) need that loop gone."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright for Python is not installed (pip install playwright)")
    executable = _chromium_path()
    if executable is None:
        _unavailable("no Chromium found at /usr/bin/chromium or on PATH (apt-get install -y chromium)")
    playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, timeout=60_000)
    except Exception as exc:
        playwright.stop()
        _unavailable(f"Chromium at {executable} did not start: {str(exc).splitlines()[0]}")
    try:
        yield browser
    finally:
        browser.close()
        playwright.stop()


@pytest.fixture
def page(browser, stack):
    """A fresh page (own context, so empty localStorage) on the stack's API; uncaught JS errors are kept
    in `page.js_errors` for the test to check."""
    context = browser.new_context(base_url=stack.base_url, viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.js_errors = []
    page.on("pageerror", lambda exc: page.js_errors.append(str(exc)))
    page.on("console", lambda msg: "Content Security Policy" in msg.text and page.js_errors.append(msg.text))
    try:
        yield page
    finally:
        context.close()
