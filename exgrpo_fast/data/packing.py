"""Padding-free micro-batches: first-fit-decreasing packing of token sequences into rows of at most
`token_budget` tokens, with every index tensor the train step needs computed here, on the host, once.

A sequence is (input_ids, loss_mask) where loss_mask[i] marks tokens the student produced (the ones trained on).
The next-token shift is done here and only here: position t is a loss position when token t+1 of the same
sequence is a student token; its label is input_ids[t+1]. The last token of a sequence never predicts anything.

Shared prefixes (`groups`, GRPO's G samples of one problem): the longest common token prefix of a group is packed
once per micro-batch, followed by each sample's continuation (the rest of the sample):

    row      [ prompt P | continuation c1 | continuation c2 | ... ]   positions 0..|P|-1, then |P|.. for each c
    queries  P attends causally to P; c_i attends to all of P, then causally to c_i (bottom-right causal)
    keys     kv_index gathers, per attention segment, the rows its queries see: P for P, P + c_i for c_i

so every token sees exactly what it sees in its own unshared sequence: outputs, log-probs and, through the
backward's sums over shared rows, gradients are those of packing every sample whole (Prefix Grouper,
arXiv 2506.05433), with |P| * (G - 1) fewer tokens per group through every layer. The prefix's last position
predicts a different first token for each sample: loss_positions repeats it, once per sample, with that sample's
label and sequence id (the forward's index_select sums their gradients). loss_lens are per sample and equal to the
unshared packing's, so the step's LossNorm never changes. A group larger than the budget is split into sub-groups
that each carry the prefix; a (sub-)group of one sample is packed as an ordinary sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Hashable, Sequence

import torch


@dataclass
class PackedBatch:
    """One packed row of T tokens holding S sequences (samples) in D attention segments, and N loss positions.

    An attention segment is a run of rows whose queries share one key set: a whole sequence, a shared prefix, or
    a sample's continuation of a shared prefix. Without shared prefixes D = S and segments are the sequences."""

    input_ids: torch.Tensor  # (T,) int64
    position_ids: torch.Tensor  # (T,) int64: 0.. per sequence; a continuation goes on from its prefix's length
    cu_seqlens: torch.Tensor  # (D+1,) int32: segment starts in the row (the attention queries)
    max_seqlen: int  # longest segment, in queries (host int: no sync to read it)
    seq_lens: tuple[int, ...]  # host copy of the segments' query lengths, for the CPU reference attention
    seq_ids: torch.Tensor  # (T,) int64 in [0, S): sequence of each token (local); -1 on shared-prefix tokens
    loss_positions: torch.Tensor  # (N,) int64: rows whose next token is a student token (may repeat: a prefix's
    # last row predicts each sample's first token)
    loss_labels: torch.Tensor  # (N,) int64: that next token
    loss_seq_ids: torch.Tensor  # (N,) int64: local sequence of each loss position (sorted: sample by sample)
    sample_index: torch.Tensor  # (S,) int64: index of each packed sequence in the caller's list
    num_tokens: int  # T (host int)
    loss_lens: tuple[int, ...] = ()  # loss positions per sequence (host ints: the step's loss normaliser)
    kv_index: torch.Tensor | None = None  # (T_k,) int64: rows gathered as each segment's keys; None = the row
    cu_seqlens_k: torch.Tensor | None = None  # (D+1,) int32: segment starts in the gathered keys; None = cu_seqlens
    max_seqlen_k: int = 0  # longest key set (0: max_seqlen)
    seq_lens_k: tuple[int, ...] = ()  # host copy of the key lengths (empty: seq_lens)

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
        shared = self.kv_index is not None
        kwargs = {
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens_k if shared else self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen_k if shared else self.max_seqlen,
            "seq_lens_host": self.seq_lens,
            "total_tokens": self.num_tokens,
        }
        if shared:
            kwargs.update(kv_index=self.kv_index, seq_lens_k_host=self.seq_lens_k)
        return kwargs


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


