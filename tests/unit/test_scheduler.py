"""The scheduler on its own, driven by a fake model step: chunked prefill budget, decode every step, FIFO
admission by free blocks and batch slots, preemption of the newest when decoding runs out of blocks."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from workers.engine.block_manager import BlockManager
from workers.engine.config import EngineConfig
from workers.engine.sampling import SamplingParams
from workers.engine.scheduler import ScheduledBatch, Scheduler
from workers.engine.sequence import Sequence, SequenceStatus


def make(num_blocks=64, block_size=4, max_num_seqs=8, chunk=16, max_model_len=1024):
    config = EngineConfig(max_num_seqs=max_num_seqs, block_size=block_size, num_kv_blocks=num_blocks,
                          prefill_chunk_tokens=chunk, max_model_len=max_model_len)
    return Scheduler(config, BlockManager(num_blocks, block_size))


def seq(name, prompt_len, max_tokens=4):
    return Sequence(name, list(range(1, prompt_len + 1)), SamplingParams(temperature=0.0), max_tokens)


def apply(sched: Scheduler, batch: ScheduledBatch, finished: list) -> None:
    """What the engine does after the model ran: advance computed tokens, append one token to each sampled
    sequence, finish those at max_tokens."""
    sampled = batch.sampled()
    for s in batch.decode:
        s.num_computed_tokens += 1
    for s, n in zip(batch.prefill, batch.prefill_lens):
        s.num_computed_tokens += n
    for s in sampled:
        s.token_ids.append(7)
        if s.num_output_tokens >= s.max_tokens:
            sched.finish(s)
            finished.append(s.request_id)


def check_invariants(sched: Scheduler, batch: ScheduledBatch) -> None:
    bm = sched.blocks
    held = [b for s in sched.running for b in s.block_table]
    assert len(held) == len(set(held)) == bm.num_used
    assert all(not s.block_table and s.num_computed_tokens == 0 for s in sched.waiting)
    assert len(sched.running) <= sched.max_num_seqs
    assert sum(batch.prefill_lens) <= sched.prefill_chunk_tokens
    assert len({s.slot for s in sched.running}) == len(sched.running)
    for s in batch.decode:
        assert s.num_uncomputed_tokens == 1 and len(s.block_table) * bm.block_size >= s.num_tokens
    for s, n in zip(batch.prefill, batch.prefill_lens):
        assert 0 < n <= s.num_uncomputed_tokens
        assert len(s.block_table) * bm.block_size >= s.num_computed_tokens + n
    assert set(batch.decode).isdisjoint(batch.prefill)


def drive(sched: Scheduler, steps=10_000) -> list[str]:
    finished: list[str] = []
    for _ in range(steps):
        if not sched.has_unfinished():
            return finished
        batch = sched.schedule()
        check_invariants(sched, batch)
        assert not batch.is_empty or batch.ended, "no progress"
        apply(sched, batch, finished)
    raise AssertionError("did not finish")


def test_long_prompt_is_chunked_and_decodes_keep_running():
    sched = make(chunk=16)
    short = seq("short", 3, max_tokens=50)
    sched.add(short)
    apply(sched, sched.schedule(), [])  # short's prompt in one step, its first token sampled
    long = seq("long", 50)
    sched.add(long)
    chunks = []
    while long.num_uncomputed_tokens > 1 or long.num_output_tokens == 0:
        batch = sched.schedule()
        assert batch.decode == [short]  # the running stream decodes every step
        chunks.append(dict(zip(batch.prefill, batch.prefill_lens))[long])
        apply(sched, batch, [])
    assert chunks == [16, 16, 16, 2]
    assert long.num_output_tokens == 1 and short.num_output_tokens == 5


def test_chunk_budget_is_shared_oldest_first():
    sched = make(chunk=16)
    a, b = seq("a", 10), seq("b", 10)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.prefill == [a, b] and batch.prefill_lens == [10, 6]
    assert batch.sampled() == [a]  # b's prompt is not done yet: no logits for it


def test_admission_waits_for_blocks_fifo():
    sched = make(num_blocks=6, block_size=4, chunk=64)
    a, b, c = seq("a", 12), seq("b", 12), seq("c", 2)  # a: 3 blocks; b: 3 blocks; c: 1 block
    for s in (a, b, c):
        sched.add(s)
    batch = sched.schedule()
    # a fits; b would leave fewer than the watermark (1) free; c fits but must not overtake b
    assert batch.prefill == [a] and list(sched.waiting) == [b, c]


def test_batch_slots_limit_admission():
    sched = make(max_num_seqs=2, chunk=64)
    seqs = [seq(f"s{i}", 3) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert batch.prefill == seqs[:2] and list(sched.waiting) == [seqs[2]]
    assert sorted(s.slot for s in seqs[:2]) == [0, 1]


def test_decode_out_of_blocks_preempts_the_newest():
    sched = make(num_blocks=5, block_size=4, chunk=64)
    a, b = seq("a", 8, max_tokens=8), seq("b", 8, max_tokens=8)  # 2 blocks each after admission, 4 at the end
    sched.add(a)
    sched.add(b)
    apply(sched, sched.schedule(), [])   # both prefilled (a: 2 blocks, b: 2 blocks, 1 free)
    assert [s.num_tokens for s in (a, b)] == [9, 9]
    batch = sched.schedule()             # a takes the last block for token 9; b needs one too: b is preempted
    assert batch.decode == [a] and batch.num_preempted == 1
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b] and sched.num_preempted == 1
    assert drive(sched) == ["a", "b"]  # b is recomputed (prompt + its output so far) and finishes too
    assert b.num_output_tokens == 8 and sched.blocks.num_used == 0


def test_decode_out_of_blocks_preempts_batch_work_before_interactive():
    """Under KV pressure batch work goes first, though it was admitted before the interactive stream (the newest
    was the victim before); the preempted batch sequence then waits behind waiting interactive work."""
    sched = make(num_blocks=6, block_size=4, chunk=64)
    batch_seq, chat = seq("batch", 8, max_tokens=20), seq("chat", 8, max_tokens=20)
    batch_seq.priority = 1
    sched.add(batch_seq)
    apply(sched, sched.schedule(), [])  # the batch sequence is admitted first
    sched.add(chat)
    sched.add(waiting_chat := seq("chat-2", 30))  # interactive, waiting: it needs more blocks than are free
    for _ in range(20):
        batch = sched.schedule()
        check_invariants(sched, batch)
        if batch.num_preempted:
            break
        apply(sched, batch, [])
    assert batch.num_preempted == 1
    assert batch_seq.status is SequenceStatus.WAITING and chat.status is SequenceStatus.RUNNING
    assert chat in batch.decode and batch_seq not in batch.decode
    assert list(sched.waiting) == [waiting_chat, batch_seq]  # at its own priority: behind interactive work


def test_sequence_alone_filling_the_cache_ends_with_length():
    sched = make(num_blocks=2, block_size=4, chunk=64)
    s = seq("s", 6, max_tokens=100)
    sched.add(s)
    finished: list[str] = []
    ended = []
    for _ in range(10):
        batch = sched.schedule()
        ended += batch.ended
        if batch.is_empty:
            break
        apply(sched, batch, finished)
    assert [(e[0].request_id, e[1]) for e in ended] == [("s", "length")]
    assert s.num_tokens == 9 and sched.blocks.num_used == 0 and not sched.has_unfinished()


def test_check_refuses_what_can_never_fit():
    sched = make(num_blocks=4, block_size=4, max_model_len=64)
    assert sched.check(seq("ok", 15)) is None
    assert "KV-cache blocks" in sched.check(seq("big", 16))  # 16 + 1 tokens need 5 blocks
    assert "empty" in sched.check(seq("empty", 0))
    assert "max_model_len" in make(max_model_len=10).check(seq("long", 10))


def test_abort_frees_waiting_and_running():
    sched = make(max_num_seqs=1)
    a, b = seq("a", 5), seq("b", 5)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert sched.blocks.num_used == 2
    assert sched.abort("a") == [a] and sched.abort("b") == [b] and sched.abort("zzz") == []
    assert sched.blocks.num_used == 0 and not sched.has_unfinished()
    assert a.status is SequenceStatus.FINISHED and b.status is SequenceStatus.FINISHED


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 30)), min_size=1, max_size=12),
       st.integers(8, 30), st.integers(1, 5), st.integers(1, 24))
def test_random_workloads_all_finish(requests, num_blocks, max_num_seqs, chunk):
    sched = make(num_blocks=num_blocks, block_size=4, max_num_seqs=max_num_seqs, chunk=chunk)
    seqs = [seq(f"r{i}", p, m) for i, (p, m) in enumerate(requests)]
    accepted = [s for s in seqs if sched.check(s) is None]
    for s in accepted:
        sched.add(s)
    finished = drive(sched)
    cache_tokens = num_blocks * 4
    # Everything accepted finishes: at max_tokens, or with "length" when it alone filled the cache.
    done = {s.request_id for s in accepted if s.num_output_tokens == s.max_tokens}
    assert set(finished) == done
    for s in accepted:
        assert s.status is SequenceStatus.FINISHED
        assert s.num_output_tokens == s.max_tokens or s.num_tokens > cache_tokens
    assert sched.blocks.num_used == 0


def test_batch_priority_waits_behind_interactive():
    """Interactive sequences (priority 0) are queued ahead of waiting batch ones (priority 1), FIFO within
    each priority."""
    from workers.engine.block_manager import BlockManager
    from workers.engine.config import EngineConfig
    from workers.engine.sampling import SamplingParams
    from workers.engine.scheduler import Scheduler
    from workers.engine.sequence import Sequence
    scheduler = Scheduler(EngineConfig(max_num_seqs=4, max_model_len=1024, prefill_chunk_tokens=64),
                          BlockManager(64, 16))
    for name, priority in [("b1", 1), ("i1", 0), ("b2", 1), ("i2", 0)]:
        scheduler.add(Sequence(name, [1, 2, 3], SamplingParams(), 4, priority=priority))
    assert [s.request_id for s in scheduler.waiting] == ["i1", "i2", "b1", "b2"]
