"""Packing: budget respected, no token lost, FFD order, the label shift done once and right."""

import random

import pytest
import torch

from exgrpo_fast.data.packing import first_fit_decreasing, pack_sequences


def test_budget_respected_and_no_token_lost():
    rng = random.Random(0)
    seqs = []
    for _ in range(60):
        n = int(rng.lognormvariate(3, 0.8)) % 120 + 1
        seqs.append(([rng.randrange(50) for _ in range(n)], [rng.random() < 0.5 for _ in range(n)]))
    batches = pack_sequences(seqs, token_budget=128)
    seen = []
    for b in batches:
        assert b.num_tokens <= 128 and b.input_ids.numel() == b.num_tokens
        assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens[-1].item() == b.num_tokens
        for j, i in enumerate(b.sample_index.tolist()):
            start, end = b.cu_seqlens[j].item(), b.cu_seqlens[j + 1].item()
            assert b.input_ids[start:end].tolist() == seqs[i][0]
            assert b.position_ids[start:end].tolist() == list(range(end - start))
            assert (b.seq_ids[start:end] == j).all()
            assert b.seq_lens[j] == end - start and b.max_seqlen >= end - start
            seen.append(i)
    assert sorted(seen) == list(range(len(seqs)))
    # FFD never leaves two bins that could be merged... at least it beats one-sequence-per-bin by far
    assert len(batches) <= sum(len(s[0]) for s in seqs) // 128 + 3


def test_label_shift():
    ids = [10, 11, 12, 13, 14]
    mask = [False, False, True, True, False]  # the student wrote tokens 12 and 13
    other = ([20, 21, 22], [False, True, True])
    (b,) = pack_sequences([(ids, mask), other], 100)
    # positions predicting a student token: 1 -> 12, 2 -> 13 (first sequence), then 5 -> 21, 6 -> 22
    assert b.loss_positions.tolist() == [1, 2, 5, 6]
    assert b.loss_labels.tolist() == [12, 13, 21, 22]
    assert b.loss_seq_ids.tolist() == [0, 0, 1, 1]
    assert all(b.input_ids[p + 1].item() == lab for p, lab in zip(b.loss_positions.tolist(), b.loss_labels.tolist()))


def test_first_token_masked_is_never_predicted_across_sequences():
    (b,) = pack_sequences([([1, 2], [False, True]), ([3, 4], [True, True])], 10)
    # token 3 starts a sequence: nothing in the packed row may predict it from the previous sequence
    assert b.loss_labels.tolist() == [2, 4]


def test_ffd_order():
    assert first_fit_decreasing([3, 7, 5, 2, 4], 10) == [[1, 0], [2, 4], [3]]


def test_errors():
    with pytest.raises(ValueError, match="sequence 1 has 12 tokens, more than token_budget=10"):
        pack_sequences([([1], [True]), (list(range(12)), [True] * 12)], 10)
    with pytest.raises(ValueError, match="sequence 0: 2 tokens but a loss mask of 1"):
        pack_sequences([([1, 2], [True])], 10)
    with pytest.raises(ValueError, match="empty"):
        pack_sequences([], 10)
    with pytest.raises(ValueError, match="token_budget"):
        pack_sequences([([1], [True])], 0)


def test_to_device_keeps_host_fields():
    (b,) = pack_sequences([([1, 2, 3], [False, True, True])], 10)
    moved = b.to("cpu")
    assert moved.max_seqlen == 3 and moved.seq_lens == (3,) and torch.equal(moved.loss_labels, b.loss_labels)


def test_ffd_bound_and_exact_fit():
    rng = random.Random(1)
    for _ in range(20):
        budget = rng.randrange(16, 200)
        lengths = [rng.randrange(1, budget + 1) for _ in range(rng.randrange(1, 80))]
        bins = first_fit_decreasing(lengths, budget)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= budget for b in bins)
        # any first-fit packing leaves at most one bin at most half full
        assert len(bins) <= 2 * sum(lengths) / budget + 1
        # first fit: when an item opened a new bin, none of the earlier bins had room for it
        for k, b in enumerate(bins):
            first = b[0]
            for earlier in bins[:k]:
                placed_before = [i for i in earlier if (-lengths[i], i) < (-lengths[first], first)]
                assert sum(lengths[i] for i in placed_before) + lengths[first] > budget
    (b,) = pack_sequences([([1] * 6, [True] * 6), ([2] * 4, [True] * 4)], 10)  # exactly the budget: one batch
    assert b.num_tokens == 10 and b.sample_index.tolist() == [0, 1] and b.cu_seqlens.tolist() == [0, 6, 10]