@dataclass(frozen=True)
class _Item:
    """What first-fit-decreasing places: one sequence (prefix 0), or a (sub-)group's shared prefix and the
    continuations of its members."""

    members: tuple[int, ...]
    prefix: int
    size: int


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix that all of `seqs` share."""
    if not seqs:
        return 0
    first, n = seqs[0], min(len(s) for s in seqs)
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


def _group_items(tokens: list[list[int]], members: list[int], budget: int) -> list[_Item]:
    """A group's items: the whole group sharing its common prefix when it fits the budget, else sub-groups of
    continuations filled first-fit-decreasing, each sub-group carrying its own (at least as long) common prefix."""
    lens = [len(tokens[i]) for i in members]
    if len(members) == 1:
        return [_Item((members[0],), 0, lens[0])]
    prefix = common_prefix_len([tokens[i] for i in members])
    if prefix == 0:
        return [_Item((i,), 0, n) for i, n in zip(members, lens)]
    rest = [n - prefix for n in lens]
    if prefix + sum(rest) <= budget:
        return [_Item(tuple(members), prefix, prefix + sum(rest))]
    items = []
    for sub in first_fit_decreasing(rest, budget - prefix):  # every prefix + rest fits: each sequence <= budget
        sub_members = [members[j] for j in sorted(sub)]
        items.extend(_group_items(tokens, sub_members, budget))
    return items


def _build(tokens: list[list[int]], masks: list[list[bool]], items: list[_Item]) -> PackedBatch:
    ids, pos, seq = [], [], []
    q_lens, k_lens, kv = [], [], []  # attention segments: query lengths, key lengths, gathered key rows
    loss_pos, loss_lab, loss_seq, loss_lens, samples = [], [], [], [], []
    shared = False
    for item in items:
        lp, p0 = item.prefix, len(ids)
        if lp:  # the prefix, once: an ordinary causal segment
            shared = True
            ids.extend(tokens[item.members[0]][:lp])
            pos.extend(range(lp))
            seq.extend([-1] * lp)
            q_lens.append(lp)
            k_lens.append(lp)
            kv.extend(range(p0, p0 + lp))
        for i in item.members:
            local, toks, mask = len(samples), tokens[i], masks[i]
            samples.append(i)
            n, c0 = len(toks), len(ids)
            ids.extend(toks[lp:])
            pos.extend(range(lp, n))
            seq.extend([local] * (n - lp))
            if n > lp:  # keys: the prefix's rows, then its own (an empty continuation has no segment)
                q_lens.append(n - lp)
                k_lens.append(n)
                kv.extend(range(p0, p0 + lp))
                kv.extend(range(c0, c0 + n - lp))
            first_loss = len(loss_pos)
            for t in range(n - 1):
                if mask[t + 1]:
                    loss_pos.append(p0 + t if t < lp else c0 + t - lp)
                    loss_lab.append(toks[t + 1])
                    loss_seq.append(local)
            loss_lens.append(len(loss_pos) - first_loss)

    def long(x):
        return torch.tensor(x, dtype=torch.int64)

    def cumsum32(lens):
        out = [0]
        for n in lens:
            out.append(out[-1] + n)
        return torch.tensor(out, dtype=torch.int32)

    cu = cumsum32(q_lens)
    return PackedBatch(
        input_ids=long(ids),
        position_ids=long(pos),
        cu_seqlens=cu,
        max_seqlen=max(q_lens),
        seq_lens=tuple(q_lens),
        seq_ids=long(seq),
        loss_positions=long(loss_pos),
        loss_labels=long(loss_lab),
        loss_seq_ids=long(loss_seq),
        sample_index=long(samples),
        num_tokens=len(ids),
        loss_lens=tuple(loss_lens),
        kv_index=long(kv) if shared else None,
        cu_seqlens_k=cumsum32(k_lens) if shared else cu,
        max_seqlen_k=max(k_lens),
        seq_lens_k=tuple(k_lens),
    )


def pack_sequences(
    sequences: list[tuple[Sequence[int], Sequence[bool]]],
    token_budget: int,
    *,
    groups: Sequence[Hashable] | None = None,
) -> list[PackedBatch]:
    """Pack (input_ids, loss_mask) sequences into micro-batches of <= token_budget tokens (first-fit decreasing),
    never padding and losing no token. Within a batch, sequences keep their order in the input list, except that
    the members of a shared prefix follow it together (placed where its first member would be).

    groups[i] (optional) is sequence i's group, e.g. its GRPO problem: each group's longest common token prefix is
    packed once per micro-batch and its members' continuations attend to it (see the module docstring); the loss,
    log-probs and gradients equal those of packing without groups."""
    if token_budget < 1:
        raise ValueError(f"token_budget={token_budget}: expected >= 1")
    if not sequences:
        raise ValueError("sequences is empty: nothing to pack")
    if groups is not None and len(groups) != len(sequences):
        raise ValueError(f"groups has {len(groups)} entries for {len(sequences)} sequences: expected one per sequence")
    tokens, masks = [], []
    for i, (toks, mask) in enumerate(sequences):
        if len(toks) != len(mask):
            raise ValueError(f"sequence {i}: {len(toks)} tokens but a loss mask of {len(mask)}")
        if len(toks) == 0:
            raise ValueError(f"sequence {i} is empty")
        if len(toks) > token_budget:
            raise ValueError(f"sequence {i} has {len(toks)} tokens, more than token_budget={token_budget}")
        tokens.append([int(t) for t in toks])
        masks.append([bool(m) for m in mask])
    if groups is None:
        items = [_Item((i,), 0, len(t)) for i, t in enumerate(tokens)]
    else:
        by_group: dict[Hashable, list[int]] = {}
        for i, g in enumerate(groups):
            by_group.setdefault(g, []).append(i)
        items = [it for members in by_group.values() for it in _group_items(tokens, members, token_budget)]
        items.sort(key=lambda it: it.members[0])
    bins = first_fit_decreasing([it.size for it in items], token_budget)
    return [_build(tokens, masks, [items[j] for j in sorted(b)]) for b in bins]
