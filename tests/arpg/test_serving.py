"""Many callers at once: thread-safe `generate` and edits, the cache budget, and `GenerationQueue`.

Every result is compared with its sequential twin (the same call made alone), and every page must be
back in the free list at the end.
"""

import random
import threading
import time
from concurrent.futures import CancelledError

import pytest
import torch

import arpg
from arpg import CacheBudgetError, GenerationQueue, QueueClosedError, QueueFullError, RequestError
from arpg.engine import _ENGINES, _row_bytes

KW = dict(temperature=1.1, top_k=20)


def _random_call(rng: random.Random, seq_len: int):
    bsz = rng.randint(1, 3)
    labels = [rng.randint(-1, 9) for _ in range(bsz)]
    per_sample = rng.random() < 0.5
    seed = [rng.randint(0, 10**6) for _ in range(bsz)] if per_sample else rng.randint(0, 10**6)
    return dict(labels=labels, num_steps=rng.randint(1, seq_len), cfg_scale=rng.choice([1.0, 2.5]), seed=seed,
                schedule=rng.choice(["arccos", "cosine"]))


def _generate(model, call):
    return arpg.generate(model, torch.tensor(call["labels"]), call["num_steps"], schedule=call["schedule"],
                         cfg_scale=call["cfg_scale"], seed=call["seed"], **KW)


def _all_free(cache) -> bool:
    cache.check_invariants()
    return cache.num_free_pages == cache.num_pages and not cache.sequences


def _threads(n, fn):
    errors = []

    def run(i):
        try:
            fn(i)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=300)
    assert not errors, errors


def test_concurrent_generate_equals_sequential(make_model):
    """The reported failure: calls from many threads on one model's shared engine (5 of 6 raised
    CacheFullError). 8 threads x 20 calls of random sizes, seeds, steps and guidance, edits mixed in."""
    model = make_model("ARPG-tiny")
    seq_len = model.config.seq_len
    rng = random.Random(0)
    calls = [[_random_call(rng, seq_len) for _ in range(20)] for _ in range(8)]
    known = torch.zeros(seq_len, dtype=torch.bool)
    known[: seq_len // 2] = True
    truth = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(1))

    def edit(call):
        return arpg.inpaint(model, truth, known, call["labels"][0], call["num_steps"], cfg_scale=call["cfg_scale"],
                            seed=[7], **KW)

    got = [[None] * 20 for _ in range(8)]

    def worker(i):
        for j, call in enumerate(calls[i]):
            got[i][j] = edit(call) if j % 4 == 3 else _generate(model, call)

    _threads(8, worker)
    for i in range(8):
        for j, call in enumerate(calls[i]):
            want = edit(call) if j % 4 == 3 else _generate(model, call)
            assert torch.equal(got[i][j], want), (i, j, call)
    assert _all_free(_ENGINES[model].cache)


def test_two_models_at_once(make_model):
    models = [make_model("ARPG-tiny", seed=0), make_model("ARPG-tiny", seed=1)]
    call = dict(labels=[1, 2], num_steps=5, cfg_scale=2.0, seed=3, schedule="arccos")
    want = [_generate(m, call) for m in models]
    assert not torch.equal(*want)
    got = [[None] * 6 for _ in range(4)]
    _threads(4, lambda i: [got[i].__setitem__(j, _generate(models[i % 2], call)) for j in range(6)])
    for i in range(4):
        assert all(torch.equal(g, want[i % 2]) for g in got[i])


