"""Cursor pagination over an owner's index (a sorted set scored by creation time), newest first."""
from __future__ import annotations

from typing import Optional

import redis


def newest_first(client: redis.Redis, index: str, limit: int, after: Optional[str]) -> tuple[list[str], bool]:
    """Up to `limit` ids older than `after` (an id from the previous page); and whether more remain."""
    top = "+inf"
    if after is not None:
        score = client.zscore(index, after)
        if score is None:
            return [], False
        top = f"({score}"
    ids = client.zrevrangebyscore(index, top, "-inf", start=0, num=limit + 1)
    return ids[:limit], len(ids) > limit
