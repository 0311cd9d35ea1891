"""The op contract: reference vs independent float64 computations, opcheck, errors, backend dispatch."""

import pytest
import torch

import arpg_kernels as ak
from arpg_kernels import reference
from kv_cases import make_paged_case, naive_paged_attention, tolerance

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# paged_attention -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(40))
def test_paged_attention_matches_float64(seed, dtype):
    case = make_paged_case(seed, dtype=dtype, head_dims=(8, 32, 59, 64))
    out, lse = ak.paged_attention(*case.args(), causal=case.causal, return_lse=True)
    want_out, want_lse = naive_paged_attention(case)
    assert out.dtype == dtype and out.shape == case.q.shape
    assert lse.dtype == torch.float32 and lse.shape == case.q.shape[:2]
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double(), want_out, atol=tolerance(dtype) * 4, rtol=tolerance(dtype))
    torch.testing.assert_close(lse.double(), want_lse, atol=tolerance(dtype) * 4, rtol=1e-4)


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_paged_attention_page_sizes_and_scale(page_size):
    case = make_paged_case(7, page_sizes=(page_size,), max_kv=150, causal=False)
    out, _ = ak.paged_attention(*case.args(), causal=False, scale=0.3)
    want, _ = naive_paged_attention(case, scale=0.3)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_paged_attention_empty_query_gets_zero_and_neg_inf():
    case = make_paged_case(3, max_b=3, causal=True)
    case.kv_lens.zero_()
    out, lse = ak.paged_attention(*case.args(), causal=True, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


def test_paged_attention_causal_more_queries_than_keys():
    # 5 queries against 2 keys: bottom-right alignment leaves the first 3 queries without a key.
    q = torch.randn(5, 2, 16)
    kc, vc = torch.randn(2, 4, 1, 16), torch.randn(2, 4, 1, 16)
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    out, lse = ak.paged_attention(
        q, kc, vc, table, torch.tensor([2], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32), 5,
        causal=True, return_lse=True,
    )
    assert torch.equal(out[:3], torch.zeros_like(out[:3])) and torch.isneginf(lse[:3]).all()
    assert torch.allclose(out[4], torch.softmax(q[4] @ kc[1, :2, 0].T * 0.25, -1) @ vc[1, :2, 0], atol=1e-6)


def test_paged_attention_without_lse_returns_empty():
    case = make_paged_case(1)
    _, lse = ak.paged_attention(*case.args())
    assert lse.numel() == 0 and lse.dtype == torch.float32


def test_paged_attention_no_sequences():
    q = torch.zeros(0, 2, 16)
    kc = torch.zeros(1, 4, 2, 16)
    out, lse = ak.paged_attention(
        q, kc, kc, torch.zeros(0, 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
        torch.zeros(1, dtype=torch.int32), 0, return_lse=True,
    )
    assert out.shape == (0, 2, 16) and lse.shape == (0, 2)


def test_paged_attention_reads_a_layer_of_a_pool():
    cache = ak.PagedKVCache(3, 6, 4, 2, 16, torch.float32)
    ids = cache.add_sequences(2)
    slots = cache.reserve(ids, [7, 3])
    for layer in range(3):
        k = torch.randn(10, 2, 16)
        ak.append_kv(k, k * 2, *cache.layer(layer), slots)
    q = torch.randn(4, 4, 16)
    cu = torch.tensor([0, 1, 4], dtype=torch.int32)
    out, _ = ak.paged_attention(q, *cache.layer(1), cache.block_table(ids), cache.kv_lens(ids), cu, 3)
    k_dense = cache.k_pool[1].clone()
    out2, _ = ak.paged_attention(q, k_dense, cache.v_pool[1].clone(), cache.block_table(ids), cache.kv_lens(ids), cu, 3)
    torch.testing.assert_close(out, out2)


# append_kv ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(6))
def test_append_kv_scatters_rows_and_skips_minus_one(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    num_pages, ps, hkv, d = 5, [1, 4, 16][seed % 3], 2, 8
    n_slots = num_pages * ps
    t = min(n_slots, 7)
    slots = torch.randperm(n_slots, generator=g)[:t]
    slots[torch.rand(t, generator=g) < 0.3] = -1
    k, v = torch.randn(t, hkv, d, generator=g).to(dtype), torch.randn(t, hkv, d, generator=g).to(dtype)
    kc = torch.randn(num_pages, ps, hkv, d, generator=g).to(dtype)
    vc = torch.randn(num_pages, ps, hkv, d, generator=g).to(dtype)
    want_k, want_v = kc.clone().view(n_slots, hkv, d), vc.clone().view(n_slots, hkv, d)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s], want_v[s] = k[i], v[i]
    ak.append_kv(k, v, kc, vc, slots)
    assert torch.equal(kc.view(n_slots, hkv, d), want_k) and torch.equal(vc.view(n_slots, hkv, d), want_v)


# attention ------------------------------------------------------------------------------------


def naive_attention(q, k, v, causal, scale=None):
    """float64 loops over batch and head; rows without keys give 0."""
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(b, lq, h, d, dtype=torch.float64)
    for i in range(b):
        for head in range(h):
            kh = head // (h // hkv)
            s = q[i, :, head].double() @ k[i, :, kh].double().T * scale
            if causal:
                allowed = torch.arange(lk)[None, :] < lk - lq + torch.arange(lq)[:, None] + 1
                s = s.masked_fill(~allowed, float("-inf"))
            p = torch.softmax(s, -1).nan_to_num(0.0)
            out[i, :, head] = p @ v[i, :, kh].double()
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "b,lq,lk,h,hkv,d,causal",
    [
        (2, 7, 7, 4, 2, 16, True),
        (1, 5, 9, 2, 2, 32, True),
        (2, 9, 5, 4, 1, 8, True),  # more queries than keys: first rows see nothing
        (3, 1, 33, 2, 1, 59, False),
        (1, 17, 17, 2, 2, 64, False),
    ],
)
def test_attention_forward_matches_float64(b, lq, lk, h, hkv, d, causal, dtype):
    g = torch.Generator().manual_seed(lq * 31 + lk)
    q = torch.randn(b, lq, h, d, generator=g).to(dtype)
    k, v = torch.randn(b, lk, hkv, d, generator=g).to(dtype), torch.randn(b, lk, hkv, d, generator=g).to(dtype)
    out = ak.attention(q, k, v, causal=causal)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, causal), atol=tolerance(dtype) * 4, rtol=tolerance(dtype))


