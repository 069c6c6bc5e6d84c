"""Padding-free micro-batches: first-fit-decreasing packing of token sequences into rows of at most
`token_budget` tokens, with every index tensor the train step needs computed here, on the host, once.

A sequence is (input_ids, loss_mask) where loss_mask[i] marks tokens the student produced (the ones trained on).
The next-token shift is done here and only here: position t is a loss position when token t+1 of the same
sequence is a student token; its label is input_ids[t+1]. The last token of a sequence never predicts anything.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class PackedBatch:
    """One packed row of T tokens holding S sequences, and N loss positions."""

    input_ids: torch.Tensor  # (T,) int64
    position_ids: torch.Tensor  # (T,) int64, restarting at 0 for each sequence
    cu_seqlens: torch.Tensor  # (S+1,) int32
    max_seqlen: int  # longest sequence (host int: no sync to read it)
    seq_lens: tuple[int, ...]  # host copy of the lengths, for the CPU reference attention
    seq_ids: torch.Tensor  # (T,) int64 in [0, S): sequence of each token (local to this batch)
    loss_positions: torch.Tensor  # (N,) int64: positions whose next token is a student token
    loss_labels: torch.Tensor  # (N,) int64: that next token
    loss_seq_ids: torch.Tensor  # (N,) int64: local sequence of each loss position
    sample_index: torch.Tensor  # (S,) int64: index of each packed sequence in the caller's list
    num_tokens: int  # T (host int)
    loss_lens: tuple[int, ...] = ()  # loss positions per sequence (host ints: the step's loss normaliser)

    @property
    def num_loss_tokens(self) -> int:
        """N, the number of loss positions (host int: no sync)."""
        return sum(self.loss_lens)

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        return PackedBatch(**moved)

    def attention_kwargs(self) -> dict:
        """Keyword arguments that route a transformers forward through the packed attention backends."""
        return {
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
            "seq_lens_host": self.seq_lens,
            "total_tokens": self.num_tokens,
        }


def first_fit_decreasing(lengths: list[int], budget: int) -> list[list[int]]:
    """Bins of sequence indices whose lengths sum to <= budget, longest sequences placed first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return bins


def _build(sequences: list[tuple[list[int], list[bool]]], members: list[int]) -> PackedBatch:
    ids, pos, seq, cu, lens = [], [], [], [0], []
    loss_pos, loss_lab, loss_seq, loss_lens = [], [], [], []
    for local, i in enumerate(members):
        tokens, mask = sequences[i]
        offset = len(ids)
        n = len(tokens)
        ids.extend(int(t) for t in tokens)
        pos.extend(range(n))
        seq.extend([local] * n)
        first_loss = len(loss_pos)
        for t in range(n - 1):
            if mask[t + 1]:
                loss_pos.append(offset + t)
                loss_lab.append(int(tokens[t + 1]))
                loss_seq.append(local)
        loss_lens.append(len(loss_pos) - first_loss)
        cu.append(cu[-1] + n)
        lens.append(n)

    def long(x):
        return torch.tensor(x, dtype=torch.int64)

    return PackedBatch(
        input_ids=long(ids),
        position_ids=long(pos),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        max_seqlen=max(lens),
        seq_lens=tuple(lens),
        seq_ids=long(seq),
        loss_positions=long(loss_pos),
        loss_labels=long(loss_lab),
        loss_seq_ids=long(loss_seq),
        sample_index=long(members),
        num_tokens=len(ids),
        loss_lens=tuple(loss_lens),
    )


def pack_sequences(sequences: list[tuple[list[int], list[bool]]], token_budget: int) -> list[PackedBatch]:
    """Pack (input_ids, loss_mask) sequences into micro-batches of <= token_budget tokens (first-fit decreasing),
    never padding and losing no token. Within a batch, sequences keep their order in the input list."""
    if token_budget < 1:
        raise ValueError(f"token_budget={token_budget}: expected >= 1")
    if not sequences:
        raise ValueError("sequences is empty: nothing to pack")
    lengths = []
    for i, (tokens, mask) in enumerate(sequences):
        if len(tokens) != len(mask):
            raise ValueError(f"sequence {i}: {len(tokens)} tokens but a loss mask of {len(mask)}")
        if len(tokens) == 0:
            raise ValueError(f"sequence {i} is empty")
        if len(tokens) > token_budget:
            raise ValueError(f"sequence {i} has {len(tokens)} tokens, more than token_budget={token_budget}")
        lengths.append(len(tokens))
    return [_build(sequences, sorted(members)) for members in first_fit_decreasing(lengths, token_budget)]
