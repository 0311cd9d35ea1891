"""PagedKVCache: allocator invariants under random reserve/fork/free, copy-on-write, atomic failure, plans."""

import random

import pytest
import torch

import arpg_kernels as ak
from arpg_kernels import CacheFullError, PagedKVCache

LAYERS, HKV, D = 2, 1, 2


def _contents(cache: PagedKVCache, sid: int) -> list[float]:
    """Token values of a sequence read back through its pages (layer 0, K, first channel)."""
    n = cache.seq_len(sid)
    if n == 0:
        return []
    table = cache.block_table([sid])[0]
    k, _ = ak.reference.gather_kv(*cache.layer(0), table[None], n)
    return k[0, :, 0, 0].tolist()


def _state(cache: PagedKVCache):
    return (
        list(cache._free), list(cache._refs), {s: list(p) for s, p in cache._pages.items()}, dict(cache._lens),
        cache.k_pool.clone(), cache.v_pool.clone(),
    )


def _assert_same_state(a, b):
    assert a[:4] == b[:4]
    assert torch.equal(a[4], b[4]) and torch.equal(a[5], b[5])


def _write(cache, sids, counts, slots, model, next_value):
    """Write distinct values for the reserved tokens, through append_kv, in every layer."""
    values = []
    for sid, c in zip(sids, counts):
        new = [float(next_value + i) for i in range(c)]
        next_value += c
        model[sid] += new
        values += new
    if values:
        k = torch.tensor(values).view(-1, 1, 1).expand(-1, HKV, D).contiguous()
        for layer in range(LAYERS):
            ak.append_kv(k + layer, -k, *cache.layer(layer), slots)
    return next_value


@pytest.mark.parametrize("seed", range(40))
def test_random_operations_keep_every_invariant(seed):
    rng = random.Random(seed)
    page_size = rng.choice([1, 2, 4, 16])
    cache = PagedKVCache(LAYERS, rng.randint(4, 24), page_size, HKV, D, torch.float32)
    model: dict[int, list[float]] = {}
    next_value = 1
    for _ in range(60):
        op = rng.choice(["add", "reserve", "reserve", "reserve", "fork", "fork", "free", "plan"])
        live = list(model)
        if op == "add" or not live:
            for sid in cache.add_sequences(rng.randint(1, 3)):
                model[sid] = []
        elif op in ("reserve", "plan"):
            sids = rng.sample(live, rng.randint(1, len(live)))
            steps = [[rng.randint(0, 2 * page_size + 1) for _ in sids] for _ in range(rng.randint(1, 3))]
            before = _state(cache)
            try:
                if op == "reserve":
                    plans = [(cache.reserve(sids, steps[0]), steps[0])]
                else:
                    plans = [(p.slot_mapping, list(p.num_new)) for p in cache.plan(sids, steps)]
            except CacheFullError:
                _assert_same_state(before, _state(cache))
                continue
            for slots, counts in plans:
                assert slots.dtype == torch.int64 and slots.numel() == sum(counts)
                assert len(set(slots.tolist())) == slots.numel()
                next_value = _write(cache, sids, counts, slots, model, next_value)
        elif op == "fork":
            src = rng.choice(live)
            model[cache.fork(src)] = list(model[src])
        else:
            victims = rng.sample(live, rng.randint(1, len(live)))
            cache.free(victims)
            for sid in victims:
                del model[sid]
        cache.check_invariants()
        for sid, values in model.items():
            assert cache.seq_len(sid) == len(values)
            assert _contents(cache, sid) == values, f"sequence {sid} changed under another sequence's writes"
    cache.free(list(model))
    cache.check_invariants()
    assert cache.num_free_pages == cache.num_pages


def test_fork_shares_pages_and_copies_a_partial_last_page_on_write():
    cache = PagedKVCache(LAYERS, 8, 4, HKV, D, torch.float32)
    (a,) = cache.add_sequences(1)
    model = {a: []}
    slots = cache.reserve([a], 6)
    _write(cache, [a], [6], slots, model, 1)
    b = cache.fork(a)
    model[b] = list(model[a])
    assert cache.pages(a) == cache.pages(b)
    free_before = cache.num_free_pages
    slots = cache.reserve([b], 1)
    assert cache.pages(b)[0] == cache.pages(a)[0]  # the full page stays shared
    assert cache.pages(b)[1] != cache.pages(a)[1]  # the partial page was copied
    assert cache.num_free_pages == free_before - 1
    _write(cache, [b], [1], slots, model, 100)
    assert _contents(cache, a) == model[a] and _contents(cache, b) == model[b]
    # Every layer and both pools were copied.
    pb, pa = cache.pages(b)[1], cache.pages(a)[1]
    assert torch.equal(cache.k_pool[:, pb, :2], cache.k_pool[:, pa, :2])
    assert torch.equal(cache.v_pool[:, pb, :2], cache.v_pool[:, pa, :2])
    # The original owner, now alone on its page, writes in place.
    page_a = cache.pages(a)[1]
    cache.reserve([a], 1)
    assert cache.pages(a)[1] == page_a