@pytest.mark.parametrize("scale", [None, 0.6])  # None: the default 1/sqrt(16)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq,lk,h,hkv", [(6, 6, 2, 1), (3, 8, 4, 2), (8, 3, 2, 2)])
def test_attention_gradients_match_autograd_of_float64(lq, lk, h, hkv, causal, scale):
    g = torch.Generator().manual_seed(lq + 10 * lk)
    q = torch.randn(2, lq, h, 16, generator=g, requires_grad=True)
    k = torch.randn(2, lk, hkv, 16, generator=g, requires_grad=True)
    v = torch.randn(2, lk, hkv, 16, generator=g, requires_grad=True)
    out, lse = ak.attention(q, k, v, causal=causal, scale=scale, return_lse=True)
    w_out, w_lse = torch.randn_like(out), torch.randn_like(lse)
    ((out * w_out).sum() + (lse.nan_to_num(0, 0, 0) * w_lse).sum()).backward()

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    kk = k64.repeat_interleave(h // hkv, 2)
    vv = v64.repeat_interleave(h // hkv, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q64, kk) * (0.25 if scale is None else scale)
    if causal:
        allowed = torch.arange(lk)[None, :] < lk - lq + torch.arange(lq)[:, None] + 1
        s = s.masked_fill(~allowed, float("-inf"))
    lse64 = torch.logsumexp(s, -1).transpose(1, 2)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    out64 = torch.einsum("bhqk,bkhd->bqhd", p, vv)
    ((out64 * w_out.double()).sum() + (lse64.nan_to_num(0, 0, 0) * w_lse.double()).sum()).backward()
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_attention_gradcheck_reference_float64():
    q = torch.randn(1, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 4, 1, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 4, 1, 4, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        out, lse = reference.attention_forward(q, k, v, True, 0.5)
        return out

    assert torch.autograd.gradcheck(f, (q, k, v))
    out, lse = reference.attention_forward(q, k, v, True, 0.5)
    dout = torch.randn_like(out)
    dq, dk, dv = reference.attention_backward(dout, torch.zeros_like(lse), q, k, v, out, lse, True, 0.5)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), dout)
    # The LSE is float32 for every input dtype, so the backward's P is float32-exact only.
    torch.testing.assert_close((dq, dk, dv), (gq, gk, gv), atol=2e-6, rtol=2e-6)


# merge_attention_states -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_equals_attention_over_the_union(dtype):
    case = make_paged_case(11, dtype=dtype, max_kv=60, causal=False, share_pages=False)
    # Split every sequence's keys at a page boundary: first half of its pages vs the rest.
    ps = case.k_cache.shape[1]
    lens = case.kv_lens.long()
    split = ((lens // 2) // ps) * ps
    table_b = torch.zeros_like(case.block_table)
    for b in range(table_b.shape[0]):
        skip = int(split[b]) // ps
        rest = case.block_table[b, skip:]
        table_b[b, : rest.numel()] = rest
    out_a, lse_a = ak.paged_attention(case.q, case.k_cache, case.v_cache, case.block_table, split.int(), case.cu_q_lens, case.max_q_len, return_lse=True)
    out_b, lse_b = ak.paged_attention(case.q, case.k_cache, case.v_cache, table_b, (lens - split).int(), case.cu_q_lens, case.max_q_len, return_lse=True)
    out, lse = ak.merge_attention_states(out_a, lse_a, out_b, lse_b)
    want_out, want_lse = naive_paged_attention(case)
    torch.testing.assert_close(out.double(), want_out, atol=tolerance(dtype) * 4, rtol=tolerance(dtype))
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-4, rtol=1e-4)


def test_merge_of_two_empty_halves_is_zero_and_neg_inf():
    out = torch.randn(3, 2, 8)
    lse = torch.full((3, 2), float("-inf"))
    o, l = ak.merge_attention_states(out, lse, out, lse)
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(l).all()


# opcheck --------------------------------------------------------------------------------------


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("seed", range(3))
def test_opcheck_paged_attention(seed):
    case = make_paged_case(seed + 100, max_b=3, max_kv=20)
    _opcheck(torch.ops.arpg.paged_attention.default, (*case.args(), case.causal, None, True))
    _opcheck(torch.ops.arpg.paged_attention.default, (*case.args(), False, 0.5, False))


def test_opcheck_append_kv():
    kc, vc = torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)
    _opcheck(torch.ops.arpg.append_kv.default, (torch.randn(5, 2, 8), torch.randn(5, 2, 8), kc, vc, torch.tensor([0, 3, -1, 11, 5])))


def test_opcheck_attention_and_backward():
    q = torch.randn(2, 5, 4, 16, requires_grad=True)
    k, v = torch.randn(2, 6, 2, 16, requires_grad=True), torch.randn(2, 6, 2, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.arpg.attention.default, (q, k, v, True, None))
    out, lse = torch.ops.arpg.attention(q, k, v, True, None)
    _opcheck(torch.ops.arpg.attention_backward.default, (torch.randn_like(out), torch.zeros_like(lse), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), True, None))


