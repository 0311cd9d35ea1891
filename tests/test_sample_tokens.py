"""sample_tokens: every backend against the reference (same uniforms, same tokens up to float rounding at a
boundary between two tokens), sampled frequencies against the filtered softmax (chi-square), greedy,
degenerate rows, determinism, threads, bad inputs, opcheck."""

import math

import pytest
import torch

import arpg_kernels as ak
from arpg_kernels import cpu, reference
from arpg_kernels.ops import triton_interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The Triton kernel runs under the interpreter on a CPU machine (one program per row: slow), so it sees a
# smaller grid there; the host backends see every case.
TRITON = ["triton"] if torch.cuda.is_available() or triton_interpreting() else []
HOST = ["reference"] + (["cpu"] if cpu.is_available() else [])
BACKENDS = HOST + TRITON
FAST = HOST + (["triton"] if torch.cuda.is_available() else [])  # many draws per case
SETTINGS = [  # temperature, top_k, top_p
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 1, 1.0), (1.0, 0, 0.9), (1.0, 0, 0.3), (1.0, 0, 1e-6),
    (0.8, 40, 0.8), (1.0, 10_000, 0.95),
]


def _run(backend, logits, uniforms, uncond=None, scale=None, temperature=1.0, top_k=0, top_p=1.0):
    with ak.use_backend(backend):
        return ak.sample_tokens(logits, uniforms, uncond, scale, temperature, top_k, top_p)


