"""Lua scripts in pipelines (jobs/scripts.py), on a real Redis: no SCRIPT EXISTS round trip per pipeline, and
pipelines still run after Redis lost its scripts (a restart; here SCRIPT FLUSH)."""
from __future__ import annotations

import pytest

from jobs.records import GenerationRequest, JobRecord, JobStatus
from jobs.scripts import ScriptSet
from jobs.store import JobStore

# KEYS: a key. ARGV: a value. Sets it, returns it doubled.
SET_AND_DOUBLE = "redis.call('SET', KEYS[1], ARGV[1]) return tonumber(ARGV[1]) * 2"


def script_exists_calls(client) -> int:
    stats = client.info("commandstats")
    return int((stats.get("cmdstat_script|exists") or {}).get("calls", 0))


def test_a_pipeline_carrying_a_script_makes_no_script_exists_round_trip(redis_client, prefix):
    scripts = ScriptSet(redis_client)
    double = scripts.register(SET_AND_DOUBLE)
    scripts.ensure_loaded()
    before = script_exists_calls(redis_client)
    for value in range(1, 4):
        def fill(pipe, value=value):
            pipe.get(f"{prefix}:k")
            double(keys=[f"{prefix}:k"], args=[value], client=pipe)
        assert scripts.run(fill, transaction=False)[1] == 2 * value
    assert script_exists_calls(redis_client) == before
    assert redis_client.get(f"{prefix}:k") == "3"


@pytest.mark.parametrize("transaction", [True, False])
def test_a_pipeline_runs_again_once_redis_has_lost_its_scripts(redis_client, prefix, transaction):
    scripts = ScriptSet(redis_client)
    double = scripts.register(SET_AND_DOUBLE)
    scripts.ensure_loaded()
    redis_client.script_flush()
    fills = []

    def fill(pipe):
        fills.append(1)
        pipe.set(f"{prefix}:plain", "x")
        double(keys=[f"{prefix}:k"], args=[21], client=pipe)

    assert scripts.run(fill, transaction=transaction, raise_on_error=False) == [True, 42]
    assert len(fills) == 2  # NOSCRIPT, then filled and run again after loading
    assert scripts.run(fill, transaction=transaction) == [True, 42]
    assert len(fills) == 3  # loaded now: once


def test_a_script_called_alone_loads_itself(redis_client, prefix):
    scripts = ScriptSet(redis_client)
    double = scripts.register(SET_AND_DOUBLE)
    redis_client.script_flush()
    assert double(keys=[f"{prefix}:k"], args=[5]) == 10


def test_the_store_records_a_job_after_redis_lost_its_scripts(redis_client, prefix):
    store = JobStore(redis_client, prefix, ttl_s=600)
    request = GenerationRequest(model="m", prompt_token_ids=[1, 2], max_tokens=2, temperature=0.0, top_p=1.0,
                                frequency_penalty=0.0, presence_penalty=0.0, seed=0)
    first = JobRecord.new(request, kind="interactive", owner="o", queue=f"{prefix}-q")
    store.create(first)
    redis_client.script_flush()
    second = JobRecord.new(request, kind="interactive", owner="o", queue=f"{prefix}-q")
    store.create(second)
    assert store.get(second.id).status == JobStatus.QUEUED
    current, _ = store.telemetry.job_counts()
    assert current["queued"] == 2  # the telemetry script in create's pipeline ran both times
    started, attempt = store.start(second.id, "w")
    assert started.detail == (1,)
    redis_client.script_flush()
    assert store.renew([attempt]) == []  # renewed: no lease lost