# ----------------------------------------------------------------------------------------------------------------
# shared prefixes (groups): a group's common prompt once per micro-batch, continuations attending to it


def _group_seqs(spec, seed=0):
    """spec: [(prompt_len, [continuation lengths])] -> (sequences, groups); loss on the continuations."""
    rng = random.Random(seed)
    seqs, groups = [], []
    for g, (lp, conts) in enumerate(spec):
        prompt = [rng.randrange(50) for _ in range(lp)]
        for n in conts:
            seqs.append((prompt + [rng.randrange(50) for _ in range(n)], [False] * lp + [True] * n))
            groups.append(g)
    return seqs, groups


def _check_against_unshared(seqs, batches):
    """Each sample's tokens, positions, visible keys and loss rows are those of its own unshared sequence."""
    seen = []
    for b in batches:
        ids, pos = b.input_ids.tolist(), b.position_ids.tolist()
        kv = b.kv_index.tolist() if b.kv_index is not None else list(range(b.num_tokens))
        cu, cu_k = b.cu_seqlens.tolist(), (b.cu_seqlens_k if b.cu_seqlens_k is not None else b.cu_seqlens).tolist()
        assert cu[-1] == b.num_tokens and list(b.seq_lens) == [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
        assert list(b.seq_lens_k or b.seq_lens) == [cu_k[i + 1] - cu_k[i] for i in range(len(cu_k) - 1)]
        assert b.max_seqlen == max(b.seq_lens) and (b.max_seqlen_k or b.max_seqlen) == max(b.seq_lens_k or b.seq_lens)
        # row -> the rows its query sees (bottom-right causal within its segment's keys)
        sees = {}
        for d in range(len(cu) - 1):
            keys = kv[cu_k[d] : cu_k[d + 1]]
            off = len(keys) - (cu[d + 1] - cu[d])
            for j, row in enumerate(range(cu[d], cu[d + 1])):
                sees[row] = keys[: off + j + 1]
        loss = list(zip(b.loss_positions.tolist(), b.loss_labels.tolist(), b.loss_seq_ids.tolist()))
        assert [s for _, _, s in loss] == sorted(s for _, _, s in loss)  # sample by sample
        prefixes = [list(range(cu[d], cu[d + 1])) for d in range(len(cu) - 1) if b.seq_ids[cu[d]].item() == -1]
        for local, i in enumerate(b.sample_index.tolist()):
            tokens, mask = seqs[i]
            own = [r for r in range(b.num_tokens) if b.seq_ids[r].item() == local]
            if own:  # its rows, in its own sequence's order: what its last row sees
                rows = sees[own[-1]]
            else:  # an empty continuation: it is a whole shared prefix (the one holding its loss rows, if any)
                mine = [p for p, _, s in loss if s == local]
                rows = next(r for r in prefixes if [ids[x] for x in r] == list(tokens) and (not mine or mine[0] in r))
            assert [ids[r] for r in rows] == list(tokens) and [pos[r] for r in rows] == list(range(len(tokens)))
            for t, r in enumerate(rows):  # every row sees exactly the rows before it in its own sequence
                assert sees[r] == rows[: t + 1], (i, t)
            want = [(rows[t], tokens[t + 1]) for t in range(len(tokens) - 1) if mask[t + 1]]
            got = [(p, lab) for p, lab, s in loss if s == local]
            assert got == want and b.loss_lens[local] == len(want)
            seen.append(i)
    assert sorted(seen) == list(range(len(seqs)))


def test_shared_prefix_layout():
    seqs, groups = _group_seqs([(6, [3, 5, 1]), (4, [2, 2])])
    (b,) = pack_sequences(seqs, 100, groups=groups)
    # prompt once per group: 6 + 3 + 5 + 1 + 4 + 2 + 2 tokens instead of 3 * 6 + 9 + 2 * 4 + 4
    assert b.num_tokens == 23 and sum(len(t) for t, _ in seqs) == 39
    assert b.seq_lens == (6, 3, 5, 1, 4, 2, 2) and b.seq_lens_k == (6, 9, 11, 7, 4, 6, 6)
    assert b.position_ids.tolist()[:15] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 6, 7, 8, 9, 10, 6]
    assert b.seq_ids.tolist()[:7] == [-1] * 6 + [0]
    # the prompt's last row (5) predicts each sample's first token: one loss row per sample
    assert b.loss_positions.tolist()[:6] == [5, 6, 7, 5, 9, 10]
    assert b.loss_seq_ids.tolist()[:6] == [0, 0, 0, 1, 1, 1]
    assert b.kv_index.tolist()[6:15] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    _check_against_unshared(seqs, [b])
    (whole,) = pack_sequences(seqs, 100)
    assert whole.kv_index is None and whole.num_tokens == 39
    # the loss normaliser's inputs do not change: per-sample loss counts in the same sample order
    counts = sorted(zip(b.sample_index.tolist(), b.loss_lens))
    assert counts == sorted(zip(whole.sample_index.tolist(), whole.loss_lens))


