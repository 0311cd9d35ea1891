"""The paged engine: step-by-step agreement with the eager oracle and the training forward, plans, seeds."""

import pytest
import torch

import arpg_kernels as ak
from arpg import ARPG, Engine, cfg_scales, eager_generate, generate, token_schedule
from arpg.config import ARPGConfig
from arpg.engine import _ENGINES


def assert_steps_close(got, want, atol=1e-5, rtol=1e-5):
    assert len(got) == len(want)
    for s, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, f"step {s}"
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"step {s}: {m}")


@pytest.mark.parametrize(
    "name, num_steps, cfg_scale, cfg_schedule",
    [
        ("ARPG-tiny", 5, 1.0, "constant"),
        ("ARPG-tiny", 4, 3.0, "linear"),
        ("ARPG-tiny-g8", 8, 2.0, "constant"),
    ],
)
def test_engine_matches_eager(make_model, name, num_steps, cfg_scale, cfg_schedule):
    model = make_model(name, std=0.05)
    labels = torch.tensor([1, 7, -1])
    kw = dict(cfg_scale=cfg_scale, cfg_schedule=cfg_schedule, top_k=20, top_p=0.95, temperature=1.2)
    tokens, logits = generate(model, labels, num_steps, seed=11, return_logits=True, **kw)
    # The oracle fed the engine's tokens: the same order comes from the same seed.
    ref_tokens, ref_logits = eager_generate(
        model, labels, num_steps, seed=11, return_logits=True, teacher_tokens=tokens, **kw
    )
    assert torch.equal(ref_tokens, tokens)
    assert_steps_close(logits, ref_logits)
    counts = token_schedule(num_steps, model.config.seq_len)
    rows = 2 * len(labels) if cfg_scale != 1.0 else len(labels)
    assert [tuple(x.shape) for x in logits] == [(rows, n, model.config.vocab_size) for n in counts]
    # Sampling itself is shared: the oracle left to sample on its own draws the same tokens.
    assert torch.equal(eager_generate(model, labels, num_steps, seed=11, **kw), tokens)


def test_one_token_per_step_equals_training_forward(make_model):
    model = make_model("ARPG-tiny-g8", std=0.05)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(cfg.seq_len, generator=g)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g)
    labels = torch.tensor([4, -1])
    out, logits = generate(
        model, labels, cfg.seq_len, schedule=[1] * cfg.seq_len, order=order, teacher_tokens=tokens, return_logits=True
    )
    assert torch.equal(out, tokens)
    with torch.no_grad():
        train_logits, _ = model(tokens, labels, orders=order.expand(2, -1))
    torch.testing.assert_close(torch.cat(logits, dim=1), train_logits, atol=1e-5, rtol=1e-5)


def test_every_position_filled_once(make_model, poison_empty):
    model = make_model()
    cfg = model.config
    teacher = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len))
    for n in (1, 3, cfg.seq_len):
        out = generate(model, torch.tensor([0, 1, 2]), n, seed=n, teacher_tokens=teacher, cfg_scale=2.0)
        assert torch.equal(out, teacher)


def test_determinism_by_seed(make_model):
    model = make_model("ARPG-tiny-g8")
    labels = torch.tensor([2, 5])
    a = generate(model, labels, 6, seed=123, cfg_scale=1.5)
    b = generate(model, labels, 6, seed=123, cfg_scale=1.5)
    c = generate(model, labels, 6, generator=torch.Generator().manual_seed(123), cfg_scale=1.5)
    d = generate(model, labels, 6, seed=124, cfg_scale=1.5)
    assert torch.equal(a, b) and torch.equal(a, c) and not torch.equal(a, d)
    assert a.dtype == torch.long and a.shape == (2, 64)
    assert int(a.min()) >= 0 and int(a.max()) < model.config.vocab_size


def test_any_number_of_steps(make_model):
    model = make_model("ARPG-tiny-g16")
    cfg = model.config
    for n in (1, 2, 3, 17, 64, 255, 256):
        out, logits = generate(model, torch.tensor([1]), n, seed=n, return_logits=True, schedule="cosine")
        assert out.shape == (1, 256) and len(logits) == n
        assert [x.shape[1] for x in logits] == token_schedule(n, cfg.seq_len, "cosine")
    with pytest.raises(ValueError, match="num_steps"):
        generate(model, torch.tensor([1]), 257)


def test_cfg_rows_are_conditional_then_unconditional(make_model):
    model = make_model()
    cfg = model.config
    order = torch.randperm(cfg.seq_len)
    teacher = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    _, guided = generate(model, torch.tensor([3, 4]), 4, cfg_scale=4.0, order=order, teacher_tokens=teacher,
                         return_logits=True)
    _, cond = generate(model, torch.tensor([3, 4]), 4, order=order, teacher_tokens=teacher, return_logits=True)
    _, uncond = generate(model, torch.tensor([-1, -1]), 4, order=order, teacher_tokens=teacher, return_logits=True)
    assert_steps_close([x[:2] for x in guided], cond)
    assert_steps_close([x[2:] for x in guided], uncond)