def test_opcheck_merge():
    out = torch.randn(4, 2, 8)
    lse = torch.randn(4, 2)
    _opcheck(torch.ops.arpg.merge_attention_states.default, (out, lse, torch.randn(4, 2, 8), torch.randn(4, 2)))


def test_ops_compile_with_fullgraph():
    case = make_paged_case(5, max_b=2, max_kv=20)

    @torch.compile(fullgraph=True, backend="eager")
    def f(q, kc, vc, table, lens, cu):
        return ak.paged_attention(q * 2, kc, vc, table, lens, cu, case.max_q_len, causal=case.causal)[0]

    eager = ak.paged_attention(case.q * 2, *case.args()[1:], causal=case.causal)[0]
    torch.testing.assert_close(f(*case.args()[:6]), eager)


# errors ---------------------------------------------------------------------------------------


def _good():
    q = torch.randn(3, 4, 16)
    kc, vc = torch.randn(4, 8, 2, 16), torch.randn(4, 8, 2, 16)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    return dict(
        q=q, k_cache=kc, v_cache=vc, block_table=table, kv_lens=torch.tensor([10, 3], dtype=torch.int32),
        cu_q_lens=torch.tensor([0, 1, 3], dtype=torch.int32), max_q_len=2,
    )


PAGED_ERRORS = [
    ("q rank", dict(q=torch.randn(3, 4, 16, 1)), ValueError, "q must have rank 3"),
    ("q dtype", dict(q=torch.randn(3, 4, 16).double()), ValueError, "q must be float16"),
    ("q int", dict(q=torch.ones(3, 4, 16, dtype=torch.int32)), ValueError, "q must be float16"),
    ("cache dtype", dict(k_cache=torch.randn(4, 8, 2, 16).half(), v_cache=torch.randn(4, 8, 2, 16).half()), ValueError, "k_cache dtype"),
    ("v_cache shape", dict(v_cache=torch.randn(4, 8, 2, 8)), ValueError, "k_cache .* and v_cache .* same shape"),
    ("head_dim", dict(k_cache=torch.randn(4, 8, 2, 8), v_cache=torch.randn(4, 8, 2, 8)), ValueError, "head_dim"),
    ("gqa", dict(k_cache=torch.randn(4, 8, 3, 16), v_cache=torch.randn(4, 8, 3, 16)), ValueError, "multiple of the KV heads"),
    ("q last dim", dict(q=torch.randn(3, 16, 4).transpose(1, 2)), ValueError, "q must be contiguous in its last dimension"),
    ("cache last dim", dict(k_cache=torch.randn(4, 8, 16, 2).transpose(2, 3)), ValueError, "k_cache must be contiguous"),
    ("table dtype", dict(block_table=torch.tensor([[0, 1], [2, 3]])), ValueError, "block_table must be torch.int32"),
    ("kv_lens dtype", dict(kv_lens=torch.tensor([10, 3])), ValueError, "kv_lens must be torch.int32"),
    ("cu dtype", dict(cu_q_lens=torch.tensor([0, 1, 3])), ValueError, "cu_q_lens must be torch.int32"),
    ("kv_lens len", dict(kv_lens=torch.tensor([10], dtype=torch.int32)), ValueError, "kv_lens has 1 entries"),
    ("cu len", dict(cu_q_lens=torch.tensor([0, 3], dtype=torch.int32)), ValueError, "B \\+ 1 = 3"),
    ("cu start", dict(cu_q_lens=torch.tensor([1, 2, 3], dtype=torch.int32)), ValueError, "start at 0"),
    ("cu order", dict(cu_q_lens=torch.tensor([0, 3, 2], dtype=torch.int32)), ValueError, "non-decreasing"),
    ("cu end", dict(cu_q_lens=torch.tensor([0, 1, 2], dtype=torch.int32)), ValueError, "must equal the number of query rows"),
    ("max_q_len", dict(max_q_len=1), ValueError, "max_q_len = 1 is smaller"),
    ("max_q_len type", dict(max_q_len=-1), ValueError, "max_q_len must be a non-negative int"),
    ("table short", dict(kv_lens=torch.tensor([17, 3], dtype=torch.int32)), ValueError, "block_table too short"),
    ("negative len", dict(kv_lens=torch.tensor([-1, 3], dtype=torch.int32)), ValueError, "kv_lens must be >= 0"),
    ("page range", dict(block_table=torch.tensor([[0, 4], [2, 3]], dtype=torch.int32)), ValueError, "block_table\\[0, 1\\] = 4"),
    ("page negative", dict(block_table=torch.tensor([[0, 1], [-2, 3]], dtype=torch.int32)), ValueError, "block_table\\[1, 0\\] = -2"),
    ("not a tensor", dict(q=[1.0]), RuntimeError, "argument 'q'"),
]


