"""What routing a batch's lines to one worker could save: a batch whose lines share a system prompt, on W workers
(one stack, the tiny model), and the prompt tokens the workers prefilled (prefix-cache queries - hits, from
/metrics). Each worker computes the shared prefix once; routing could save that for every worker past the first.

    python -m scripts.batch_prefix_hits [--workers 2] [--lines 64] [--prefix-len 1024]
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

from scripts.bench.shared_prefix import prefix_counts
from scripts.bench.workloads import text_prompts
from scripts.stack import Stack, stack_env, wait_until

MODEL = "mistralai/mistral-7b-instruct-v0.2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lines", type=int, default=64)
    parser.add_argument("--prefix-len", type=int, default=1024)
    args = parser.parse_args()

    stack = Stack(stack_env(api_keys=("key",), MAX_NUM_SEQS="16"), Path(tempfile.mkdtemp(prefix="batch-prefix-")))
    for index in range(args.workers):
        stack.start_worker(name=f"worker{index}", concurrency=16, extra_env={"TORCH_THREADS": "1"})
    stack.start_api()
    with stack.serving(timeout=180):
        client = stack.sdk("key", timeout=600)
        system = text_prompts(1, args.prefix_len)[0]
        lines = "\n".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                                      "body": {"model": MODEL, "max_tokens": 8, "temperature": 0, "messages": [
                                          {"role": "system", "content": system},
                                          {"role": "user", "content": f"Line {i}: what now?"}]}})
                          for i in range(args.lines))
        before = prefix_counts(stack.base_url)
        upload = client.files.create(file=("lines.jsonl", io.BytesIO(lines.encode())), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        started = time.time()
        done = wait_until(lambda: (b := client.batches.retrieve(batch.id)).status in ("completed", "failed") and b,
                          900, "the batch", interval=1)
        seconds = time.time() - started
        after = prefix_counts(stack.base_url)
        hits, queries = after[0] - before[0], after[1] - before[1]
        print(json.dumps(dict(workers=args.workers, lines=args.lines, status=done.status,
                              completed=done.request_counts.completed, seconds=round(seconds, 1),
                              prompt_tokens=queries, hit_tokens=hits, prefilled_tokens=queries - hits,
                              hit_rate=round(hits / queries, 3) if queries else None)))


if __name__ == "__main__":
    main()
