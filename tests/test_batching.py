"""Row and batch layout on hand-written token lists, no model: trimmed rows, packed choices, the shared prefix,
padding-aware cuts, left padding with its masks and position ids, and the columns whose logits are read."""
import torch

from c2i_fast.batching import (Row, choice_rows, continuation_rows, cut_batches, pad, prompt_rows, read_columns,
                               shared_prefix_length, split_shared_prefix, trimmed)


def _ids(batches):
    return [[(r.example, r.choice) for r in b] for b in batches]


def test_rows_for_each_kind():
    assert prompt_rows([[1, 2], [3]]) == [Row(0, -1, [1, 2], []), Row(1, -1, [3], [])]
    assert continuation_rows([[1, 2], [3]], [[4], [5, 6]]) == [Row(0, -1, [1, 2, 4], [4]),
                                                               Row(1, -1, [3, 5, 6], [5, 6])]
    choices = [[[3, 4], [5]]]
    assert choice_rows([[1, 2]], choices, pack=True) == [Row(0, -1, [1, 2, 3, 4, 5], [3, 4, 5], [(2, 2), (4, 1)])]
    assert choice_rows([[1, 2]], choices, pack=False) == [Row(0, 0, [1, 2, 3, 4], [3, 4]), Row(0, 1, [1, 2, 5], [5])]


def test_trimming_drops_each_continuations_last_token():
    r = trimmed(Row(0, -1, [1, 2, 3, 4, 5], [4, 5]))
    assert (r.ids, r.cont, r.trimmed, r.first_read) == ([1, 2, 3, 4], [4, 5], True, 2)   # read from token 3 on
    packed = trimmed(Row(0, -1, [1, 2, 3, 4, 5], [3, 4, 5], [(2, 2), (4, 1)]))
    assert (packed.ids, packed.spans, packed.first_read) == ([1, 2, 3], [(2, 2), (3, 1)], 1)
    assert [packed.width(n) for _, n in packed.spans] == [1, 0]
    prompt_only = Row(0, -1, [1, 2], [])
    assert trimmed(prompt_only) is prompt_only and trimmed(r) is r


def test_shared_prefix_leaves_every_row():
    rows = [Row(0, -1, [1, 2, 3, 4, 5], [5]), Row(1, -1, [1, 2, 3, 6], [6]),
            Row(2, -1, [1, 2, 9, 7, 8], [7, 8], [(3, 1), (4, 1)])]
    # first reads at indices 3, 2, 2: the prefix stops before index 2 (and row 2 differs there anyway)
    assert shared_prefix_length(rows) == 2
    # 2 prefix tokens × (3 − 1) rows = 4 tokens saved beyond the prefix's own pass: only against an overhead < 4
    assert split_shared_prefix([Row(0, -1, list(r.ids), r.cont, r.spans) for r in rows], overhead=4) == []
    assert split_shared_prefix(rows, overhead=3) == [1, 2]
    assert [r.ids for r in rows] == [[3, 4, 5], [3, 6], [9, 7, 8]]
    assert rows[2].spans == [(1, 1), (2, 1)] and rows[0].spans is None


def test_padding_aware_cuts():
    # examples 0..2 of 2, 3 and 10 tokens; example 1 has two rows (unpacked choices) that stay together
    rows = [Row(2, -1, list(range(10)), [9]), Row(1, 0, [1, 2, 3], [3]), Row(1, 1, [1, 2, 4], [4]),
            Row(0, -1, [1, 2], [2])]
    assert _ids(cut_batches(rows, 100, overhead=0)) == [[(0, -1)], [(1, 0), (1, 1)], [(2, -1)]]
    # overhead 5: {0, 1} | {2} costs 3·3 + 5 + 10 + 5 = 29, less than one batch (4·10 + 5) or three (33)
    assert _ids(cut_batches(rows, 100, overhead=5)) == [[(0, -1), (1, 0), (1, 1)], [(2, -1)]]
    assert _ids(cut_batches(rows, 100, overhead=1000)) == [[(0, -1), (1, 0), (1, 1), (2, -1)]]
    # at most 8 padded tokens a batch; example 2 alone exceeds that and still gets its batch
    assert _ids(cut_batches(rows, 8, overhead=1000)) == [[(0, -1)], [(1, 0), (1, 1)], [(2, -1)]]


def test_left_padding_positions_and_read_columns():
    b = pad([Row(0, -1, [5, 6, 7], [7]), Row(1, -1, [8, 9], [9])], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7], [0, 8, 9]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert b.position_ids.tolist() == [[0, 1, 2], [0, 0, 1]]
    assert b.allowed is None
    # both continuations (7, 9) are predicted at the second-to-last column, never at the last
    assert (b.keep, b.read, b.seg_len) == (2, [0], [1, 1])
    assert [t.tolist() for t in b.gather] == [[0, 1], [0, 0], [7, 9], [0, 1]]
    assert read_columns(b).tolist() == [1]


def test_shared_prefix_shifts_positions_and_opens_the_prefix_keys():
    # prompt 5 6, answer 7 8 (its 8 trimmed); prompt 8, answer 9 (trimmed: nothing of it is fed)
    b = pad([Row(0, -1, [5, 6, 7], [7, 8], trimmed=True), Row(1, -1, [8], [9], trimmed=True)], pad_id=0, prefix_len=4)
    assert b.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b.position_ids.tolist() == [[4, 5, 6], [4, 4, 4]]
    assert b.allowed.shape == (2, 1, 3, 7)
    assert b.allowed[:, 0, :, :4].all()                       # every query sees the 4 prefix keys
    assert b.allowed[1, 0, :, 4:].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]   # padding: itself only
    assert b.allowed[0, 0, :, 4:].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert (b.keep, b.read) == (2, [0, 1])
    assert [t.tolist() for t in b.gather] == [[0, 0, 1], [0, 1, 1], [7, 8, 9], [0, 0, 1]]
    assert read_columns(b).tolist() == [1, 2]


def test_packed_choices_mask_positions_and_reads():
    row = Row(0, -1, [1, 2, 3, 4, 5], [3, 4, 5], [(2, 2), (4, 1)])   # prompt 1 2 | choice 3 4 | choice 5
    b = pad([row], pad_id=0)
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 2]]              # each choice restarts after the prompt
    assert b.allowed[0, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                                              [1, 1, 1, 1, 0], [1, 1, 0, 0, 1]]   # choice 2 never sees choice 1
    # choice 1: 3 at the last prompt token, 4 at token 3; choice 2: 5 at the last prompt token
    assert (b.keep, b.read, b.seg_len) == (4, [0, 1], [2, 1])
    assert [t.tolist() for t in b.gather] == [[0, 0, 0], [0, 1, 0], [3, 4, 5], [0, 0, 1]]
    assert read_columns(b).tolist() == [1, 2]
    t = pad([trimmed(row)], pad_id=0)                               # the same reads without the dead tokens
    assert t.input_ids.tolist() == [[1, 2, 3]] and t.position_ids.tolist() == [[0, 1, 2]]
    assert (t.keep, t.read, t.seg_len) == (2, [0, 1], [2, 1])
    assert [x.tolist() for x in t.gather] == [x.tolist() for x in b.gather]
    assert read_columns(t).tolist() == [1, 2]


def test_one_token_choices_read_the_last_column_only():
    b = pad(prompt_rows([[1, 2, 3], [4]]), pad_id=7, last_column_only=True)
    assert b.input_ids.tolist() == [[1, 2, 3], [7, 7, 4]]
    assert (b.keep, b.read, b.gather) == (1, [0], None)
    assert torch.equal(read_columns(b), torch.tensor([2]))