def test_cache_budget_chunks_with_the_same_tokens(make_model):
    model = make_model("ARPG-tiny")
    cfg = model.config
    labels, seeds = torch.tensor([0, 3, -1, 7, 9]), [5, 6, 7, 8, 9]
    kw = dict(cfg_scale=3.0, seed=seeds, return_logits=True, **KW)
    want, want_logits = arpg.generate(model, labels, 6, **kw)
    row = _row_bytes(model, 16, cfg.seq_len, torch.float32)
    arpg.set_cache_budget(model, 3 * row + row // 2)  # 3 rows: one CFG sample at a time
    try:
        got, got_logits = arpg.generate(model, labels, 6, **kw)
        engine = _ENGINES[model]
        assert engine.max_rows == 3 and engine.cache.nbytes <= 3 * row + row // 2
        assert torch.equal(got, want)
        assert len(got_logits) == len(want_logits)
        for g, w in zip(got_logits, want_logits):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)  # matmul blocking depends on the batch
        # Edits run in the same chunks.
        known = torch.rand(5, cfg.seq_len, generator=torch.Generator().manual_seed(0)) < 0.4
        arpg.set_cache_budget(model, None)
        edit_want = arpg.inpaint(model, want, known, labels, 4, cfg_scale=2.0, seed=seeds)
        arpg.set_cache_budget(model, 2 * row)
        assert torch.equal(arpg.inpaint(model, want, known, labels, 4, cfg_scale=2.0, seed=seeds), edit_want)
        # Too small for one sample under guidance: one error naming the budget and the need.
        arpg.set_cache_budget(model, row + 1)
        with pytest.raises(CacheBudgetError, match=r"one sample needs 2 cache rows .* holds 1"):
            arpg.generate(model, labels, 6, cfg_scale=2.0, seed=1)
        assert torch.equal(arpg.generate(model, labels[:1], 6, seed=[5], **KW),
                           arpg.generate(model, labels[:1], 6, seed=[5], **KW))
        arpg.set_cache_budget(model, row - 1)
        with pytest.raises(CacheBudgetError, match=f"holds no sequence: one sequence of {cfg.seq_len} tokens takes"):
            arpg.generate(model, labels, 6, seed=1)
        with pytest.raises(ValueError, match="max_cache_bytes must be a positive int"):
            arpg.set_cache_budget(model, 0)
    finally:
        arpg.set_cache_budget(model, None)
    assert torch.equal(arpg.generate(model, labels, 6, cfg_scale=3.0, seed=seeds, **KW), want)


def test_unknown_class_is_rejected(make_model):
    model = make_model("ARPG-tiny")
    with pytest.raises(ValueError, match="labels must be < num_classes = 10"):
        arpg.generate(model, torch.tensor([10]), 3)  # was silently the no-class id
    with pytest.raises(ValueError, match="integer class labels"):
        arpg.generate(model, torch.tensor([1.0]), 3)


@pytest.mark.parametrize("pad", [False, True], ids=["exact", "padded-buckets"])
def test_queue_equals_generate(make_model, pad):
    """Requests of mixed sizes, step counts and guidance share varlen steps; each gets the tokens
    `generate` gives it alone. padded-buckets runs the CUDA-graph step layout on the CPU."""
    model = make_model("ARPG-tiny")
    rng = random.Random(1)
    calls = [_random_call(rng, model.config.seq_len) for _ in range(12)]
    with GenerationQueue(model, max_rows=10, _pad_steps=pad) as q:
        futs = [q.submit(c["labels"], c["num_steps"], c["cfg_scale"], c["seed"], schedule=c["schedule"], **KW)
                for c in calls]
        got = [f.result(timeout=120) for f in futs]
    assert q.peak_rows <= 10 and q.peak_rows > 6  # requests ran together
    assert _all_free(q.cache)
    for c, g in zip(calls, got):
        assert torch.equal(g, _generate(model, c)), c


def test_queue_raster_model(make_model):
    model = make_model("Raster-tiny")
    want = arpg.generate(model, torch.tensor([2, 3]), cfg_scale=2.0, seed=4, **KW)
    with GenerationQueue(model, max_rows=8) as q:
        a = q.submit([2, 3], cfg_scale=2.0, seed=4, **KW)
        b = q.submit([5], seed=[1], **KW)
        assert torch.equal(a.result(timeout=120), want)
        assert torch.equal(b.result(timeout=120), arpg.generate(model, torch.tensor([5]), seed=[1], **KW))


