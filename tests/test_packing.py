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
