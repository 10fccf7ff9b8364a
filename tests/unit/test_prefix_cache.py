"""Automatic prefix caching: the block manager's hashes, reference counts and LRU eviction; the scheduler's use of
them through admission, preemption, cancel and reset; and the engine's greedy output, which must be token for
token the same with and without the cache (the tiny model in float32)."""
from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.engine.block_manager import ROOT_HASH, BlockManager, block_hash
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine, EngineRequest
from workers.engine.sampling import SamplingParams
from workers.engine.scheduler import ScheduledBatch, Scheduler
from workers.engine.sequence import Sequence
from workers.model_loader import build_tiny_random

EOS = 2


# --- the block manager

def computed_table(bm: BlockManager, tokens: list[int]) -> tuple[list[int], list[bytes]]:
    """A table holding `tokens`, all computed and put in the cache (what a finished prefill leaves)."""
    table, known = [], []
    cached = bm.cached_prefix(tokens, known)
    assert bm.allocate(table, len(tokens), cached=cached)
    bm.cache_computed(table, tokens, known, len(tokens), len(cached))
    return table, known


def test_the_hash_names_the_whole_prefix():
    a = block_hash(ROOT_HASH, [1, 2, 3, 4])
    assert a == block_hash(ROOT_HASH, [1, 2, 3, 4]) and len(a) == 32
    assert block_hash(a, [5, 6, 7, 8]) != block_hash(block_hash(ROOT_HASH, [9, 2, 3, 4]), [5, 6, 7, 8])


def test_a_prompt_takes_the_longest_cached_run_of_full_blocks_but_not_its_last_token():
    bm = BlockManager(16, 4)
    first, _ = computed_table(bm, list(range(1, 13)))  # 3 full blocks
    assert bm.num_cached == 3
    # Same first 2 blocks, a different third: 2 hits.
    assert bm.cached_prefix(list(range(1, 9)) + [99, 98, 97, 96, 95], []) == first[:2]
    # The same 12 tokens again: the last block holds the last token, which must be computed for its logits.
    assert bm.cached_prefix(list(range(1, 13)), []) == first[:2]
    assert bm.cached_prefix(list(range(1, 14)), []) == first  # 13 tokens: all 3 full blocks
    assert bm.cached_prefix([7] + list(range(2, 14)), []) == []  # the first block differs: nothing


def test_shared_blocks_are_counted_and_stay_cached_when_freed():
    bm = BlockManager(8, 4)
    tokens = list(range(1, 10))  # 2 full blocks + 1 token
    a, _ = computed_table(bm, tokens)
    b: list[int] = []
    cached = bm.cached_prefix(tokens, [])
    assert cached == a[:2]
    assert bm.allocate(b, len(tokens), cached=cached)
    assert b[:2] == a[:2] and b[2] != a[2]
    assert bm.num_used == 4  # 2 shared + one last block each
    shared = a[:2]
    bm.free(a)
    assert bm.num_used == 3 and bm.num_cached == 2  # b still holds the shared two
    bm.free(b)
    assert bm.num_used == 0 and bm.num_free == 8 and bm.num_cached == 2  # cached, evictable
    c: list[int] = []
    assert bm.allocate(c, len(tokens), cached=bm.cached_prefix(tokens, []))
    assert c[:2] == shared


def test_the_least_recently_freed_cached_block_is_evicted_first_and_a_sequences_tail_before_its_head():
    bm = BlockManager(6, 4)
    old, _ = computed_table(bm, list(range(1, 9)))            # 2 blocks
    new, _ = computed_table(bm, list(range(101, 109)))        # 2 blocks
    bm.free(list(old))
    bm.free(list(new))
    assert bm.num_cached == 4 and bm.num_free == 6
    grab: list[int] = []
    assert bm.allocate(grab, 12)  # 3 blocks: the 2 empty ones, then old's tail
    assert old[1] in grab and old[0] not in grab and bm.num_cached == 3
    assert bm.cached_prefix(list(range(1, 10)), []) == [old[0]]  # old's head is still there
    assert bm.cached_prefix(list(range(101, 110)), []) == new


def test_a_cached_block_no_one_holds_counts_as_free_until_it_is_claimed():
    bm = BlockManager(4, 4)
    a, _ = computed_table(bm, list(range(1, 13)))  # 3 blocks
    bm.free(a)
    tokens = list(range(1, 13)) + [50, 51, 52, 53]  # 4 blocks: 3 cached + 1 new
    cached = bm.cached_prefix(tokens, [])
    assert len(cached) == 3
    assert not bm.allocate([], len(tokens), cached=cached, reserve=1)  # 1 new + reserve 1 > the 1 empty block
    table: list[int] = []
    assert bm.allocate(table, len(tokens), cached=cached) and bm.num_free == 0


