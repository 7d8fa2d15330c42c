from __future__ import annotations

import doctest

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import find_packed_sequence_indices

from lite_sft.tasks.causal_lm import packing
from lite_sft.tasks.causal_lm.masking import IGNORE_INDEX, Example
from lite_sft.tasks.causal_lm.packing import Row, collate, pack, segment_ids, unpacked_rows

X = IGNORE_INDEX


def numbered(lengths: list[int]) -> list[Example]:
    """Example i holds tokens 1000*i + 0, 1, 2, ...: any token tells which example and place it came from."""
    return [Example([1000 * i + j for j in range(n)], [X] + [1000 * i + j for j in range(1, n)], source=f"ex{i}")
            for i, n in enumerate(lengths)]


def test_collate_docstring_example_runs():
    failures, attempted = doctest.testmod(packing)
    assert (failures, attempted) == (0, 2)


def test_pack_best_fit_decreasing():
    rows = pack(numbered([5, 3, 4, 2, 6]), max_len=8)
    # 6 opens a row, 5 opens a row, 4 opens a row, 3 joins 5 (8), 2 joins 6 (8)
    assert [[tok // 1000 for tok in row.input_ids] for row in rows] == [
        [4] * 6 + [3] * 2, [0] * 5 + [1] * 3, [2] * 4]
    assert rows[0].position_ids == [0, 1, 2, 3, 4, 5, 0, 1]
    assert rows[0].labels == [X, 4001, 4002, 4003, 4004, 4005, X, 3001]
    assert [row.num_examples for row in rows] == [2, 2, 1]
    assert all(row.packed for row in rows)


def test_pack_refuses_an_example_longer_than_a_row():
    with pytest.raises(ValueError, match="ex0 has 9 tokens"):
        pack(numbered([9]), max_len=8)


def test_unpacked_rows_keep_order_and_positions():
    rows = unpacked_rows(numbered([3, 2]))
    assert [row.input_ids for row in rows] == [[0, 1, 2], [1000, 1001]]
    assert [row.position_ids for row in rows] == [[0, 1, 2], [0, 1]]
    assert not any(row.packed for row in rows)


def test_collate_unpacked_has_attention_mask_and_right_padding():
    batch = collate(unpacked_rows(numbered([3, 1])), pad_id=7)
    assert batch["input_ids"].tolist() == [[0, 1, 2], [1000, 7, 7]]
    assert batch["labels"].tolist() == [[X, 1, 2], [X, X, X]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]


def test_collate_pads_to_max_len_and_masks_pad_by_position_not_id():
    eos = pad = 3
    row = Row([9, 10, eos], [X, 10, eos], [0, 1, 2], 1, packed=True)
    batch = collate([row], pad_id=pad, max_len=5)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # packed: no attention_mask
    assert batch["input_ids"].tolist() == [[9, 10, 3, 3, 3]]
    assert batch["labels"].tolist() == [[X, 10, 3, X, X]]  # the real eos is still trained
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    with pytest.raises(ValueError, match="more than max_len=2"):
        collate([row], pad_id=pad, max_len=2)
    with pytest.raises(ValueError, match="mixes packed and unpacked"):
        collate([row, unpacked_rows(numbered([2]))[0]], pad_id=pad)


def test_segment_ids_match_transformers():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 0, 1]])
    assert segment_ids(positions).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 0, 0, 0, 0, 0, 1, 1]]
    assert torch.equal(segment_ids(positions), find_packed_sequence_indices(positions))


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 16), min_size=1, max_size=30), max_len=st.integers(16, 40))
def test_property_packing_never_crosses_examples(lengths, max_len):
    examples = numbered(lengths)
    rows = pack(examples, max_len)
    assert pack(examples, max_len) == rows  # deterministic
    seen = []
    for row in rows:
        assert len(row) <= max_len
        assert len(row.input_ids) == len(row.labels) == len(row.position_ids)
        starts = [k for k, p in enumerate(row.position_ids) if p == 0]
        assert len(starts) == row.num_examples
        for start, stop in zip(starts, starts[1:] + [len(row)]):
            i = row.input_ids[start] // 1000
            assert row.input_ids[start:stop] == examples[i].input_ids  # whole and contiguous
            assert row.labels[start:stop] == examples[i].labels
            assert row.position_ids[start:stop] == list(range(stop - start))
            seen.append(i)
    assert sorted(seen) == list(range(len(examples)))  # each exactly once

    batch = collate(rows, pad_id=0)
    segments = segment_ids(batch["position_ids"])
    for r, row in enumerate(rows):
        # transformers sees one segment per example, plus one for the padding if there is any
        padding = batch["input_ids"].shape[1] - len(row)
        assert segments[r, -1].item() + 1 == row.num_examples + (padding > 0)
        assert batch["labels"][r, len(row):].eq(X).all()


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_gives_the_same_logits_as_separate_examples(tiny_llama, attn):
    tiny_llama.config._attn_implementation = attn
    g = torch.Generator().manual_seed(1)
    examples = [Example(torch.randint(1, 64, (n,), generator=g).tolist(), [X] * n) for n in (7, 5, 3, 6)]
    rows = pack(examples, max_len=16)
    assert [row.num_examples for row in rows] == [3, 1]  # 7 + 6 + 3, then 5 alone
    batch = collate(rows, pad_id=0)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = tiny_llama(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        # The same positions with an all-ones mask: segments are no longer detected, examples see each other.
        leaky = tiny_llama(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).logits
        alone = {tuple(ex.input_ids): tiny_llama(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
                 for ex in examples}
    leaked = []
    for r, row in enumerate(rows):
        starts = [k for k, p in enumerate(row.position_ids) if p == 0] + [len(row)]
        for start, stop in zip(starts, starts[1:]):
            expected = alone[tuple(row.input_ids[start:stop])]  # (seq, vocab)
            torch.testing.assert_close(packed[r, start:stop], expected, rtol=1e-5, atol=1e-5)
            leaked.append(not torch.allclose(leaky[r, start:stop], expected, rtol=1e-5, atol=1e-5))
    assert leaked == [False, True, True, False]  # the first example of a row has nothing before it to see
