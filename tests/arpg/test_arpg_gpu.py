"""CUDA paths of the engine: graphs vs no graphs, paged vs eager in low precision (skipped without a GPU)."""

import pytest
import torch

from arpg import Engine, eager_generate, generate

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["ARPG-tiny", "Raster-tiny", "ARPG-tiny-g16"])
def test_cuda_graphs_match_eager_launches(make_model, name):
    model = make_model(name, std=0.05).cuda()
    labels = torch.tensor([1, 2, -1], device="cuda")
    steps = None if name.startswith("Raster") else 7
    kw = dict(seed=0, cfg_scale=2.0, cfg_schedule="linear", return_logits=True)
    plain = Engine(model, 6, use_cuda_graphs=False)
    graphs = Engine(model, 6, use_cuda_graphs=True)
    tokens, ref = plain.generate(labels, steps, **kw)
    got_tokens, got = graphs.generate(labels, steps, teacher_tokens=tokens, **kw)
    assert torch.equal(got_tokens, tokens) and len(graphs._graphs) > 0
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # Replays in a second generation, with another order, still agree.
    tokens2, ref2 = plain.generate(labels, steps, **dict(kw, seed=1))
    _, got2 = graphs.generate(labels, steps, teacher_tokens=tokens2, **dict(kw, seed=1))
    for a, b in zip(got2, ref2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_paged_bf16_error_within_twice_eager_bf16_error(make_model):
    model = make_model("ARPG-tiny-g16", std=0.05).cuda()
    labels = torch.tensor([3, 0], device="cuda")
    kw = dict(seed=0, cfg_scale=3.0, return_logits=True)
    tokens, paged32 = generate(model, labels, 16, **kw)
    _, eager32 = eager_generate(model, labels, 16, teacher_tokens=tokens, **kw)
    for a, b in zip(paged32, eager32):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    model = model.to(torch.bfloat16)
    _, paged16 = generate(model, labels, 16, teacher_tokens=tokens, **kw)
    _, eager16 = eager_generate(model, labels, 16, teacher_tokens=tokens, **kw)
    for p16, e16, ref in zip(paged16, eager16, eager32):
        assert (p16 - ref).abs().max() <= 2 * (e16 - ref).abs().max() + 1e-3
    again = [generate(model, labels, 16, seed=0, cfg_scale=3.0) for _ in range(2)]
    assert torch.equal(*again)


def test_queue_cuda_graph_buckets(make_model):
    """The queue's padded varlen steps replayed from CUDA graphs give the tokens of the same padded steps
    launched directly, and (but for last-bit matmul differences across batch sizes) those of `generate`."""
    from arpg import GenerationQueue

    model = make_model("ARPG-tiny-g16", std=0.05).cuda()
    calls = [([1, 2], 8, 2.0, 3), ([3], 5, 1.0, [9]), ([0, 2, 1], 12, 3.0, [1, 2, 3]), ([3], 8, 1.0, 4)] * 2  # < 4 classes
    results = {}
    for graphs in (True, False):
        with GenerationQueue(model, max_rows=12, use_cuda_graphs=graphs, _pad_steps=True) as q:
            futs = [q.submit(l, n, c, s) for l, n, c, s in calls]
            results[graphs] = [f.result(timeout=120) for f in futs]
        assert (len(q._graphs) > 0) == graphs
        assert q.cache.num_free_pages == q.cache.num_pages
    same, total = 0, 0
    for (l, n, c, s), a, b in zip(calls, results[True], results[False]):
        assert torch.equal(a, b)
        want = generate(model, torch.tensor(l, device="cuda"), n, cfg_scale=c, seed=s)
        same, total = same + int((a == want).sum()), total + want.numel()
    assert same >= 0.9 * total, f"{same} of {total} tokens as generate gives them"  # a flip changes what follows
