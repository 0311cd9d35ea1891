"""Editing (inpaint / outpaint / expand) on the paged engine: known tokens, varlen batches, larger grids."""

import math

import pytest
import torch

import arpg_kernels as ak
from arpg import generate, make_plan, precompute_rope_2d, token_schedule
from arpg.eager import _DenseCache, _eager_step
from arpg.edit import expand, inpaint, outpaint
from arpg.engine import _ENGINES


def random_known(counts, seq_len, seed=0):
    """A [B, L] mask with counts[b] known positions in sample b."""
    g = torch.Generator().manual_seed(seed)
    known = torch.zeros(len(counts), seq_len, dtype=torch.bool)
    for b, k in enumerate(counts):
        known[b, torch.randperm(seq_len, generator=g)[:k]] = True
    return known


def dense_oracle(model, tokens, known, label, order, num_steps, grid):
    """One sample's logits per step, with dense per-step K/V (`eager._eager_step`) and the teacher tokens."""
    seq_len = grid[0] * grid[1]
    known_idx = [i for i in order if known[i]]  # fed in the order's sequence, causally (as in training)
    todo = [i for i in order if not known[i]]
    steps = make_plan(seq_len, min(num_steps, len(todo)), todo, known=known_idx)
    rope = model.rope_table("cpu", grid)
    caches = [_DenseCache() for _ in range(model.num_cache_layers)]
    cls = model.class_ids(torch.tensor([label]))
    seq = torch.cat([cls, tokens])  # position p -> seq[p]
    out = []
    with torch.no_grad():
        for st in steps:
            pos_in, pos_q = torch.tensor(st.pos_in), torch.tensor(st.targets) + 1
            out.append(_eager_step(model, seq[pos_in][None], rope[pos_in], rope[pos_q], st.n_q, caches,
                                   causal=st is steps[0])[0])
    return out


def test_inpaint_keeps_known_and_fills_each_unknown_once(make_model, poison_empty):
    model = make_model()
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    teacher = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len), generator=g)
    truth = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len), generator=g)
    known = random_known([3, 0, 15, 16], cfg.seq_len)  # one sample all known, one nothing known
    tokens = truth.masked_fill(~known, -1)  # unknown entries are never read
    for n in (1, 3, 16):
        out, logits = inpaint(model, tokens, known, [1, 2, 3, -1], n, seed=n, cfg_scale=2.0, teacher_tokens=teacher,
                              return_logits=True)
        assert torch.equal(out, torch.where(known, truth, teacher))
        # Every unknown position was queried exactly once: one query per unknown (2 rows each under CFG).
        assert sum(x.shape[0] for x in logits) == 2 * int((~known).sum())
        assert len(logits) == min(n, 16)
    sampled = inpaint(model, tokens, known, [1, 2, 3, -1], 4, seed=0, top_k=5)
    assert torch.equal(sampled[known], truth[known])
    assert int(sampled.min()) >= 0 and int(sampled.max()) < cfg.vocab_size
    # All known: the input comes back unchanged, no engine work.
    assert torch.equal(inpaint(model, truth[:2], torch.ones(cfg.seq_len, dtype=torch.bool), [0, 1], 4), truth[:2])


def test_plan_with_known_tokens():
    known = [2, 5, 7]
    order = [i for i in torch.randperm(16, generator=torch.Generator().manual_seed(0)).tolist() if i not in known]
    steps = make_plan(16, 4, order, known=known)
    assert steps[0].pos_in == (0, 3, 6, 8) and steps[0].kv_len == 4
    assert [t for st in steps for t in st.targets] == order
    assert [st.n_q for st in steps] == token_schedule(4, 13)  # the schedule runs over the 13 unknowns
    with pytest.raises(ValueError, match="permutation"):
        make_plan(16, 4, order + [2], known=known)
    assert make_plan(16, 4, [], known=range(16)) == []


