"""Owners' listings (files, batches) page newest first with `after` = the last id of the previous page. Their
records carry OpenAI's whole-second `created_at`; their indexes must order by something finer, or every object
but one created in the same second as a page's last is skipped by the next page."""
from __future__ import annotations

import io

from jobs.batches import BatchStore
from jobs.files import FileStore


def pages(list_ids, owner: str) -> list[str]:
    seen, after = [], None
    while True:
        ids, more = list_ids(owner, 1, after)
        seen += ids
        if not more:
            return seen
        after = ids[-1]


def test_files_made_in_one_second_are_all_listed_page_by_page(redis_client, prefix):
    files = FileStore(redis_client, prefix)
    made = [files.save_stream(io.BytesIO(b'{"a": 1}\n'), f"f{i}.jsonl", "batch", "o").id for i in range(5)]
    assert pages(files.list_ids, "o") == made[::-1]


def test_batches_made_in_one_second_are_all_listed_page_by_page(redis_client, prefix):
    files, batches = FileStore(redis_client, prefix), BatchStore(redis_client, prefix)
    source = files.save_stream(io.BytesIO(b'{"a": 1}\n'), "in.jsonl", "batch", "o").id
    made = [batches.create("o", source, "/v1/chat/completions", "24h", None)["id"] for _ in range(5)]
    assert pages(batches.list_ids, "o") == made[::-1]