def test_a_block_computed_twice_at_once_stays_its_tables_own():
    bm = BlockManager(8, 4)
    tokens = list(range(1, 6))
    a, b = [], []
    bm.allocate(a, 5)
    bm.allocate(b, 5)
    bm.cache_computed(a, tokens, [], 5, 0)
    bm.cache_computed(b, tokens, [], 5, 0)
    assert bm.num_cached == 1 and bm.cached_prefix(tokens + [9], []) == a[:1]
    bm.free(b)
    bm.free(a)
    assert bm.num_free == 8 and bm.num_cached == 1


def test_disabled_caches_nothing():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    a, _ = computed_table(bm, list(range(1, 10)))
    assert bm.num_cached == 0 and bm.cached_prefix(list(range(1, 10)), []) == []


def test_reset_empties_the_cache_and_keeps_the_counters():
    bm = BlockManager(8, 4)
    computed_table(bm, list(range(1, 10)))
    bm.count_lookup(9, 8)
    bm.reset()
    assert bm.num_free == 8 and bm.num_cached == 0 and (bm.prefix_queries, bm.prefix_hits) == (9, 8)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3), st.integers(1, 14)), max_size=50))
def test_random_use_keeps_counts_right(ops):
    """Tables drawn from a few prompt families (so prefixes are shared), freed and re-grown at random: a block is
    held as often as tables list it, every block is held, free or evictable exactly once, and a cached block
    holds the tokens its hash names."""
    bm = BlockManager(10, 2)
    families = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [1, 2, 3, 4, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9],
                [5, 6] * 7, [1, 2] + [3] * 12]
    tables: dict[int, tuple[list[int], list[bytes], list[int]]] = {}
    contents: dict[int, tuple[int, ...]] = {}  # block -> the tokens last written to it
    for who, family, length in ops:
        if who in tables:
            bm.free(tables.pop(who)[0])
            continue
        tokens = families[family][:length]
        table, known = [], []
        cached = bm.cached_prefix(tokens, known)
        if not bm.allocate(table, len(tokens), cached=cached):
            continue
        for i, block in enumerate(table[len(cached):], len(cached)):
            contents[block] = tuple(tokens[2 * i:2 * i + 2])
        for i, block in enumerate(cached):
            assert contents[block] == tuple(tokens[2 * i:2 * i + 2])
        bm.cache_computed(table, tokens, known, len(tokens), len(cached))
        tables[who] = (table, known, tokens)
        held: dict[int, int] = {}
        for t, _, _ in tables.values():
            for block in t:
                held[block] = held.get(block, 0) + 1
        assert all(bm._refs[b] == n for b, n in held.items())
        assert sorted(list(held) + bm._free + list(bm._evictable)) == list(range(10))
        assert bm.num_used == len(held)


# --- the scheduler

def scheduler(num_blocks=32, block_size=4, chunk=64, max_num_seqs=8, caching=True):
    config = EngineConfig(max_num_seqs=max_num_seqs, block_size=block_size, num_kv_blocks=num_blocks,
                          prefill_chunk_tokens=chunk, max_model_len=1024)
    return Scheduler(config, BlockManager(num_blocks, block_size, caching))


def seq(name, tokens, max_tokens=4):
    return Sequence(name, tokens, SamplingParams(temperature=0.0), max_tokens)


def step(sched: Scheduler):
    """One step as the engine runs it: schedule, advance the computed tokens, cache, sample token 7."""
    batch = sched.schedule()
    sampled = batch.sampled()
    for s in batch.decode:
        s.num_computed_tokens += 1
    for s, n in zip(batch.prefill, batch.prefill_lens):
        s.num_computed_tokens += n
    sched.cache_computed(batch.decode + batch.prefill)
    for s in sampled:
        s.token_ids.append(7)
        if s.num_output_tokens >= s.max_tokens:
            sched.finish(s)
    return batch


def test_admission_prefills_only_what_is_not_cached():
    sched = scheduler()
    prefix = list(range(1, 17))  # 4 blocks
    a = seq("a", prefix + [20, 21])
    sched.add(a)
    step(sched)
    b = seq("b", prefix + [30, 31, 32])
    sched.add(b)
    batch = step(sched)
    assert batch.prefill == [b] and batch.prefill_lens == [3]
    assert b.block_table[:4] == a.block_table[:4]
    assert (sched.blocks.prefix_queries, sched.blocks.prefix_hits) == (18 + 19, 16)