@pytest.mark.parametrize("cfg_scale, cfg_schedule", [(1.0, "constant"), (3.0, "linear")])
def test_varlen_batch_equals_one_by_one(make_model, cfg_scale, cfg_schedule):
    model = make_model("ARPG-tiny-g8", std=0.05)
    cfg = model.config
    truth = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len), generator=torch.Generator().manual_seed(2))
    known = random_known([0, 10, 40, 61], cfg.seq_len, seed=3)
    labels, seeds = [1, -1, 4, 9], [11, 12, 13, 14]
    kw = dict(cfg_scale=cfg_scale, cfg_schedule=cfg_schedule, temperature=1.3, top_k=30, top_p=0.95)
    batch, logits = inpaint(model, truth, known, labels, 6, seed=seeds, return_logits=True, **kw)
    assert torch.equal(batch[known], truth[known])
    unknown = (~known).sum(1).tolist()
    cond = (lambda x: x.chunk(2)[0]) if cfg_scale != 1.0 else (lambda x: x)
    for b in range(4):
        one, one_logits = inpaint(model, truth[b : b + 1], known[b : b + 1], labels[b], 6, seed=[seeds[b]],
                                  return_logits=True, **kw)
        assert torch.equal(one, batch[b : b + 1]), f"sample {b}"
        # The sample's conditional rows of the packed batch logits are its logits alone.
        got = torch.cat([cond(x) for x in _cond_rows(logits, unknown, 6, b, cfg_scale != 1.0)])
        want = torch.cat([cond(x) for x in one_logits]) if one_logits else got[:0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _counts(u: int, num_steps: int) -> list[int]:
    return token_schedule(min(num_steps, u), u) if u else []


def _cond_rows(logits, unknown, num_steps, b, use_cfg=False):
    """Sample b's query rows (conditional, then unconditional under CFG) in each step's packed logits."""
    per = [_counts(u, num_steps) for u in unknown]
    rows = []
    for s, x in enumerate(logits):
        n = [p[s] if s < len(p) else 0 for p in per]
        start, half = sum(n[:b]), sum(n)
        idx = list(range(start, start + n[b]))
        if use_cfg:
            idx += [half + i for i in idx]
        rows.append(x[idx])
    return rows


def test_inpaint_matches_dense_oracle(make_model):
    model = make_model(std=0.05)
    cfg = model.config
    g = torch.Generator().manual_seed(4)
    truth = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g)
    teacher = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g)
    known = random_known([5, 11], cfg.seq_len, seed=5)
    orders = torch.stack([torch.randperm(cfg.seq_len, generator=g) for _ in range(2)])
    out, logits = inpaint(model, truth, known, [3, 7], 4, order=orders, teacher_tokens=teacher, return_logits=True)
    full = torch.where(known, truth, teacher)
    assert torch.equal(out, full)
    unknown = (~known).sum(1).tolist()
    for b in range(2):
        want = dense_oracle(model, full[b], known[b], [3, 7][b], orders[b].tolist(), 4, (4, 4))
        got = [x for x in _cond_rows(logits, unknown, 4, b) if x.shape[0]]
        assert len(got) == len(want)
        for s, (x, y) in enumerate(zip(got, want)):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5, msg=lambda m: f"sample {b} step {s}: {m}")


def test_nothing_known_is_generate(make_model):
    model = make_model()
    cfg = model.config
    labels = torch.tensor([1, 5])
    kw = dict(seed=7, cfg_scale=2.5, cfg_schedule="linear", top_p=0.9)
    want, want_logits = generate(model, labels, 5, return_logits=True, **kw)
    got, got_logits = inpaint(model, torch.zeros(2, cfg.seq_len, dtype=torch.long),
                              torch.zeros(cfg.seq_len, dtype=torch.bool), labels, 5, return_logits=True, **kw)
    assert torch.equal(got, want)
    for a, b in zip(got_logits, want_logits):
        torch.testing.assert_close(a, b.flatten(0, 1), atol=0, rtol=0)
    assert torch.equal(expand(model, labels, (cfg.grid_size, cfg.grid_size), num_steps=5, **kw).flatten(1), want)


