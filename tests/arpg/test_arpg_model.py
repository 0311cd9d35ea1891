"""The training forward against an independent float64 re-computation of DESIGN.md section 1, and training."""

import math

import pytest
import torch

import arpg_kernels as ak
from arpg import CONFIGS, RasterLM, apply_rope, precompute_rope_2d


# The oracle: DESIGN.md section 1 written out with loops, in float64, from the state dict alone.


def rope_angles(p, head_dim, grid, base):
    """(cos, sin) lists of head_dim // 2 entries for position p (0 = class token: all zeros)."""
    if p == 0:
        return [0.0] * (head_dim // 2), [0.0] * (head_dim // 2)
    row, col = divmod(p - 1, grid)
    quarter = head_dim // 4
    angles = []
    for k in range(head_dim // 2):
        f = base ** (-2 * (k % quarter) / (head_dim / 2))
        angles.append((row if k < quarter else col) * f)
    return [math.cos(a) for a in angles], [math.sin(a) for a in angles]


def rotate(x, p, cfg):
    """x: [H, D] float64 -> rotated copy."""
    cos, sin = rope_angles(p, cfg.head_dim, cfg.grid_size, cfg.rope_base)
    out = x.clone()
    for k in range(cfg.head_dim // 2):
        a, b = x[:, 2 * k], x[:, 2 * k + 1]
        out[:, 2 * k] = a * cos[k] - b * sin[k]
        out[:, 2 * k + 1] = b * cos[k] + a * sin[k]
    return out


def rmsnorm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def ffn(x, sd, pre):
    a, b = x @ sd[pre + "ffn.w1.weight"].T, x @ sd[pre + "ffn.w3.weight"].T
    return (a * torch.sigmoid(a) * b) @ sd[pre + "ffn.w2.weight"].T


def attend(q, k, v, n_visible):
    """q: [Lq, H, D]; k, v: [Lk, H, D]; query i sees keys 0..n_visible(i)-1. Returns [Lq, H * D]."""
    lq, h, d = q.shape
    out = torch.zeros(lq, h, d, dtype=q.dtype)
    for i in range(lq):
        n = n_visible(i)
        for hh in range(h):
            s = (k[:n, hh] @ q[i, hh]) / math.sqrt(d)
            out[i, hh] = torch.softmax(s, 0) @ v[:n, hh]
    return out.reshape(lq, h * d)


def oracle_logits(model, tokens, label_ids, orders):
    cfg = model.config
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    h, d, eps = cfg.n_head, cfg.head_dim, cfg.norm_eps
    out = []
    for b in range(tokens.shape[0]):
        sigma = orders[b].tolist()
        content_ids = [int(label_ids[b])] + [int(tokens[b, t]) for t in sigma[:-1]]
        content_pos = [0] + [t + 1 for t in sigma[:-1]]
        query_pos = [t + 1 for t in sigma]
        x = sd["embeddings.weight"][content_ids]
        seq = x.shape[0]
        for i in range(cfg.n_layer // 2):
            pre = f"layers.self_dec.{i}."
            xn = rmsnorm(x, sd[pre + "attn_norm.weight"], eps)
            q = (xn @ sd[pre + "attn.to_q.weight"].T).view(seq, h, d)
            k = (xn @ sd[pre + "attn.to_k.weight"].T).view(seq, h, d)
            v = (xn @ sd[pre + "attn.to_v.weight"].T).view(seq, h, d)
            q = torch.stack([rotate(q[j], content_pos[j], cfg) for j in range(seq)])
            k = torch.stack([rotate(k[j], content_pos[j], cfg) for j in range(seq)])
            x = x + attend(q, k, v, lambda j: j + 1) @ sd[pre + "attn.proj.weight"].T
            x = x + ffn(rmsnorm(x, sd[pre + "ffn_norm.weight"], eps), sd, pre)
        xn = rmsnorm(x, sd["layers.norm.weight"], eps)
        k = (xn @ sd["layers.to_k.weight"].T).view(seq, h, d)
        k = torch.stack([rotate(k[j], content_pos[j], cfg) for j in range(seq)])
        v = (xn @ sd["layers.to_v.weight"].T).view(seq, h, d)
        y = sd["embeddings.weight"][cfg.mask_token_id].expand(seq, -1).clone()
        for i in range(cfg.n_layer // 2):
            pre = f"layers.cross_dec.{i}."
            q = (rmsnorm(y, sd[pre + "attn_norm.weight"], eps) @ sd[pre + "attn.to_q.weight"].T).view(seq, h, d)
            q = torch.stack([rotate(q[j], query_pos[j], cfg) for j in range(seq)])
            y = y + attend(q, k, v, lambda j: j + 1) @ sd[pre + "attn.proj.weight"].T
            y = y + ffn(rmsnorm(y, sd[pre + "ffn_norm.weight"], eps), sd, pre)
        out.append(rmsnorm(y, sd["norm.weight"], eps) @ sd["head.weight"].T)
    return torch.stack(out)


def test_rope_table_layout():
    cfg = CONFIGS["ARPG-tiny-g8"]
    table = precompute_rope_2d(cfg.grid_size, cfg.head_dim, cfg.rope_base)
    assert table.shape == (cfg.seq_len + 1, cfg.head_dim // 2, 2) and table.dtype == torch.float32
    assert torch.all(table[0] == 0)
    for p in (1, 2, 9, 17, 64):
        cos, sin = rope_angles(p, cfg.head_dim, cfg.grid_size, cfg.rope_base)
        torch.testing.assert_close(table[p, :, 0].double(), torch.tensor(cos, dtype=torch.float64), atol=1e-6, rtol=0)
        torch.testing.assert_close(table[p, :, 1].double(), torch.tensor(sin, dtype=torch.float64), atol=1e-6, rtol=0)


def test_class_token_rotates_to_zero():
    table = precompute_rope_2d(4, 32)
    x = torch.randn(3, 2, 32)
    out = apply_rope(x, table[torch.tensor([0, 5, 0])])
    assert torch.all(out[0] == 0) and torch.all(out[2] == 0)
    torch.testing.assert_close(out[1].norm(dim=-1), x[1].norm(dim=-1))


@pytest.mark.parametrize("name", ["ARPG-tiny", "ARPG-tiny-g8"])
def test_training_forward_matches_oracle(name, make_model):
    model = make_model(name)
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g)
    labels = torch.tensor([3, -1])
    orders = torch.stack([torch.randperm(cfg.seq_len, generator=g) for _ in range(2)])
    logits, loss = model(tokens, labels, orders=orders)
    assert logits.dtype == torch.float32 and logits.shape == (2, cfg.seq_len, cfg.vocab_size)
    label_ids = torch.tensor([cfg.class_token_id(3), cfg.null_class_id])
    ref = oracle_logits(model, tokens, label_ids, orders)
    torch.testing.assert_close(logits.double(), ref, atol=2e-5, rtol=2e-5)
    targets = tokens.gather(1, orders)
    ref_loss = torch.nn.functional.cross_entropy(ref.reshape(-1, cfg.vocab_size), targets.reshape(-1))
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-5)


def test_random_orders_and_class_dropout(make_model):
    model = make_model()
    cfg = model.config
    tokens = torch.randint(0, cfg.vocab_size, (64, cfg.seq_len))
    labels = torch.randint(0, cfg.num_classes, (64,))
    model.eval()
    a, _ = model(tokens, labels, generator=torch.Generator().manual_seed(5))
    b, _ = model(tokens, labels, generator=torch.Generator().manual_seed(5))
    c, _ = model(tokens, labels, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Train mode drops about class_dropout of the labels to the no-class id.
    model.train()
    seen = {}

    def spy(module, args):
        seen["ids"] = args[0][:, 0].clone()

    handle = model.embeddings.register_forward_pre_hook(spy)
    try:
        model(tokens, labels, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    dropped = (seen["ids"] == cfg.null_class_id).sum().item()
    assert 0 < dropped < 20
    kept = seen["ids"] != cfg.null_class_id
    assert torch.equal(seen["ids"][kept], labels[kept] + cfg.vocab_size + 1)


def test_context_feeds_other_tokens_against_the_same_targets(make_model):
    model = make_model().eval()
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len), generator=g)
    labels = torch.tensor([0, 1, 2])
    orders = torch.rand(3, cfg.seq_len, generator=g).argsort(1)
    base, base_loss = model(tokens, labels, orders=orders)
    same, same_loss = model(tokens, labels, orders=orders, context=tokens.clone())
    assert torch.equal(base, same) and torch.equal(base_loss, same_loss)
    # Corrupt the token decoded 5th: logits 0..5 only see the class and the first 5 tokens, so they keep.
    context = tokens.clone()
    pos = orders[:, 5]
    context[torch.arange(3), pos] = (tokens[torch.arange(3), pos] + 1) % cfg.vocab_size
    got, got_loss = model(tokens, labels, orders=orders, context=context)
    torch.testing.assert_close(got[:, :6], base[:, :6])
    assert not torch.allclose(got[:, 6:], base[:, 6:])
    # The loss is still against `tokens`: recomputing it from the logits and the clean targets agrees.
    want = torch.nn.functional.cross_entropy(got.reshape(-1, cfg.vocab_size), tokens.gather(1, orders).reshape(-1))
    torch.testing.assert_close(got_loss, want)


def _train(model, steps, seed=0, lr=3e-3):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    # A learnable toy distribution: token t of an image of class c is (c + t) mod V.
    labels = torch.arange(4) % cfg.num_classes
    tokens = (labels[:, None] + torch.arange(cfg.seq_len)[None, :]) % cfg.vocab_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        _, loss = model(tokens, labels, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_adamw_lowers_loss(make_model):
    model = make_model(std=0.02).train()
    losses = _train(model, 30)
    assert losses[-1] < 0.7 * losses[0]


def test_raster_lm_adamw_lowers_loss(make_model):
    model = make_model("Raster-tiny", std=0.02, cls=RasterLM).train()
    losses = _train(model, 30)
    assert losses[-1] < 0.7 * losses[0]


def test_triton_backend_same_loss_curve(make_model):
    pytest.importorskip("arpg_kernels.triton")
    ref_model = make_model(std=0.02).train()
    tri_model = make_model(std=0.02).train()
    ref = _train(ref_model, 3)
    with ak.use_backend("triton"):
        tri = _train(tri_model, 3)
    assert ref[-1] < ref[0]
    torch.testing.assert_close(torch.tensor(tri), torch.tensor(ref), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("field", ["token_dropout", "resid_dropout", "ffn_dropout", "drop_path"])
def test_training_regularisation_is_train_mode_only(make_model, field):
    import dataclasses

    from arpg import ARPG

    plain = make_model()
    cfg = dataclasses.replace(plain.config, **{field: 0.5})
    model = ARPG(cfg)
    model.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (8, cfg.seq_len))
    labels = torch.randint(0, cfg.num_classes, (8,))
    orders = torch.rand(8, cfg.seq_len).argsort(1)
    want, _ = plain(tokens, labels, orders=orders)
    got, _ = model.eval()(tokens, labels, orders=orders)
    assert torch.equal(got, want)  # eval (and decoding): no dropout at all
    model.train()
    torch.manual_seed(0)
    a, _ = model(tokens, labels, orders=orders, class_dropout=0.0)
    torch.manual_seed(1)
    b, _ = model(tokens, labels, orders=orders, class_dropout=0.0)
    assert not torch.equal(a, b) and not torch.equal(a, want)
    plain.train()
    c, _ = plain(tokens, labels, orders=orders, class_dropout=0.0)
    assert torch.equal(c, want)  # with the rates at 0, train mode is the eval computation
    if field == "drop_path":  # linear from 0 at the first self layer to the rate at the last cross layer
        rates = [layer.drop_path for layer in [*model.layers.self_dec, *model.layers.cross_dec]]
        assert rates[0] == 0.0 and rates[-1] == 0.5 and rates == sorted(rates)
