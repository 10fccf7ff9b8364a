"""The KV block free list on its own: allocation grows tables all-or-nothing, frees return every block once."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.engine.block_manager import BlockManager


def test_blocks_for_rounds_up():
    bm = BlockManager(10, 16)
    assert [bm.blocks_for(n) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]


def test_allocate_grows_a_table_and_free_returns_it():
    bm = BlockManager(8, 4)
    table: list[int] = []
    assert bm.allocate(table, 5) and len(table) == 2 and bm.num_used == 2 and bm.num_free == 6
    assert bm.allocate(table, 8) and len(table) == 2  # still fits in two blocks: nothing new
    assert bm.allocate(table, 9) and len(table) == 3
    assert len(set(table)) == 3
    bm.free(table)
    assert table == [] and bm.num_used == 0 and bm.num_free == 8


def test_allocate_is_all_or_nothing():
    bm = BlockManager(4, 4)
    a: list[int] = []
    assert bm.allocate(a, 12)  # 3 blocks
    b: list[int] = []
    assert not bm.allocate(b, 8)  # needs 2, 1 free
    assert b == [] and bm.num_free == 1
    assert not bm.can_allocate(b, 8) and bm.can_allocate(b, 4)


def test_reserve_keeps_blocks_back():
    bm = BlockManager(4, 4)
    table: list[int] = []
    assert not bm.allocate(table, 16, reserve=1)
    assert bm.allocate(table, 12, reserve=1) and bm.num_free == 1


def test_double_free_is_caught():
    bm = BlockManager(4, 4)
    table: list[int] = []
    bm.allocate(table, 4)
    copy = list(table)
    bm.free(table)
    with pytest.raises(RuntimeError):
        bm.free(copy)


def test_bad_sizes_rejected():
    with pytest.raises(ValueError):
        BlockManager(0, 16)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 40)), max_size=60))
def test_random_use_never_shares_or_loses_a_block(ops):
    bm = BlockManager(12, 4)
    tables: list[list[int]] = [[] for _ in range(6)]
    for who, tokens in ops:
        table = tables[who]
        if tokens == 0:
            bm.free(table)
            continue
        before = list(table)
        ok = bm.allocate(table, tokens)
        if ok:
            assert len(table) >= bm.blocks_for(tokens) and table[:len(before)] == before
        else:
            assert table == before and bm.blocks_for(tokens) - len(before) > bm.num_free
        held = [b for t in tables for b in t]
        assert len(held) == len(set(held)) == bm.num_used
        assert all(0 <= b < 12 for b in held)
