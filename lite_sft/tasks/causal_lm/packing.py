"""Pack tokenised examples into rows and collate rows into batches.

    rows = pack(examples, max_len=1024)           # several whole examples per row
    batch = collate(rows[:4], pad_id=tokenizer.pad_token_id)
    loss = model(**batch, use_cache=False).loss

Packed examples never attend to each other, without a 4-D mask: position_ids restart at 0 for
every example, and transformers (4.57, masking_utils.find_packed_sequence_indices) turns a restart
into a new attention segment when attention_mask is None. So a packed batch carries position_ids
and no attention_mask. The first token of every example is unlabelled (see masking.py), so no loss
term predicts one example from the end of the one before it. Whether the loaded model honours the restart
is checked once, before training (check_packing_isolation).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from lite_sft.errors import ModelError
from lite_sft.tasks.base import IGNORE_INDEX
from lite_sft.tasks.causal_lm.masking import Example


@dataclass
class Row:
    """One training row: whole examples laid end to end, position_ids restarting at each."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    num_examples: int
    packed: bool
    """Built by pack(): collate then leaves out attention_mask so transformers sees the segments."""

    def __len__(self) -> int:
        return len(self.input_ids)


def _row(examples: list[Example], packed: bool) -> Row:
    ids, labels, positions = [], [], []
    for ex in examples:
        ids += ex.input_ids
        labels += ex.labels
        positions += range(len(ex.input_ids))
    return Row(ids, labels, positions, len(examples), packed)


def unpacked_rows(examples: list[Example]) -> list[Row]:
    """One example per row, position_ids 0..n-1, in the given order."""
    return [_row([ex], packed=False) for ex in examples]


def pack(examples: list[Example], max_len: int) -> list[Row]:
    """Pack whole examples into rows of at most `max_len` tokens (best-fit decreasing).

    Longest examples first, each into the fullest row it still fits, else a new row: near-optimal
    filling, deterministic (ties go to the earlier example and row), O(n log n). Rows come out
    roughly longest-first, so the training loop shuffles them.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), ascending
    for i in order:
        n = len(examples[i].input_ids)
        if n > max_len:
            raise ValueError(f"example {examples[i].source or i} has {n} tokens, more than max_len={max_len}; "
                             "truncate or drop it first")
        k = bisect.bisect_left(free, (n, -1))  # the row with the least space that still fits n
        if k == len(free):
            bins.append([i])
            bisect.insort(free, (max_len - n, len(bins) - 1))
        else:
            space, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
    return [_row([examples[i] for i in b], packed=True) for b in bins]


def collate(rows: list[Row], pad_id: int, max_len: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest one (or to `max_len`, for fixed shapes) and stack them.

    Labels are padded with IGNORE_INDEX. Padding gets positions 0, 1, 2, ... of its own, so it is a
    segment of its own and never joins a real example. Packed rows get no attention_mask (transformers
    finds the segments from position_ids); unpacked rows get one.

        >>> packed = [Row([5, 6, 7, 8, 9], [-100, 6, -100, -100, 9], [0, 1, 0, 1, 2], 2, True),
        ...           Row([3, 4], [-100, 4], [0, 1], 1, True)]
        >>> {k: v.tolist() for k, v in collate(packed, pad_id=0).items()}
        {'input_ids': [[5, 6, 7, 8, 9], [3, 4, 0, 0, 0]], 'labels': [[-100, 6, -100, -100, 9], [-100, 4, -100, -100, -100]], 'position_ids': [[0, 1, 0, 1, 2], [0, 1, 0, 1, 2]]}

    Unpacked rows of the same tokens also carry attention_mask [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]].
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    if len({row.packed for row in rows}) > 1:
        raise ValueError("a batch mixes packed and unpacked rows; build all rows the same way")
    longest = max(len(row) for row in rows)
    if max_len is not None and longest > max_len:
        raise ValueError(f"a row has {longest} tokens, more than max_len={max_len}")
    width = longest if max_len is None else max_len
    ids, labels, positions, mask = [], [], [], []
    for row in rows:
        pad = width - len(row)
        ids.append(row.input_ids + [pad_id] * pad)
        labels.append(row.labels + [IGNORE_INDEX] * pad)
        positions.append(row.position_ids + list(range(pad)))
        mask.append([1] * len(row) + [0] * pad)
    batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions)}
    if not rows[0].packed:
        batch["attention_mask"] = torch.tensor(mask)
    return batch


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Which segment each token belongs to, as transformers infers it: a new segment wherever the
    position does not follow the previous one by exactly 1.

        segment_ids(torch.tensor([[0, 1, 0, 1, 2, 0]]))  ->  tensor([[0, 0, 1, 1, 1, 2]])
    """
    previous = torch.cat([position_ids[:, :1] - 1, position_ids[:, :-1]], dim=-1)
    return (position_ids - previous != 1).cumsum(-1)


@torch.no_grad()
def check_packing_isolation(model, device: torch.device) -> None:
    """Packed examples must not see each other: compare a packed pair with the two run separately.

    transformers isolates packed examples only for architectures whose masks honour restarting
    position ids; this one forward pass proves it for the loaded model instead of assuming it.
    """
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, vocab, (1, 5), generator=gen), torch.randint(0, vocab, (1, 4), generator=gen)
    packed = torch.cat([a, b], dim=1).to(device)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]], device=device)
    was_training = model.training
    model.eval()
    together = model(input_ids=packed, position_ids=positions, use_cache=False).logits[0, 5:].float()
    alone = model(input_ids=b.to(device), use_cache=False).logits[0].float()
    model.train(was_training)
    if not torch.allclose(together, alone, atol=1e-2, rtol=1e-2):
        raise ModelError(f"{type(model).__name__} lets packed examples attend to each other in this transformers "
                         "version; turn packing off with --no-packing")