def test_a_chat_turn_reuses_the_blocks_the_last_turn_generated():
    sched = scheduler()
    a = seq("a", list(range(1, 10)), max_tokens=12)  # 9 prompt + 12 out: decoding fills blocks too
    sched.add(a)
    a_blocks = []
    while sched.has_unfinished():
        a_blocks = list(a.block_table) or a_blocks
        step(sched)
    turn = seq("turn", a.token_ids + [40, 41])
    sched.add(turn)
    batch = step(sched)
    # a computed 20 of its 21 tokens: 5 full blocks, cached; turn prefills the other 3 of its 23.
    assert batch.prefill_lens == [3] and turn.block_table[:5] == list(a_blocks)


def test_preempted_and_cancelled_sequences_leave_the_counts_right():
    sched = scheduler(num_blocks=12)
    prefix = list(range(1, 17))
    runs = [seq(f"s{i}", prefix + [100 + i], max_tokens=30) for i in range(3)]
    for s in runs:
        sched.add(s)
    preempted_before = sched.num_preempted
    for _ in range(12):
        step(sched)
        held: dict[int, int] = {}
        for s in sched.running:
            for block in s.block_table:
                held[block] = held.get(block, 0) + 1
        assert all(sched.blocks._refs[b] == n for b, n in held.items())
        assert sched.blocks.num_used == len(held)
        assert all(not s.block_table and s.num_cached_blocks == 0 for s in sched.waiting)
    assert sched.num_preempted > preempted_before  # 12 blocks cannot hold three 47-token sequences
    for s in list(sched.running) + list(sched.waiting):
        sched.abort(s.request_id)
    assert sched.blocks.num_used == 0 and sched.blocks.num_free == 12


def test_a_preempted_sequence_comes_back_to_its_cached_prefix():
    sched = scheduler(num_blocks=32)
    a = seq("a", list(range(1, 18)), max_tokens=10)
    sched.add(a)
    step(sched)
    sched._preempt(a, ScheduledBatch())  # out of the batch, its blocks freed
    assert not a.block_table and a.num_computed_tokens == 0
    tokens = a.num_tokens  # 17 prompt + 1 output
    batch = step(sched)
    assert a in batch.admitted and batch.prefill_lens == [tokens - 16]  # 4 of its blocks were still cached


# --- the engine: the same greedy tokens with and without the cache

@pytest.fixture(scope="module")
def model():
    return build_tiny_random()


def run_all(model, requests, caching: bool, num_kv_blocks=None, stagger=None):
    """Greedy tokens of each (request id, prompt, max_tokens), submitted together (or each once the one before
    has produced `stagger` tokens, so that blocks are shared by sequences at different steps)."""
    engine = Engine(model, torch.device("cpu"), eos_token_id=EOS,
                    config=EngineConfig(num_kv_blocks=num_kv_blocks, prefill_chunk_tokens=64,
                                        enable_prefix_caching=caching))
    results: dict[str, list[int]] = {}
    try:
        threads = []
        for request_id, prompt, max_tokens in requests:
            stream = engine.submit(EngineRequest(request_id, prompt, SamplingParams(temperature=0.0), max_tokens))
            out = results.setdefault(request_id, [])
            started = threading.Event()

            def collect(stream=stream, out=out, started=started):
                for output in stream:
                    out.extend(output.token_ids)
                    if len(out) >= (stagger or 0):
                        started.set()
                started.set()

            thread = threading.Thread(target=collect, daemon=True)
            thread.start()
            threads.append(thread)
            if stagger:
                started.wait(60)
        for thread in threads:
            thread.join(120)
            assert not thread.is_alive()
        stats = dict(engine.stats(), preempted=engine.scheduler.num_preempted, evicted=engine.blocks.num_evicted)
    finally:
        engine.shutdown()
    return results, stats


def random_tokens(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 32000, (n,), generator=gen).tolist()


def shared_prefix_requests():
    system = [1] + random_tokens(47, seed=1)  # 3 blocks of 16
    history = system + random_tokens(30, seed=2)
    return [("a", system + random_tokens(5, seed=3), 12),
            ("b", system + random_tokens(21, seed=4), 9),
            ("c", history + random_tokens(3, seed=5), 14),
            ("d", history, 7),                       # ends mid-block: its last partial block is its own
            ("e", system[:32], 10),                  # exactly two full blocks: the last is computed again
            ("f", [1] + random_tokens(70, seed=6), 8),
            ("h", system[16:48] + random_tokens(5, seed=8), 6)]  # system's blocks 1, 2 as its 0, 1: no hit