def test_fork_of_full_pages_needs_no_copy():
    cache = PagedKVCache(1, 4, 4, 1, 2, torch.float32)
    (a,) = cache.add_sequences(1)
    cache.reserve([a], 8)
    b = cache.fork(a)
    cache.reserve([b], 1)
    assert cache.pages(b)[:2] == cache.pages(a) and len(cache.pages(b)) == 3


def test_running_out_of_pages_raises_and_changes_nothing():
    cache = PagedKVCache(1, 3, 4, 1, 2, torch.float32)
    a, b = cache.add_sequences(2)
    cache.reserve([a], 5)
    before = _state(cache)
    with pytest.raises(CacheFullError, match="needs 3 free pages .* has 1"):
        cache.reserve([a, b], [4, 5])
    _assert_same_state(before, _state(cache))
    with pytest.raises(CacheFullError):
        cache.plan([a, b], [[1, 1], [1, 1], [1, 4]])
    _assert_same_state(before, _state(cache))


def test_plan_matches_step_by_step_reserve():
    steps = [[1, 1, 1], [3, 0, 2], [5, 5, 5], [0, 0, 7]]
    one = PagedKVCache(1, 32, 4, 1, 2, torch.float32)
    ids = one.add_sequences(3)
    plans = one.plan(ids, steps)
    two = PagedKVCache(1, 32, 4, 1, 2, torch.float32)
    ids2 = two.add_sequences(3)
    for plan, counts in zip(plans, steps):
        assert torch.equal(plan.slot_mapping, two.reserve(ids2, counts))
        assert torch.equal(plan.kv_lens, two.kv_lens(ids2))
        assert plan.cu_new.tolist() == [0] + list(torch.tensor(counts).cumsum(0).tolist())
        assert plan.block_table.shape == plans[-1].block_table.shape
    assert torch.equal(plans[-1].block_table, two.block_table(ids2))


def test_plan_with_a_scalar_count_per_step():
    cache = PagedKVCache(1, 16, 16, 1, 2, torch.float32)
    ids = cache.add_sequences(4)
    plans = cache.plan(ids, [1, 3, 12])
    assert [p.kv_lens.tolist() for p in plans] == [[1] * 4, [4] * 4, [16] * 4]


def test_bad_arguments_are_named_and_change_nothing():
    cache = PagedKVCache(1, 4, 4, 1, 2, torch.float32)
    (a,) = cache.add_sequences(1)
    before = _state(cache)
    with pytest.raises(KeyError, match="unknown sequence id 7"):
        cache.reserve([a, 7], 1)
    with pytest.raises(ValueError, match="duplicate"):
        cache.reserve([a, a], 1)
    with pytest.raises(ValueError, match="n_tokens has 2 entries for 1"):
        cache.reserve([a], [1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        cache.reserve([a], -1)
    with pytest.raises(KeyError):
        cache.free([a, 9])
    with pytest.raises(KeyError):
        cache.fork(5)
    _assert_same_state(before, _state(cache))
    with pytest.raises(ValueError, match="num_pages must be an int >= 1"):
        PagedKVCache(1, 0, 4, 1, 2)
    with pytest.raises(IndexError):
        cache.layer(3)
    cache.reserve([a], 9)
    with pytest.raises(ValueError, match="max_pages = 2 is smaller than the 3 pages"):
        cache.block_table([a], 2)


def test_tensors_have_the_kernel_dtypes():
    cache = PagedKVCache(3, 8, 16, 2, 64, torch.bfloat16)
    ids = cache.add_sequences(2)
    slots = cache.reserve(ids, [17, 0])
    assert slots.dtype == torch.int64
    table, lens = cache.block_table(ids), cache.kv_lens(ids)
    assert table.dtype == torch.int32 and table.shape == (2, 2) and lens.tolist() == [17, 0]
    assert cache.k_pool.shape == (3, 8, 16, 2, 64) and cache.layer(2)[0].shape == (8, 16, 2, 64)
    assert cache.nbytes == 2 * 3 * 8 * 16 * 2 * 64 * 2


def test_int_tensor():
    from arpg_kernels.cache import int_tensor

    for dtype, big in ((torch.int64, 2**40), (torch.int32, 2**31 - 1)):
        t = int_tensor([3, -1, big], dtype, "cpu")
        assert t.dtype == dtype and t.tolist() == [3, -1, big]
        assert int_tensor(iter(range(5)), dtype, "cpu").tolist() == list(range(5))
        empty = int_tensor([], dtype, "cpu")
        assert empty.dtype == dtype and empty.shape == (0,)
    with pytest.raises(OverflowError):
        int_tensor([2**31], torch.int32, "cpu")