@pytest.mark.parametrize("name,override,exc,match", PAGED_ERRORS, ids=[e[0] for e in PAGED_ERRORS])
def test_paged_attention_rejects_bad_input(name, override, exc, match):
    kw = {**_good(), **override}
    with pytest.raises(exc, match=match):
        ak.paged_attention(**kw)


def test_paged_attention_unused_table_entries_are_not_checked():
    kw = _good()
    kw["block_table"] = torch.tensor([[0, 1], [2, 99]], dtype=torch.int32)  # seq 1 uses one page
    ak.paged_attention(**kw)


APPEND_ERRORS = [
    ("k rank", dict(k=torch.randn(3, 2)), ValueError, "k must have rank 3"),
    ("kv shape", dict(v=torch.randn(3, 2, 8)), ValueError, "k .* and v .* same shape"),
    ("dtype", dict(k=torch.randn(3, 2, 16).half(), v=torch.randn(3, 2, 16).half()), ValueError, "must match the cache dtype"),
    ("v dtype", dict(v=torch.randn(3, 2, 16).half()), ValueError, "v dtype torch.float16 must match the cache dtype"),
    ("v dtype bf16", dict(v=torch.randn(3, 2, 16).bfloat16()), ValueError, "v dtype torch.bfloat16 must match"),
    ("rows", dict(k=torch.randn(3, 1, 16), v=torch.randn(3, 1, 16)), ValueError, "must match the cache's"),
    ("slot dtype", dict(slot_mapping=torch.tensor([0, 1, 2], dtype=torch.int32)), ValueError, "slot_mapping must be torch.int64"),
    ("slot count", dict(slot_mapping=torch.tensor([0, 1])), ValueError, "slot_mapping has 2 entries"),
    ("slot range", dict(slot_mapping=torch.tensor([0, 32, 1])), ValueError, "slot_mapping\\[1\\] = 32 is out of range"),
    ("slot negative", dict(slot_mapping=torch.tensor([0, -2, 1])), ValueError, "slot_mapping\\[1\\] = -2"),
]