def test_greedy_equals_top_k_1(make_model):
    model = make_model()
    labels = torch.tensor([0, 9])
    a = generate(model, labels, 4, seed=1, temperature=0.0, cfg_scale=2.0)
    b = generate(model, labels, 4, seed=1, top_k=1, cfg_scale=2.0)
    assert torch.equal(a, b)


def test_engine_reuse_and_page_sizes(make_model):
    model = make_model()
    labels = torch.tensor([1, 2])
    a, la = generate(model, labels, 3, seed=0, return_logits=True)
    engine = _ENGINES[model]
    generate(model, labels[:1], 3, seed=0)
    assert _ENGINES[model] is engine and engine.cache.sequences == []
    assert engine.cache.num_free_pages == engine.cache.num_pages
    c, lc = generate(model, labels, 3, seed=0, page_size=4, return_logits=True)
    assert torch.equal(a, c)
    assert_steps_close(lc, la)
    # An explicit engine, kept by the caller, gives the same result.
    eng = Engine(model, max_rows=2, page_size=8)
    assert torch.equal(eng.generate(labels, 3, seed=0), a)
    with pytest.raises(ValueError, match="rows"):
        eng.generate(labels, 3, seed=0, cfg_scale=2.0)


def test_engine_with_triton_kernels(make_model):
    pytest.importorskip("arpg_kernels.triton")
    model = make_model(std=0.05)
    labels = torch.tensor([5])
    tokens, ref = generate(model, labels, 2, seed=3, cfg_scale=2.0, return_logits=True)
    with ak.use_backend("triton"):
        got_tokens, got = generate(model, labels, 2, seed=3, cfg_scale=2.0, teacher_tokens=tokens,
                                   return_logits=True)
    assert torch.equal(got_tokens, tokens)
    assert_steps_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("path", ["engine", "eager"])
def test_guidance_is_the_formula(make_model, path):
    # Greedy decoding picks argmax(u + (c - u) * g) of the step's own logits, g the step's scale.
    model = make_model("ARPG-tiny", std=0.5)
    seq_len = model.config.seq_len
    order = torch.randperm(seq_len, generator=torch.Generator().manual_seed(2))
    labels, num_steps, g = torch.tensor([3, 5]), 4, 4.0
    run = generate if path == "engine" else eager_generate
    tokens, logits = run(model, labels, num_steps, order=order, cfg_scale=g, cfg_schedule="linear",
                         temperature=0.0, return_logits=True)
    counts = token_schedule(num_steps, seq_len)
    scales = cfg_scales(counts, seq_len, g, "linear")
    assert len(set(scales)) == num_steps  # the ramp: each step its own scale
    done = 0
    for n, step_logits, scale in zip(counts, logits, scales):
        c, u = step_logits.double().chunk(2)
        want = (u + (c - u) * scale).argmax(-1)
        assert torch.equal(tokens[:, order[done : done + n]], want)
        done += n


def test_step_fusions_off_gives_the_same_tokens():
    # RoPE inside the append and the one-op sampler against RoPE, append and sampling as separate ops.
    from arpg.model import step_fusions

    torch.manual_seed(0)
    model = ARPG(ARPGConfig(dim=64, n_layer=2, n_head=2, vocab_size=64, num_classes=4, grid_size=4)).eval()
    with torch.no_grad():  # the initial head gives every token the same logit: top-p would only meet ties,
        model.head.weight.normal_()  # which the fused sampler keeps whole and the torch ops cut in sort order
    labels = torch.tensor([0, 3])
    fused = generate(model, labels, num_steps=5, cfg_scale=3.0, top_k=20, top_p=0.9, seed=1)
    with step_fusions(False):
        unfused = generate(model, labels, num_steps=5, cfg_scale=3.0, top_k=20, top_p=0.9, seed=1)
    assert torch.equal(fused, unfused)


def _record_guided_steps(monkeypatch, model, seen):
    """Make each guided `decode_step` also run unguided on a copy of the cache as it was, and record both:
    (guided logits, `guide` of the unguided logits' conditional and unconditional halves)."""
    from arpg.sampling import guide

    real = model.decode_step

    def step(tokens, pos_in, pos_q, cache, batch, guidance=None, **kw):
        if guidance is None:
            seen.append(None)
            return real(tokens, pos_in, pos_q, cache, batch, **kw)
        k, v = cache.k_pool.clone(), cache.v_pool.clone()
        c, u = real(tokens, pos_in, pos_q, cache, batch, **kw).chunk(2)
        cache.k_pool.copy_(k)
        cache.v_pool.copy_(v)
        got = real(tokens, pos_in, pos_q, cache, batch, guidance=guidance, **kw)
        seen.append((got, guide(c, u, guidance)))
        return got

    monkeypatch.setattr(model, "decode_step", step)
    monkeypatch.setattr(model, "decode_loop", lambda *a, **kw: False)  # a step at a time, through `step`