def test_expand_grid_rope_and_pages(make_model):
    model = make_model("ARPG-tiny-g8", std=0.05)
    cfg = model.config
    hd, base = cfg.head_dim, cfg.rope_base
    rows, cols = 8, 16
    table = model.rope_table("cpu", (rows, cols))
    assert table.shape == (rows * cols + 1, hd // 2, 2) and torch.all(table[0] == 0)
    freqs = [base ** (-2 * k / (hd / 2)) for k in range(hd // 4)]
    for p in (1, 2, 16, 17, 100, rows * cols):
        r, c = divmod(p - 1, cols)
        angles = torch.tensor([r * f for f in freqs] + [c * f for f in freqs], dtype=torch.float64)
        torch.testing.assert_close(table[p, :, 0].double(), angles.cos(), atol=1e-6, rtol=0)
        torch.testing.assert_close(table[p, :, 1].double(), angles.sin(), atol=1e-6, rtol=0)
    assert torch.equal(model.rope_table("cpu"), precompute_rope_2d((8, 8), hd, base))

    out = expand(model, [2, 3], (rows, cols), num_steps=8, seed=0, cfg_scale=2.0, page_size=8)
    assert out.shape == (2, rows, cols) and out.dtype == torch.long
    assert int(out.min()) >= 0 and int(out.max()) < cfg.vocab_size
    engine = _ENGINES[model]
    assert engine.pages_per_seq == math.ceil((rows * cols + 1) / 8) and engine.cache.sequences == []

    # The queries and keys use the larger grid's positions: teacher-forced logits match the dense oracle.
    g = torch.Generator().manual_seed(0)
    teacher = torch.randint(0, cfg.vocab_size, (1, rows, cols), generator=g)
    order = torch.randperm(rows * cols, generator=g)
    tile = torch.zeros(rows, cols, dtype=torch.bool)
    tile[:, :8] = True  # a known 8x8 tile on the left
    _, logits = expand(model, [4], (rows, cols), known=(teacher, tile), num_steps=5, order=order,
                       teacher_tokens=teacher, return_logits=True)
    want = dense_oracle(model, teacher.flatten(), tile.flatten(), 4, order.tolist(), 5, (rows, cols))
    assert len(logits) == len(want) == 5
    for x, y in zip(logits, want):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_outpaint_places_the_tile(make_model):
    model = make_model()
    cfg = model.config
    g = torch.Generator().manual_seed(6)
    tile = torch.randint(0, cfg.vocab_size, (2, 2, 3), generator=g)
    out = outpaint(model, tile, (4, 6), (1, 2), [0, 1], 4, seed=3)
    assert out.shape == (2, 4, 6) and torch.equal(out[:, 1:3, 2:5], tile)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1:3, 2:5] = True
    canvas = torch.zeros(2, 4, 6, dtype=torch.long)
    canvas[:, 1:3, 2:5] = tile
    assert torch.equal(expand(model, [0, 1], (4, 6), known=(canvas, mask), num_steps=4, seed=3), out)
    # On the model's own grid, outpainting is inpainting with the tile known.
    small = outpaint(model, tile, (4, 4), (2, 1), [0, 1], 3, seed=4)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[2:4, 1:4] = True
    canvas = torch.zeros(2, 4, 4, dtype=torch.long)
    canvas[:, 2:4, 1:4] = tile
    assert torch.equal(inpaint(model, canvas.flatten(1), mask.flatten(), [0, 1], 3, seed=4), small.flatten(1))


def test_edit_input_errors(make_model):
    model = make_model()
    cfg = model.config
    L = cfg.seq_len
    tokens = torch.zeros(2, L, dtype=torch.long)
    known = torch.zeros(2, L, dtype=torch.bool)
    with pytest.raises(ValueError, match="tokens must have shape"):
        inpaint(model, tokens[:, :-1], known, [0, 1], 4)
    with pytest.raises(ValueError, match="tokens must hold integer"):
        inpaint(model, tokens.float(), known, [0, 1], 4)
    with pytest.raises(ValueError, match="known must be a torch.bool"):
        inpaint(model, tokens, known.long(), [0, 1], 4)
    with pytest.raises(ValueError, match="known must have shape"):
        inpaint(model, tokens, known[:, :5], [0, 1], 4)
    with pytest.raises(ValueError, match="labels has 3"):
        inpaint(model, tokens, known, [0, 1, 2], 4)
    with pytest.raises(ValueError, match="labels must be < num_classes"):
        inpaint(model, tokens, known, [0, cfg.num_classes], 4)
    with pytest.raises(ValueError, match="num_steps"):
        inpaint(model, tokens, known, [0, 1], 0)
    with pytest.raises(ValueError, match="known tokens must be image token ids"):
        inpaint(model, tokens - 1, ~known, [0, 1], 4)
    with pytest.raises(ValueError, match="seed has 1 entries"):
        inpaint(model, tokens, known, [0, 1], 4, seed=[1])
    with pytest.raises(ValueError, match="order has 3 rows"):
        inpaint(model, tokens, known, [0, 1], 4, order=torch.stack([torch.arange(L)] * 3))
    with pytest.raises(ValueError, match="does not fit the 4x4 canvas"):
        outpaint(model, tokens.view(2, 4, 4)[:, :2], (4, 4), (3, 0), [0, 1], 4)
    with pytest.raises(ValueError, match="canvas must be a pair"):
        outpaint(model, tokens.view(2, 4, 4), 4, (0, 0), [0, 1], 4)
    with pytest.raises(ValueError, match=r"known\[1\] \(mask\) must be a torch.bool"):
        expand(model, [0, 1], (4, 8), known=(torch.zeros(2, 4, 8, dtype=torch.long), torch.zeros(4, 8)), num_steps=2)
    with pytest.raises(ValueError, match="ARPG model"):
        inpaint(make_model("Raster-tiny"), tokens, known, [0, 1], 4)
    # More steps than unknown tokens: every sample is clamped to its own count.
    few = random_known([L - 2, L - 1], L)
    out, logits = inpaint(model, tokens, few, [0, 1], 50, seed=0, return_logits=True)
    assert len(logits) == 2 and [x.shape[0] for x in logits] == [2, 1]


def test_varlen_edit_with_triton_kernels(make_model):
    pytest.importorskip("arpg_kernels.triton")
    model = make_model(std=0.05)
    cfg = model.config
    truth = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(8))
    known = random_known([3, 12], cfg.seq_len, seed=9)
    tokens, ref = inpaint(model, truth, known, [2, 5], 2, seed=[1, 2], return_logits=True)
    with ak.use_backend("triton"):
        got_tokens, got = inpaint(model, truth, known, [2, 5], 2, seed=[1, 2], teacher_tokens=tokens,
                                  return_logits=True)
    assert torch.equal(got_tokens, tokens)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_edit_cuda_graphs_match_launches(make_model):
    from arpg import Engine

    model = make_model("ARPG-tiny-g8", std=0.05).cuda()
    cfg = model.config
    truth = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len), device="cuda")
    shared = random_known([20], cfg.seq_len)[0].cuda()  # uniform steps: graphs
    varlen = random_known([0, 20, 50], cfg.seq_len).cuda()  # varlen steps: direct launches
    for known in (shared, varlen):
        kw = dict(seed=[1, 2, 3], cfg_scale=2.0, return_logits=True)
        _ENGINES.pop(model, None)
        plain, ref = inpaint(model, truth, known, [1, 2, 3], 6, use_cuda_graphs=False, **kw)
        _ENGINES.pop(model, None)
        graphed, got = inpaint(model, truth, known, [1, 2, 3], 6, use_cuda_graphs=True, teacher_tokens=plain, **kw)
        assert torch.equal(graphed, plain)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    out = expand(model, [1, 2], (8, 16), num_steps=8, seed=0, cfg_scale=2.0)
    assert out.shape == (2, 8, 16)
    assert isinstance(_ENGINES[model], Engine) and len(_ENGINES[model]._graphs) > 0
