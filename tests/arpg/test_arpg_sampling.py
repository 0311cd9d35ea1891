"""Schedules, guidance scales, filtering and sampling."""

import math

import numpy as np
import pytest
import torch

from arpg import cfg_scales, filter_logits, make_plan, sample, token_schedule


def original_counts(num_iter, seq_len, sample_schedule):
    """The loop of ARPG.generate (hp-l33/ARPG, models/arpg.py), transcribed literally."""
    counts, last_pos = [], 0
    for step in range(num_iter):
        if sample_schedule == 'arccos':
            mask_ratio = np.arccos(1. * (step + 1) / num_iter) / (math.pi * 0.5)
        elif sample_schedule == 'cosine':
            mask_ratio = np.cos(math.pi / 2. * (step + 1) / num_iter)
        else:
            raise NotImplementedError

        mask_len = int(seq_len * mask_ratio)
        mask_len = max(1, min(seq_len - last_pos - 1, mask_len))

        num_pred = seq_len - last_pos - mask_len
        if step == num_iter - 1:
            num_pred = seq_len - last_pos
        counts.append(num_pred)
        last_pos += num_pred
    return counts


def test_documented_counts():
    # int(256 * arccos(1/64) / (pi/2)) = int(253.45) = 253 masked, so the first of 64 arccos steps predicts 3.
    counts = token_schedule(64, 256, "arccos")
    assert counts[0] == 256 - int(256 * math.acos(1 / 64) / (math.pi / 2)) == 3
    assert counts[:6] == [3, 3, 2, 3, 2, 3]
    assert counts[-1] == 256 - sum(counts[:-1])
    assert token_schedule(64, 256, "cosine")[0] == 1
    assert token_schedule(1, 256, "arccos") == [256]
    assert token_schedule(256, 256, "arccos") == [1] * 256


@pytest.mark.parametrize("seq_len", [16, 64, 256, 1024])
@pytest.mark.parametrize("schedule", ["arccos", "cosine"])
def test_schedule_is_the_originals(schedule, seq_len):
    for n in range(1, min(seq_len, 256) + 1):
        counts = token_schedule(n, seq_len, schedule)
        assert counts == original_counts(n, seq_len, schedule), (seq_len, n)
        assert len(counts) == n and sum(counts) == seq_len and min(counts) >= 1


def test_schedule_last_bit_cases():
    # cos(pi/2 * ((s+1)/N)) and (pi/2 * (s+1)) / N differ in the last bit here, and int(L * ratio) with them.
    for seq_len, n in ((64, 39), (256, 39), (256, 51)):
        assert token_schedule(n, seq_len, "cosine") == original_counts(n, seq_len, "cosine")


def test_schedule_errors():
    with pytest.raises(ValueError, match="num_steps"):
        token_schedule(0, 16)
    with pytest.raises(ValueError, match="num_steps"):
        token_schedule(17, 16)
    with pytest.raises(ValueError, match="schedule"):
        token_schedule(4, 16, "linear")
    with pytest.raises(ValueError, match="summing"):
        token_schedule(2, 16, [8, 7])
    assert token_schedule(3, 16, [8, 0, 8]) == [8, 0, 8]


def test_plan_covers_order_once():
    order = torch.randperm(256, generator=torch.Generator().manual_seed(0)).tolist()
    for n in (1, 5, 64, 256):
        steps = make_plan(256, n, order, "arccos")
        targets = [t for st in steps for t in st.targets]
        assert targets == order
        assert steps[0].pos_in == (0,)
        for prev, st in zip(steps, steps[1:]):
            assert st.pos_in == tuple(t + 1 for t in prev.targets)
            assert st.kv_len == prev.kv_len + st.n_in
    # Zero-count steps of an explicit schedule are dropped.
    steps = make_plan(16, 3, list(range(16)), [8, 0, 8])
    assert [st.n_q for st in steps] == [8, 8]


def test_cfg_scales():
    counts = [3, 5, 8]
    assert cfg_scales(counts, 16, 4.0, "constant") == [4.0] * 3
    assert cfg_scales(counts, 16, 4.0, "linear") == [1 + 3 * 3 / 16, 1 + 3 * 8 / 16, 4.0]
    with pytest.raises(ValueError, match="cfg_schedule"):
        cfg_scales(counts, 16, 4.0, "cosine")


def test_filter_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 10.0, 0.0]])
    top2 = filter_logits(logits, top_k=2)
    assert torch.isinf(top2).tolist() == [[True, False, False, True], [False, False, False, False]]
    # probs of row 0 sorted: 0.644, 0.237, 0.087, 0.032 -> top_p 0.7 keeps two, 0.5 keeps one.
    assert torch.isfinite(filter_logits(logits, top_p=0.7)[0]).tolist() == [False, True, True, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.5)[0]).tolist() == [False, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.5)[1]).sum() == 1
    assert torch.equal(filter_logits(logits), logits)
    # Works per position on any leading shape.
    x = torch.randn(2, 3, 10)
    assert torch.isfinite(filter_logits(x, top_k=3)).sum(-1).eq(3).all()


def test_sample_distribution_and_determinism():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log().expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    draws = sample(logits, generator=g)
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    a = sample(logits[:50], generator=torch.Generator().manual_seed(3))
    b = sample(logits[:50], generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    x = torch.randn(4, 6, 9)
    assert torch.equal(sample(x, temperature=0), x.argmax(-1))
    assert torch.equal(sample(x, top_k=1, generator=g), x.argmax(-1))
    assert torch.equal(sample(x, top_p=1e-6, generator=g), x.argmax(-1))


def test_sample_never_picks_a_removed_token_and_matches_the_filtered_softmax():
    # Probability-0 entries (filtered to -inf) at the start, the middle and the end of the row.
    logits = torch.tensor([float("-inf"), 0.0, float("-inf"), 1.0, 2.0, float("-inf")]).expand(40000, 6)
    draws = sample(logits, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[[0, 2, 5]].sum() == 0
    want = torch.softmax(logits[0], -1).double() * draws.numel()
    live = want > 0
    chi2 = (((counts - want) ** 2)[live] / want[live]).sum().item()
    assert chi2 < 13.8, chi2  # 2 degrees of freedom: p = 0.001
    # top-k / top-p: only the kept tokens, in proportion to their renormalised probabilities.
    x = torch.randn(1, 50, generator=torch.Generator().manual_seed(2)).expand(30000, 50)
    draws = sample(x, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(3))
    kept = torch.isfinite(filter_logits(x[:1], top_k=5, top_p=0.9))[0]
    assert kept[draws].all()
    counts = torch.bincount(draws, minlength=50).double()[kept]
    want = torch.softmax(filter_logits(x[:1], top_k=5, top_p=0.9), -1)[0].double()[kept] * draws.numel()
    assert (((counts - want) ** 2) / want).sum().item() < 20.5  # <= 4 degrees of freedom: p = 0.0004