def test_shared_prefix_edge_cases():
    # groups of one (plain sequences), one-token prompts, empty responses, identical samples, no common prefix
    seqs, groups = _group_seqs([(5, [4]), (1, [3, 2, 4]), (7, [0, 3, 0]), (3, [2, 2])], seed=1)
    seqs[-2:] = [(seqs[-2][0], seqs[-2][1]), (list(seqs[-2][0]), list(seqs[-2][1]))]  # identical samples
    seqs.append(([1, 2, 3], [False, True, True]))  # starts differently from group 4's other member
    seqs.append(([9, 2, 3], [False, True, True]))
    groups += [4, 4]
    batches = pack_sequences(seqs, 64, groups=groups)
    _check_against_unshared(seqs, batches)
    (b,) = batches
    assert b.num_tokens == 5 + 4 + (1 + 3 + 2 + 4) + (7 + 3) + 5 + 3 + 3  # identical pair: shared whole
    # the group of one and the group without a common prefix are plain segments (no gathered keys of their own)
    assert 5 + 4 in [q for q, k in zip(b.seq_lens, b.seq_lens_k) if q == k]


def test_group_split_across_micro_batches():
    """A group larger than the budget splits into sub-groups that each carry the prompt; nothing else changes."""
    seqs, groups = _group_seqs([(10, [8, 7, 9, 6, 8, 5]), (3, [2, 4])], seed=2)
    batches = pack_sequences(seqs, 30, groups=groups)
    assert len(batches) >= 3 and all(b.num_tokens <= 30 for b in batches)
    _check_against_unshared(seqs, batches)
    prompt = seqs[0][0][:10]
    carrying = [b for b in batches if b.input_ids[:10].tolist() == prompt]
    group0 = sorted(i for b in carrying for i in b.sample_index.tolist() if groups[i] == 0)
    assert len(carrying) >= 2 and group0 == list(range(6))  # every sub-group carries the prompt
    with pytest.raises(ValueError, match="groups has 1 entries for 8 sequences"):
        pack_sequences(seqs, 30, groups=[0])


def test_shared_prefix_random_against_unshared():
    rng = random.Random(3)
    for trial in range(20):
        spec = [(rng.randrange(1, 12), [rng.randrange(0, 9) for _ in range(rng.randrange(1, 6))]) for _ in range(4)]
        seqs, groups = _group_seqs(spec, seed=trial)
        for i, (t, m) in enumerate(seqs):  # random loss masks, prompt tokens included
            seqs[i] = (t, [rng.random() < 0.6 for _ in m])
        budget = max(len(t) for t, _ in seqs) + rng.randrange(0, 30)
        _check_against_unshared(seqs, pack_sequences(seqs, budget, groups=groups))
