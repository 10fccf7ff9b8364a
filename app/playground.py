"""The playground: a small browser page at `/` to chat with the API (streamed) and list a key's background
jobs and batches. Plain HTML/JS/CSS from app/static/playground (served under /playground/static/), no build
step and nothing loaded from elsewhere. Loading the page needs no key: the user types one in, and the page
sends it to the API as a Bearer token."""
from __future__ import annotations

from flask import Blueprint, send_from_directory

playground = Blueprint("playground", __name__, static_folder="static/playground",
                       static_url_path="/playground/static")

# Everything the page uses comes from this origin; `data:` only for the empty favicon.
CSP = ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@playground.get("/")
def index():
    response = send_from_directory(playground.static_folder, "index.html", max_age=0)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