@pytest.mark.parametrize("name,override,exc,match", APPEND_ERRORS, ids=[e[0] for e in APPEND_ERRORS])
def test_append_kv_rejects_bad_input_and_leaves_cache_alone(name, override, exc, match):
    kc, vc = torch.randn(4, 8, 2, 16), torch.randn(4, 8, 2, 16)
    before = kc.clone(), vc.clone()
    kw = dict(k=torch.randn(3, 2, 16), v=torch.randn(3, 2, 16), k_cache=kc, v_cache=vc, slot_mapping=torch.tensor([0, 5, 9]))
    kw.update(override)
    with pytest.raises(exc, match=match):
        ak.append_kv(**kw)
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


def _append_good():
    return dict(k=torch.randn(3, 2, 16), v=torch.randn(3, 2, 16), k_cache=torch.randn(4, 8, 2, 16),
                v_cache=torch.randn(4, 8, 2, 16), slot_mapping=torch.tensor([0, 5, 9]))


@pytest.mark.parametrize("kind", ["paged", "append"])
def test_metadata_fast_paths_accept_only_what_the_named_checks_accept(kind):
    """The one-expression metadata tests that spare a decoding step the named checks: true for good
    inputs (so the fast path runs), false for every bad one the named checks reject."""
    from arpg_kernels import checks

    if kind == "paged":
        good, errors = _good(), PAGED_ERRORS
        fast = lambda kw: checks._paged_attention_metadata_ok(**kw, causal=False, scale=None, return_lse=False)
        named = lambda kw: checks._check_paged_attention_metadata(**kw, causal=False, scale=None, return_lse=False)
        extra = [dict(causal=1), dict(scale="0.5"), dict(return_lse=None), dict(max_q_len=True),
                 dict(kv_lens=torch.tensor([10, 3], dtype=torch.int32, device="meta")),
                 dict(k_cache=torch.randn(4, 0, 2, 16), v_cache=torch.randn(4, 0, 2, 16))]
        for override in extra:  # arguments beyond the op's tensors go through both tests too
            kw = {**good, **override}
            args = {k: kw.pop(k) for k in ("causal", "scale", "return_lse") if k in kw}
            call = {**dict(causal=False, scale=None, return_lse=False), **args}
            assert not checks._paged_attention_metadata_ok(**kw, **call)
            with pytest.raises((ValueError, TypeError)):
                checks._check_paged_attention_metadata(**kw, **call)
    else:
        good, errors = _append_good(), APPEND_ERRORS
        fast = lambda kw: checks._append_kv_metadata_ok(**kw)
        named = lambda kw: checks._check_append_kv_metadata(**kw)
    assert fast(good)
    named(good)
    for name, override, _, _ in errors:
        kw = {**good, **override}
        try:
            named(kw)
        except (ValueError, TypeError):
            assert not fast(kw), name
        else:  # a value check (the index contents): metadata passes both ways
            assert fast(kw) or "not a tensor" in name, name