def test_queue_stress_with_cancellation_and_shutdown(make_model):
    """8 threads submit at random times; some requests are cancelled waiting or running; the queue is
    shut down (draining) at the end. Every finished request equals its twin; every page is free."""
    model = make_model("ARPG-tiny")
    seq_len = model.config.seq_len
    q = GenerationQueue(model, max_rows=12, max_waiting=6)
    results, lock = [], threading.Lock()

    def client(i):
        rng = random.Random(100 + i)
        for _ in range(20):
            call = _random_call(rng, seq_len)
            fut = q.submit(call["labels"], call["num_steps"], call["cfg_scale"], call["seed"],
                           schedule=call["schedule"], **KW)
            cancel = rng.random() < 0.25
            if cancel:
                time.sleep(rng.random() * 0.02)
                fut.cancel()
            with lock:
                results.append((call, fut, cancel))
            time.sleep(rng.random() * 0.01)

    _threads(8, client)
    q.shutdown(wait=True)
    assert not q._worker.is_alive() and q.num_waiting == 0 and q.num_running == 0
    assert _all_free(q.cache)
    finished = 0
    for call, fut, cancel in results:
        assert fut.done()
        if fut.cancelled():
            assert cancel
            with pytest.raises(CancelledError):
                fut.result()
            continue
        finished += 1
        assert torch.equal(fut.result(), _generate(model, call)), call
    assert finished >= len(results) // 2
    assert q.peak_rows >= 8  # requests shared steps
    with pytest.raises(QueueClosedError):
        q.submit([1], 2)


def test_queue_cancel_running_frees_its_pages(make_model):
    model = make_model("ARPG-tiny")
    q = GenerationQueue(model, max_rows=4)
    gate = threading.Event()
    real_step = q._step

    def slow_step():
        gate.wait(timeout=30)
        real_step()

    q._step = slow_step
    long = q.submit([1, 2], model.config.seq_len, 2.0, seed=1)  # 4 rows: the whole queue
    other = q.submit([3], 4, 1.0, seed=[2])
    deadline = time.time() + 30
    while q.num_running == 0 and time.time() < deadline:
        time.sleep(0.005)
    assert q.num_running == 1 and q.num_waiting == 1  # `other` waits for the rows `long` holds
    assert long.cancel()
    gate.set()
    assert torch.equal(other.result(timeout=60), arpg.generate(model, torch.tensor([3]), 4, seed=[2]))
    assert long.cancelled()
    q.shutdown()
    assert _all_free(q.cache)


def test_queue_shutdown_cancel(make_model):
    model = make_model("ARPG-tiny")
    q = GenerationQueue(model, max_rows=2)
    futs = [q.submit([i], 16, 1.0, seed=i) for i in range(6)]
    q.shutdown(wait=True, cancel=True)
    assert all(f.done() for f in futs) and any(f.cancelled() for f in futs)
    for i, f in enumerate(futs):
        if not f.cancelled():
            assert torch.equal(f.result(), arpg.generate(model, torch.tensor([i]), 16, seed=i))
    assert _all_free(q.cache)


def test_queue_rejects_bad_requests_at_submit(make_model):
    model = make_model("ARPG-tiny")
    with GenerationQueue(model, max_rows=4) as q:
        good = q.submit([1], 4, 2.0, seed=[3])
        bad = {
            "labels must be < num_classes = 10": dict(labels=[10], num_steps=4),
            "labels is empty": dict(labels=[], num_steps=4),
            "integer class labels": dict(labels=[0.5], num_steps=4),
            r"num_steps must be an int in \[1, 16\]": dict(labels=[1], num_steps=17),
            "num_steps is required": dict(labels=[1], num_steps=None),
            r"needs 6 cache rows \(3 images with guidance\) but the queue holds 4": dict(labels=[1, 2, 3], num_steps=4,
                                                                                         cfg_scale=2.0),
            "seed has 2 entries for a batch of 1": dict(labels=[1], num_steps=4, seed=[1, 2]),
            r"top_p must be in \(0, 1\]": dict(labels=[1], num_steps=4, top_p=0.0),
            "schedule must be one of": dict(labels=[1], num_steps=4, schedule="linear"),
        }
        for message, kw in bad.items():
            with pytest.raises(RequestError, match=message):
                q.submit(**kw)
        assert torch.equal(good.result(timeout=60), arpg.generate(model, torch.tensor([1]), 4, cfg_scale=2.0,
                                                                  seed=[3]))
    assert _all_free(q.cache)