def _case(seed, rows, vocab, cfg, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 3
    uncond = torch.randn(rows, vocab, generator=g) * 3 if cfg else None
    scale = (torch.rand(rows, generator=g) * 4 + 0.5) if cfg else None
    uniforms = torch.rand(rows, dtype=torch.float64, generator=g)
    return tuple(None if t is None else t.to(device) for t in (logits, uniforms, uncond, scale))


def _device(backend):
    return DEVICE if backend == "triton" else "cpu"


def _interpreted(backend, setting=None, vocab=None):
    """Whether a case is too slow for the Triton interpreter (a smaller grid runs there)."""
    if backend != "triton" or torch.cuda.is_available():
        return False
    return vocab not in (None, 7, 64) or setting not in (None, *SETTINGS[::2])


def _filtered_probs(logits, uncond, scale, temperature, top_k, top_p):
    x = logits if uncond is None else uncond + (logits - uncond) * scale[:, None]
    x = reference.filter_logits(x / temperature, top_k, top_p)
    return torch.softmax(x.double(), -1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("vocab", [1, 7, 64, 1000])
def test_backend_draws_the_reference_token(backend, cfg, setting, vocab):
    if _interpreted(backend, setting, vocab):
        pytest.skip("the Triton interpreter runs a smaller grid")
    temperature, top_k, top_p = setting
    rows = 24 if backend == "triton" and not torch.cuda.is_available() else 96
    logits, uniforms, uncond, scale = _case(vocab * 7 + top_k, rows, vocab, cfg)
    want = reference.sample_tokens(logits, uncond, scale, uniforms, temperature, top_k, top_p)
    dev = _device(backend)
    got = _run(backend, *(None if t is None else t.to(dev) for t in (logits, uniforms, uncond, scale)),
               temperature, top_k, top_p).cpu()
    assert got.dtype == torch.int64 and got.shape == (rows,)
    probs = _filtered_probs(logits, uncond, scale, temperature, top_k, top_p)
    assert (probs.gather(1, got[:, None]) > 0).all(), "a token the filters remove was drawn"
    cdf = probs.cumsum(-1)
    for r in torch.nonzero(got != want).flatten().tolist():
        # Only float rounding of the probabilities may move a draw, so it lies at the boundary of the two.
        lo, hi = sorted((int(got[r]), int(want[r])))
        boundary = cdf[r, lo:hi].double()
        assert (boundary - uniforms[r]).abs().min() < 1e-5, f"row {r}: {int(got[r])} vs reference {int(want[r])}"


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("setting", [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.0, 0, 0.7), (1.2, 6, 0.8)])
def test_frequencies_match_the_filtered_softmax(backend, cfg, setting):
    temperature, top_k, top_p = setting
    vocab, draws = 12, 20_000
    logits, _, uncond, scale = _case(3, 1, vocab, cfg, _device(backend))
    p = _filtered_probs(logits, uncond, scale, temperature, top_k, top_p)[0]
    rows = lambda t: None if t is None else t.expand(draws, *t.shape[1:]).contiguous()  # noqa: E731
    uniforms = torch.rand(draws, dtype=torch.float64, generator=torch.Generator().manual_seed(11)).to(logits.device)
    tokens = _run(backend, rows(logits), uniforms, rows(uncond), rows(scale), temperature, top_k, top_p)
    counts = torch.bincount(tokens.cpu(), minlength=vocab).double()
    p = p.cpu()
    kept = p > 0
    assert counts[~kept].sum() == 0, "a token of probability 0 was drawn"
    expected = p[kept] * draws
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    df = int(kept.sum()) - 1
    if df == 0:
        return
    # Wilson-Hilferty: the chi-square quantile at 1 - 1e-6 (z = 4.75) for df degrees of freedom.
    limit = df * (1 - 2 / (9 * df) + 4.75 * math.sqrt(2 / (9 * df))) ** 3
    assert chi2 < limit, f"chi2 {chi2:.1f} over {limit:.1f} (df {df}): counts {counts.tolist()}, p {p.tolist()}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_is_the_first_argmax_and_draws_nothing(backend):
    dev = _device(backend)
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 5.0, 5.0]], device=dev)
    u = torch.full((2,), 0.999, dtype=torch.float64, device=dev)
    assert _run(backend, logits, u, temperature=0.0).tolist() == [1, 0]
    uncond = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]], device=dev)
    scale = torch.tensor([2.0, 1.0], device=dev)  # row 0: 2 * logits - uncond = [0, 6, 5, 2]
    assert _run(backend, logits, u, uncond, scale, temperature=-1.0).tolist() == [1, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_rows(backend):
    inf = float("inf")
    dev = _device(backend)
    logits = torch.tensor([
        [0.0, float("nan"), 1.0],  # NaN: the last token, as the reference's clamp
        [-inf, -inf, -inf],  # nothing to draw
        [-inf, 2.0, -inf],  # one token left
        [0.0, 0.0, 0.0],  # uniform
        [0.0, inf, 1.0],  # an inf: the reference's softmax is NaN
    ], device=dev)
    u = torch.tensor([0.5, 0.5, 0.99, 0.5, 0.5], dtype=torch.float64, device=dev)
    assert _run(backend, logits, u).tolist() == [2, 2, 1, 1, 2]
    assert _run(backend, logits[2:3], u[2:3], top_k=1, top_p=0.01).tolist() == [1]
    assert _run(backend, logits[:4], u[:4], temperature=0.0).tolist() == [1, 0, 1, 0]  # NaN: largest, as argmax
    empty = _run(backend, torch.zeros(0, 5, device=dev), torch.zeros(0, dtype=torch.float64, device=dev))
    assert empty.shape == (0,) and empty.dtype == torch.int64


@pytest.mark.parametrize("backend", HOST)
def test_same_uniforms_same_tokens_on_any_thread_count(backend):
    logits, uniforms, uncond, scale = _case(5, 200, 333, True)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = _run(backend, logits, uniforms, uncond, scale, 0.9, 20, 0.9)
        torch.set_num_threads(2)
        got = _run(backend, logits, uniforms, uncond, scale, 0.9, 20, 0.9)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(got, want)
    assert not torch.equal(got, _run(backend, logits, torch.rand_like(uniforms), uncond, scale, 0.9, 20, 0.9))


def test_auto_routes_cpu_tensors_to_the_cpu_kernel(monkeypatch):
    if not cpu.is_available():
        pytest.skip(f"CPU kernels not built: {cpu.load_error()}")
    calls = []
    real = cpu.sample_tokens
    monkeypatch.setattr(cpu, "sample_tokens", lambda *a: calls.append(1) or real(*a))
    logits, uniforms, _, _ = _case(0, 3, 10, False)
    with ak.use_backend("auto"):
        ak.sample_tokens(logits, uniforms)
    with ak.use_backend("reference"):
        ak.sample_tokens(logits, uniforms)
    assert len(calls) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(logits=torch.zeros(3, 4, dtype=torch.float64)), "logits must be float32"),
        (dict(logits=torch.zeros(3)), "logits must have rank 2"),
        (dict(logits=torch.zeros(3, 0)), "at least one token"),
        (dict(logits=torch.zeros(4, 3).t()), "logits must be contiguous in its last dimension"),
        (dict(uniforms=torch.zeros(3)), "uniforms must be torch.float64"),
        (dict(uniforms=torch.zeros(2, dtype=torch.float64)), "uniforms has 2 entries but logits has 3 rows"),
        (dict(uncond=torch.zeros(3, 4)), "uncond and cfg_scale go together"),
        (dict(uncond=torch.zeros(3, 5), cfg_scale=torch.ones(3)), "uncond"),
        (dict(uncond=torch.zeros(3, 4), cfg_scale=torch.ones(2)), "cfg_scale has 2 entries"),
        (dict(uncond=torch.zeros(3, 4), cfg_scale=torch.ones(3, dtype=torch.float64)), "cfg_scale must be torch.float32"),
        (dict(top_k=-1), "top_k must be an int >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(temperature=float("nan")), "temperature must be a number"),
    ],
)
def test_bad_inputs_are_refused_by_name(change, message):
    args = dict(logits=torch.zeros(3, 4), uniforms=torch.zeros(3, dtype=torch.float64), uncond=None, cfg_scale=None,
                temperature=1.0, top_k=0, top_p=1.0)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        ak.sample_tokens(**args)


@pytest.mark.parametrize("cfg", [False, True])
def test_opcheck_sample_tokens(cfg):
    logits, uniforms, uncond, scale = _case(1, 6, 50, cfg)
    torch.library.opcheck(torch.ops.arpg.sample_tokens.default, (logits, uncond, scale, uniforms, 0.9, 5, 0.9),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compiles_in_a_full_graph():
    logits, uniforms, uncond, scale = _case(2, 8, 40, True)
    fn = torch.compile(lambda *a: ak.sample_tokens(*a, temperature=0.9, top_k=10, top_p=0.9), fullgraph=True)
    assert torch.equal(fn(logits, uniforms, uncond, scale), ak.sample_tokens(logits, uniforms, uncond, scale, 0.9, 10, 0.9))


@pytest.mark.gpu
def test_auto_keeps_the_reference_on_cuda_until_the_kernel_is_timed_and_triton_captures_in_a_graph():
    logits, uniforms, uncond, scale = _case(4, 64, 16384, True, "cuda")
    assert ak.resolve_backend("sample_tokens", logits) is reference
    with ak.use_backend("triton"):
        want = ak.sample_tokens(logits, uniforms, uncond, scale, 1.0, 0, 0.9)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = ak.sample_tokens(logits, uniforms, uncond, scale, 1.0, 0, 0.9)
    graph.replay()
    assert torch.equal(got, want)
