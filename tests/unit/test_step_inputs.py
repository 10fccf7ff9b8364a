"""The input stager: what a step's device views hold (ids, positions, KV slots, block tables, logits rows,
padding), and block-table rows kept by batch slot without going stale."""
from __future__ import annotations

import torch

from workers.engine.config import EngineConfig
from workers.engine.sampling import SamplingParams
from workers.engine.scheduler import ScheduledBatch
from workers.engine.sequence import Sequence
from workers.engine.step_inputs import InputStager

BS, NULL = 4, 99


def stager() -> InputStager:
    return InputStager(EngineConfig(max_num_seqs=4, block_size=BS, max_model_len=64, prefill_chunk_tokens=16),
                       BS, NULL, torch.device("cpu"))


def sequence(tokens: list[int], blocks: list[int], slot: int, computed: int = 0) -> Sequence:
    seq = Sequence(f"s{slot}", tokens, SamplingParams(), 8)
    seq.block_table, seq.slot, seq.num_computed_tokens = list(blocks), slot, computed
    return seq


def test_a_mixed_step_padded_to_a_bucket():
    decoding = sequence(list(range(10, 16)), [7, 3], slot=2, computed=5)    # decodes token 15 at position 5
    fresh = sequence([1, 2, 3], [8], slot=0)                                # its whole prompt
    later = sequence(list(range(20, 30)), [4, 5, 6], slot=1, computed=6)   # the chunk of positions 6..9
    inp = stager().prepare(ScheduledBatch(decode=[decoding], prefill=[fresh, later], prefill_lens=[3, 4],
                                          admitted=[fresh]), padded_tokens=12)
    assert inp.num_tokens == 8 and inp.num_decode == 1
    assert inp.input_ids.tolist() == [15, 1, 2, 3, 26, 27, 28, 29, 0, 0, 0, 0]
    assert inp.positions.tolist() == [5, 0, 1, 2, 6, 7, 8, 9, 0, 0, 0, 0]
    assert inp.slot_mapping.tolist() == [3 * BS + 1, 32, 33, 34, 5 * BS + 2, 5 * BS + 3, 24, 25] + [NULL * BS] * 4
    assert inp.decode_block_tables.tolist() == [[7, 3]]
    assert [(c.row, c.length, c.start) for c in inp.chunks] == [(1, 3, 0), (4, 4, 6)]
    assert inp.chunks[0].block_table is None and inp.chunks[1].block_table.tolist() == [4, 5, 6]
    assert inp.logits_rows.tolist() == [0, 3, 7]  # the decode row and the rows ending a prompt


def test_block_table_rows_follow_growth_new_owners_and_readmission():
    s = stager()
    a = sequence([1] * 5, [0, 1], slot=0, computed=4)
    b = sequence([2] * 9, [2, 3, 4], slot=1, computed=8)
    tables = lambda *seqs: s.prepare(ScheduledBatch(decode=list(seqs))).decode_block_tables.tolist()  # noqa: E731
    assert tables(a, b) == [[0, 1, NULL], [2, 3, 4]]  # rows padded to the widest
    a.block_table.append(9)  # grows: only the new block is written
    a.token_ids += [1] * 4
    a.num_computed_tokens = 8
    assert tables(a, b) == [[0, 1, 9], [2, 3, 4]]
    c = sequence([3] * 2, [5], slot=0, computed=1)  # slot 0 passed to another sequence
    assert tables(c)[0][0] == 5
    # b preempted and readmitted in the same slot with other blocks (as many as before)
    b.block_table[:] = [6, 7, 8]
    b.num_computed_tokens = 0
    s.prepare(ScheduledBatch(prefill=[b], prefill_lens=[9], admitted=[b]))
    b.num_computed_tokens = 8
    assert tables(b) == [[6, 7, 8]]


def test_decode_graph_inputs_pad_rows_to_the_null_block():
    s = stager()
    a = sequence([1] * 6, [0, 1], slot=3, computed=5)
    s.prepare_decode([a], rows=2, width=4)
    ids, positions, tables = s.decode_views(2, 4)
    assert ids.tolist() == [1, 0] and positions.tolist() == [5, 0]
    assert tables[0, :2].tolist() == [0, 1] and tables[1].tolist() == [NULL] * 4