def test_greedy_output_is_the_same_with_and_without_the_cache(model):
    requests = shared_prefix_requests()
    without, _ = run_all(model, requests, caching=False)
    with_cache, stats = run_all(model, requests, caching=True, stagger=2)
    assert with_cache == without
    assert stats["prefix_cache_hits"] > 0 and stats["prefix_cache_queries"] > stats["prefix_cache_hits"]
    assert stats["kv_blocks_used"] == 0 and stats["kv_blocks_cached"] > 0


def test_a_second_wave_hits_the_first_waves_blocks_and_matches(model):
    requests = shared_prefix_requests()
    first, _ = run_all(model, requests, caching=False)
    twice = requests + [(f"{rid}2", prompt, n) for rid, prompt, n in requests]
    got, stats = run_all(model, twice, caching=True, stagger=1)
    assert all(got[rid] == first[rid] and got[rid + "2"] == first[rid] for rid, _, _ in requests)
    assert stats["prefix_cache_hits"] >= sum(len(p) - 16 for _, p, _ in requests if len(p) > 32)


def test_eviction_under_pressure_keeps_output_the_same(model):
    """12 blocks of 16: requests wait (and may be preempted: that depends on when each arrives) and evict each
    other's cached blocks; still the same. Each is sent once the one before has its first token, so that the
    shared prefix is cached when the next arrives."""
    requests = shared_prefix_requests() + [("g", [1] + random_tokens(60, seed=7), 20)]
    without, _ = run_all(model, requests, caching=False, num_kv_blocks=12)
    with_cache, stats = run_all(model, requests, caching=True, num_kv_blocks=12, stagger=1)
    assert with_cache == without
    assert stats["evicted"] > 0 and stats["prefix_cache_hits"] > 0
    assert stats["kv_blocks_used"] == 0 and stats["kv_blocks_cached"] <= 12


def test_a_resumed_job_finds_its_earlier_attempts_blocks_and_continues_the_same(model):
    """A job cut after k tokens comes back as prompt + those k tokens: the blocks its first attempt computed are
    still cached, and the rest is what the uncut run made."""
    prompt = [1] + random_tokens(40, seed=11)
    engine = Engine(model, torch.device("cpu"), eos_token_id=-1, config=EngineConfig(prefill_chunk_tokens=64))
    try:
        uncut = [t for o in engine.submit(EngineRequest("uncut", prompt, SamplingParams(temperature=0.0), 30))
                 for t in o.token_ids]
        hits = engine.stats()["prefix_cache_hits"]
        stream = engine.submit(EngineRequest("resumed", prompt + uncut[:20], SamplingParams(temperature=0.0), 10,
                                             num_resumed_tokens=20))
        rest = [t for o in stream for t in o.token_ids]
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert uncut[:20] + rest == uncut
    assert stats["prefix_cache_hits"] - hits == 48  # 60 tokens: 3 full blocks of the first attempt's


def test_after_an_engine_reset_the_cache_is_empty_and_output_still_right(model):
    prompt = [1] + random_tokens(50, seed=12)
    expected, _ = run_all(model, [("r", prompt, 10)], caching=False)
    engine = Engine(model, torch.device("cpu"), eos_token_id=EOS)
    try:
        tokens = lambda rid: [t for o in engine.submit(  # noqa: E731
            EngineRequest(rid, prompt, SamplingParams(temperature=0.0), 10)) for t in o.token_ids]
        assert tokens("before") == expected["r"]
        assert engine.stats()["kv_blocks_cached"] > 0
        schedule = engine.scheduler.schedule

        def fail_once():
            engine.scheduler.schedule = schedule
            raise RuntimeError("a bug in the bookkeeping")
        engine.scheduler.schedule = fail_once
        failed = list(engine.submit(EngineRequest("failed", [1, 5, 6], SamplingParams(temperature=0.0), 3)))
        assert failed[-1].finish_reason == "error"
        stats = engine.stats()
        assert stats["kv_blocks_cached"] == 0 and stats["kv_blocks_used"] == 0
        hits = stats["prefix_cache_hits"]
        assert tokens("after") == expected["r"]
        assert engine.stats()["prefix_cache_hits"] == hits  # computed again: nothing was left to hit
    finally:
        engine.shutdown()