@pytest.mark.parametrize("name", ["ARPG-tiny", "Raster-tiny"])
def test_guidance_before_the_head_gives_the_guided_logits(make_model, monkeypatch, name):
    # The head is linear without a bias: head(u + (c - u) * g) is u' + (c' - u') * g of the logits, rounded
    # otherwise. The engine takes it for guided sampling on the devices of GUIDED_HEAD (the CPU).
    from arpg.model import guided_head

    model = make_model(name, std=0.3)
    labels = torch.tensor([3, 5, -1])
    kw = dict(cfg_scale=3.0, cfg_schedule="linear", seed=[1, 2, 3], top_k=20)
    steps = {} if name.startswith("Raster") else {"num_steps": 5}
    seen = []
    _record_guided_steps(monkeypatch, model, seen)
    tokens = generate(model, labels, **steps, **kw)
    assert seen and all(s is not None for s in seen)
    for got, want in seen:
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    seen.clear()
    with guided_head(False):  # the original's order: both rows' logits, guided in the sampler
        other = generate(model, labels, **steps, **kw)
    assert seen and all(s is None for s in seen)
    # The same draws on logits a rounding apart: a token differs only where a uniform falls within that of a
    # boundary between two tokens.
    assert (other == tokens).float().mean() > 0.95


def test_guidance_before_the_head_only_where_it_applies(make_model, monkeypatch):
    from arpg import model as arpg_model

    model = make_model()
    labels = torch.tensor([1, 2])
    seen = []
    _record_guided_steps(monkeypatch, model, seen)

    def guided_calls(**kw):
        seen.clear()
        generate(model, labels, 3, seed=0, **kw)
        return sum(s is not None for s in seen), len(seen)

    assert guided_calls(cfg_scale=2.0) == (3, 3)
    assert guided_calls() == (0, 3)  # no guidance
    assert guided_calls(cfg_scale=2.0, return_logits=True)[0] == 0  # both rows' logits asked for
    teacher = torch.randint(0, model.config.vocab_size, (2, model.config.seq_len))
    assert guided_calls(cfg_scale=2.0, teacher_tokens=teacher)[0] == 0  # nothing sampled
    arpg_model.GUIDED_HEAD.discard("cpu")  # a set edited in place, as FUSED_ROPE_APPEND
    try:
        assert guided_calls(cfg_scale=2.0)[0] == 0
    finally:
        arpg_model.GUIDED_HEAD.add("cpu")


@pytest.mark.parametrize("name", ["ARPG-tiny", "Raster-tiny"])
def test_decode_step_refuses_a_bad_guidance(make_model, name):
    from arpg.engine import Engine, generation_plans

    model = make_model(name)
    engine = Engine(model, 4)
    plans = generation_plans(model, 2, 4 if name.startswith("ARPG") else None, "arccos", 2.0, "constant", None, None)
    seq_ids, inputs = engine._prepare([list(p) for p in plans], 4, model.config.seq_len)
    try:
        inp = inputs[0]
        tokens = torch.cat([model.class_ids(torch.tensor([0, 1])), torch.full((2,), model.config.null_class_id)])
        rows = (inp.pos_q if name.startswith("ARPG") else tokens).shape[0]
        before = engine.cache.k_pool.clone()
        for bad in (inp.cfg.double(), inp.cfg[:-1], inp.cfg.view(-1), torch.ones(rows, 1), 2.0,
                    inp.cfg.to("meta")):
            with torch.inference_mode(), pytest.raises(ValueError, match=r"guidance must be float32 \[rows / 2, 1\] on cpu"):
                model.decode_step(tokens, inp.pos_in, inp.pos_q, engine.cache, inp.batch, guidance=bad)
        assert torch.equal(engine.cache.k_pool, before)  # refused before anything ran
        with torch.inference_mode():
            out = model.decode_step(tokens, inp.pos_in, inp.pos_q, engine.cache, inp.batch, guidance=inp.cfg)
        assert out.shape == (rows // 2, model.config.vocab_size)
    finally:
        engine.cache.free(seq_ids)


def test_a_decode_step_without_guidance_gets_its_logits_guided(make_model):
    # A model of the user's whose decode_step predates the guidance argument still decodes with guidance.
    from arpg.model import guided_head

    model = make_model()

    class OwnStep(ARPG):
        def decode_step(self, tokens, pos_in, pos_q, cache, batch, grid=None, causal=False):
            return super().decode_step(tokens, pos_in, pos_q, cache, batch, grid=grid, causal=causal)

    own = OwnStep(model.config).eval()
    own.load_state_dict(model.state_dict())
    labels = torch.tensor([2, 7])
    with guided_head(False):
        want = generate(model, labels, 4, seed=5, cfg_scale=3.0)
    assert torch.equal(Engine(own, 4).generate(labels, 4, seed=5, cfg_scale=3.0), want)
