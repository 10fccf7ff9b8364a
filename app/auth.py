"""Bearer-token auth: on when API_KEYS is set. Keys are compared in constant time."""
from __future__ import annotations

import hashlib
import hmac

from flask import request

from app.errors import APIError


ANONYMOUS = "anonymous"


def owner_of(key: str) -> str:
    """What jobs, files and batches are filed under: a fingerprint of the key, never the key itself."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:24]


def check_bearer(api_keys: list[str]) -> str:
    """Checks the request's key; returns the owner its jobs belong to."""
    if not api_keys:
        return ANONYMOUS
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "You didn't provide an API key. Send it as a Bearer token in the Authorization "
                            "header (Authorization: Bearer YOUR_KEY).", code="invalid_api_key")
    token = token.strip().encode()
    # Compare against every key, so the time taken does not depend on which key (if any) matched.
    matched = False
    for key in api_keys:
        matched |= hmac.compare_digest(token, key.encode())
    if not matched:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return owner_of(token.decode())
