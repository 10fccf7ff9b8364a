"""How many workers one Redis carries (issue 17's capacity model), from two measured service rows.

What the service costs Redis has two parts: per job (admission, the record, fair dispatch, Celery's message,
the start and end transitions, the relay's subscribe) and per generated token (the stream events that carry
it: lease check, XADD, PUBLISH). One row alone cannot tell them apart, so the benchmark's service mode runs
its greedy workload at the highest concurrency a second time with short outputs (`SHORT_OUTPUT_LEN` tokens),
and the two rows' Redis CPU (INFO cpu, the whole server) give both, as two equations in two unknowns:

    cpu_s = jobs * per_job + tokens * per_token

Time-based work (idle pumps, heartbeats, the reapers' sweeps: a few ms per second) is spread over both; at the
rates a GPU runs it is small beside them. One Redis runs its commands on one core, so for jobs of L output
tokens on average one shard carries

    tokens/s per shard = 1e6 / (per_token_us + per_job_us / L)      (at 100 % of its core)

and a deployment of N GPUs at W tokens/s each needs ceil(N * W / (headroom * that)) shards.
"""
from __future__ import annotations

import math
from typing import Optional

SHORT_OUTPUT_LEN = 8
HEADROOM = 0.7  # plan a shard's core to 70 % busy: bursts, fsyncs, and the replica's sync need the rest


def fit(long: dict, short: dict) -> Optional[dict]:
    """Per-job and per-token Redis CPU (µs) from two rows' {"jobs", "tokens", "cpu_s"}; None if the two rows
    cannot separate them (same tokens per job) or the fit is not physical (a negative part: noise larger than
    the signal). Rows with "requests" (client round trips) get those split the same way (None if unphysical)."""
    cpu = _split(long, short, lambda row: row["cpu_s"] * 1e6)
    if cpu is None:
        return None
    model = dict(per_job_us=cpu[0], per_token_us=cpu[1])
    if "requests" in long and "requests" in short:
        requests = _split(long, short, lambda row: row["requests"])
        model.update(requests_per_job=requests[0] if requests else None,
                     requests_per_token=requests[1] if requests else None)
    return model


def _split(long: dict, short: dict, measure) -> Optional[tuple[float, float]]:
    """`measure` = jobs * per_job + tokens * per_token, solved from both rows: (per_job, per_token)."""
    a1, b1, c1 = long["jobs"], long["tokens"], measure(long)
    a2, b2, c2 = short["jobs"], short["tokens"], measure(short)
    det = a1 * b2 - a2 * b1
    if det == 0:
        return None
    per_job = (c1 * b2 - c2 * b1) / det
    per_token = (a1 * c2 - a2 * c1) / det
    if per_job < 0 or per_token < 0:
        return None
    return per_job, per_token


def shard_capacity(per_job_us: float, per_token_us: float, mean_output_len: float) -> float:
    """Output tokens/s one Redis core carries for jobs of `mean_output_len` tokens."""
    return 1e6 / (per_token_us + per_job_us / mean_output_len)


def plan(per_job_us: float, per_token_us: float, mean_output_len: float, worker_tok_s: float,
         gpus: int, headroom: float = HEADROOM) -> dict:
    """The capacity model for one workload: tokens/s per shard, workers one shard carries, shards for `gpus`."""
    capacity = shard_capacity(per_job_us, per_token_us, mean_output_len)
    usable = headroom * capacity
    return dict(mean_output_len=mean_output_len, shard_tok_s=capacity, workers_per_shard=usable / worker_tok_s,
                gpus=gpus, worker_tok_s=worker_tok_s, shards=max(1, math.ceil(gpus * worker_tok_s / usable)))


def describe(model: dict, plans: list[dict]) -> list[str]:
    """Lines for the benchmark's output."""
    lines = [f"redis capacity: {model['per_job_us']:.0f} us of Redis CPU per job and {model['per_token_us']:.2f} us "
             f"per output token (fit of c={model['concurrency']} rows of {model['long_len']} and "
             f"{model['short_len']} tokens per request)"]
    if model.get("requests_per_job") is not None:
        lines.append(f"redis capacity: {model['requests_per_job']:.1f} client round trips per job and "
                     f"{model['requests_per_token']:.3f} per output token (INFO stats total_reads_processed)")
    for p in plans:
        lines.append(f"redis capacity: jobs of {p['mean_output_len']:.0f} tokens: one Redis core carries "
                     f"{p['shard_tok_s']:,.0f} tok/s; at {HEADROOM:.0%} of it, {p['workers_per_shard']:.1f} workers of "
                     f"{p['worker_tok_s']:,.0f} tok/s; {p['gpus']} such GPUs need {p['shards']} shard(s)")
    return lines