def test_queue_back_pressure(make_model):
    model = make_model("ARPG-tiny")
    q = GenerationQueue(model, max_rows=1, max_waiting=2)
    gate = threading.Event()
    real_step = q._step
    q._step = lambda: (gate.wait(timeout=30), real_step())
    futs = [q.submit([0], 2, seed=0)]
    deadline = time.time() + 30
    while q.num_running == 0 and time.time() < deadline:
        time.sleep(0.005)
    futs += [q.submit([1], 2, seed=1), q.submit([2], 2, seed=2)]  # the waiting list is now full
    with pytest.raises(QueueFullError, match=r"2 requests waiting \(max_waiting = 2\)"):
        q.submit([3], 2, seed=3, block=False)
    t0 = time.perf_counter()
    with pytest.raises(QueueFullError):
        q.submit([3], 2, seed=3, timeout=0.05)
    assert time.perf_counter() - t0 >= 0.04
    gate.set()
    futs.append(q.submit([3], 2, seed=3))  # blocks until there is room
    for i, f in enumerate(futs):
        assert torch.equal(f.result(timeout=60), arpg.generate(model, torch.tensor([i]), 2, seed=i))
    q.shutdown()
    assert _all_free(q.cache)


def test_queue_step_failure_fails_only_its_requests(make_model):
    model = make_model("ARPG-tiny")
    q = GenerationQueue(model, max_rows=4)
    real_step, calls = q._step, []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected step failure")
        real_step()

    q._step = flaky
    first = q.submit([1], 3, seed=1)
    with pytest.raises(RuntimeError, match="injected step failure"):
        first.result(timeout=60)
    assert torch.equal(q.submit([2], 3, seed=2).result(timeout=60), arpg.generate(model, torch.tensor([2]), 3, seed=2))
    q.shutdown()
    assert _all_free(q.cache)


def test_queue_memory_cap(make_model):
    model = make_model("ARPG-tiny")
    row = _row_bytes(model, 16, model.config.seq_len, torch.float32)
    with GenerationQueue(model, max_rows=None, max_cache_bytes=5 * row) as q:
        assert q.max_rows == 5 and q.cache.nbytes <= 5 * row
        futs = [q.submit([i % 10] * 2, 4, 2.0, seed=[i, i + 1]) for i in range(6)]  # 4 rows each: one at a time
        for i, f in enumerate(futs):
            assert torch.equal(f.result(timeout=60), arpg.generate(model, torch.tensor([i % 10] * 2), 4, cfg_scale=2.0,
                                                                   seed=[i, i + 1]))
        assert q.peak_rows == 4
        with pytest.raises(RequestError, match="needs 6 cache rows"):
            q.submit([1, 2, 3], 4, 2.0)
    with pytest.raises(CacheBudgetError, match="holds no sequence"):
        GenerationQueue(model, max_cache_bytes=row - 1)


def test_a_dropped_queue_is_collected_and_its_worker_ends(make_model):
    import gc
    import weakref

    model = make_model("ARPG-tiny")
    q = GenerationQueue(model, max_rows=4)
    fut = q.submit([1], 3, seed=1)
    worker, ref = q._worker, weakref.ref(q)
    del q
    assert torch.equal(fut.result(timeout=60), arpg.generate(model, torch.tensor([1]), 3, seed=1))  # work first
    worker.join(timeout=10)
    gc.collect()
    assert not worker.is_alive() and ref() is None