ATTN_ERRORS = [
    ("rank", dict(q=torch.randn(2, 5, 16)), ValueError, "q must have rank 4"),
    ("dtype mix", dict(k=torch.randn(2, 6, 2, 16).half(), v=torch.randn(2, 6, 2, 16).half()), ValueError, "share a dtype"),
    ("batch", dict(k=torch.randn(1, 6, 2, 16), v=torch.randn(1, 6, 2, 16)), ValueError, "k has batch 1"),
    ("gqa", dict(k=torch.randn(2, 6, 3, 16), v=torch.randn(2, 6, 3, 16)), ValueError, "multiple of the KV heads"),
    ("kv shape", dict(v=torch.randn(2, 5, 2, 16)), ValueError, "same shape"),
    ("head_dim", dict(k=torch.randn(2, 6, 2, 8), v=torch.randn(2, 6, 2, 8)), ValueError, "head_dim"),
    ("last dim", dict(q=torch.randn(2, 5, 16, 4).transpose(2, 3)), ValueError, "contiguous in its last dimension"),
]


@pytest.mark.parametrize("name,override,exc,match", ATTN_ERRORS, ids=[e[0] for e in ATTN_ERRORS])
def test_attention_rejects_bad_input(name, override, exc, match):
    kw = dict(q=torch.randn(2, 5, 4, 16), k=torch.randn(2, 6, 2, 16), v=torch.randn(2, 6, 2, 16))
    kw.update(override)
    with pytest.raises(exc, match=match):
        ak.attention(**kw)


def test_merge_rejects_bad_input():
    out, lse = torch.randn(4, 2, 8), torch.randn(4, 2)
    with pytest.raises(ValueError, match="lse_a must be torch.float32"):
        ak.merge_attention_states(out, lse.half(), out, lse)
    with pytest.raises(ValueError, match="lse_b must have shape"):
        ak.merge_attention_states(out, lse, out, lse[:3])
    with pytest.raises(ValueError, match="out_b .* must match out_a"):
        ak.merge_attention_states(out, lse, out.half(), lse)


def test_device_mismatch_is_named():
    kw = _good()
    kw["kv_lens"] = kw["kv_lens"].to("meta")
    with pytest.raises(ValueError, match="kv_lens is on meta"):
        ak.paged_attention(**kw)


# backends -------------------------------------------------------------------------------------


def test_backend_override_and_resolution():
    q = torch.randn(2, 2, 8)
    assert ak.get_backend() == "auto"
    assert ak.resolve_backend("paged_attention", q) is reference
    with ak.use_backend("reference"):
        assert ak.get_backend() == "reference"
    assert ak.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        ak.set_backend("fast")
    with ak.use_backend("cuda"), pytest.raises(RuntimeError, match="cuda backend needs CUDA tensors"):
        ak.resolve_backend("paged_attention", q)


def test_each_backend_module_exposes_the_reference_signatures():
    import inspect

    from arpg_kernels import triton as triton_backend

    for name in ("paged_attention", "append_kv", "attention_forward", "attention_backward", "merge_attention_states"):
        want = list(inspect.signature(getattr(reference, name)).parameters)
        got = list(inspect.signature(getattr(triton_backend, name)).parameters)
        assert got[: len(want)] == want, name


def test_reference_is_graph_friendly_no_host_sync():
    """The reference must not read device values on the host: run it on meta tensors."""
    case = make_paged_case(2, max_b=3)
    meta = case.to("meta")
    out, lse = reference.paged_attention(*meta.args(), meta.causal, 0.1, True)
    assert out.shape == case.q.shape and lse.shape == case.q.shape[:2]


def test_triton_supports_names_the_shapes_it_cannot_take():
    from arpg_kernels import triton as triton_backend

    q64, q59 = torch.empty(1, 2, 64), torch.empty(1, 2, 59)
    cache16, cache12 = torch.empty(2, 16, 1, 64), torch.empty(2, 12, 1, 64)
    assert triton_backend.supports("paged_attention", q64, cache16)
    assert not triton_backend.supports("paged_attention", q64, cache12)
    assert not triton_backend.supports("paged_attention", q59, cache16)
    assert not triton_backend.supports("attention_forward", torch.empty(1, 1, 2, 8))
    assert triton_backend.supports("append_kv", torch.empty(1, 1, 59), cache12)
