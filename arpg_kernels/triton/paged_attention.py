"""Triton paged attention: packed varlen queries against a paged KV cache, with an optional split-KV pass.

One program serves one (sequence, KV head, query block). The query block packs the sequence's queries
times the H / Hkv query heads that share the KV head into BLOCK_M rows (row r is query r // GROUP,
head r % GROUP of the group), so every K/V tile read serves all of them. Keys stream through in tiles
of BLOCK_N with an online softmax in base 2; the scale and log2(e) are folded into one multiplier.
Tiles that every row of the block sees run without masks; the tail (the causal diagonal and the last
partial tile) runs masked.

The grid is built from shapes and the host integer `max_q_len` only, never from device data, so the
launch can be captured in a CUDA graph; programs whose query block is past the end of their sequence
return at once.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from .attention import MAX_HEAD_DIM
from .merge import _round_bf16, combine_splits

__all__ = ["paged_attention", "choose_num_splits"]

# The interpreter stores bf16 as raw 16-bit integers, so arithmetic on bf16 tiles is wrong there:
# with INTERP_BF16 the kernels upcast bf16 tiles right after loading and round outputs by hand.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Split the KV loop only when each split still gets at least this many keys.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 16


@triton.jit
def _tile_pages(p_bt, start, hi, stride_btp, num_pages, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Page ids of the key tile at `start`: one (a scalar) when the tile sits in one page, else one per key;
    keys at or past `hi` read page 0. Clamped into [0, num_pages): unchecked input never reads outside the
    cache. The loops fetch the next tile's ids before computing the current tile, so the K/V loads of the
    next iteration do not wait on a block-table load."""
    if PAGE_SIZE >= BLOCK_N:
        # Tiles start on multiples of BLOCK_N, so a tile never straddles a page.
        i_page = tl.load(p_bt + (start // PAGE_SIZE) * stride_btp, mask=start < hi, other=0)
    else:
        o_n = start + tl.arange(0, BLOCK_N)
        i_page = tl.load(p_bt + (o_n // PAGE_SIZE) * stride_btp, mask=o_n < hi, other=0)
    return tl.minimum(tl.maximum(i_page, 0), num_pages - 1).to(tl.int64)


@triton.jit
def _paged_attention_tile(
    b_acc, b_l, b_m, b_q, i_page,
    p_k, p_v, start, hi, b_limit,
    stride_kp, stride_ks, stride_kd,
    stride_vp, stride_vs, stride_vd,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    o_n = start + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM)
    m_n = o_n < hi
    if PAGE_SIZE >= BLOCK_N:
        o_slot = (start % PAGE_SIZE) + tl.arange(0, BLOCK_N)
    else:
        o_slot = o_n % PAGE_SIZE
    # K and V tiles in one layout ([BLOCK_N, D]), so one set of page ids serves both; the dot takes K^T.
    p_kn = p_k + (i_page * stride_kp + o_slot * stride_ks)[:, None] + o_d[None, :] * stride_kd
    p_vn = p_v + (i_page * stride_vp + o_slot * stride_vs)[:, None] + o_d[None, :] * stride_vd
    if MASKED:
        # Slots past the end may hold anything (even NaN), so they must load as 0.
        b_k = tl.load(p_kn, mask=m_n[:, None], other=0.0)
        b_v = tl.load(p_vn, mask=m_n[:, None], other=0.0)
    else:
        b_k = tl.load(p_kn)
        b_v = tl.load(p_vn)
    if INTERP_BF16:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)

    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        b_s = tl.where(o_n[None, :] < tl.minimum(b_limit, hi)[:, None], b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        # A row that has seen no key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        b_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    else:
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_shift = b_m_new
    b_p = tl.exp2(b_s - b_shift[:, None])
    b_alpha = tl.exp2(b_m - b_shift)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None]
    b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc, input_precision=DOT_PRECISION)
    return b_acc, b_l, b_m_new


# Sizes that change from step to step are not specialised (on == 1 or % 16), so one compile serves a
# whole generation instead of one per new value class.
@triton.jit(do_not_specialize=["HKV", "num_splits", "num_pages", "max_kv", "num_rows"])
def _paged_attention_fwd_kernel(
    q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, o, lse,
    stride_qt, stride_qh, stride_qd,
    stride_kp, stride_ks, stride_kh, stride_kd,
    stride_vp, stride_vs, stride_vh, stride_vd,
    stride_btb, stride_btp,
    stride_os, stride_ot, stride_oh, stride_od,
    stride_ls, stride_lt, stride_lh,
    HKV,
    num_splits,
    scale_log2,
    num_pages,
    max_kv,
    num_rows,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    SPLIT: tl.constexpr,
    STORE_LSE: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # q: [T, H, D]; k/v_cache: [num_pages, PAGE_SIZE, HKV, D]; o: [S, T, H, D]; lse: [S, T, H]
    i_bh = tl.program_id(0)
    i_m = tl.program_id(1)
    i_s = tl.program_id(2).to(tl.int64)
    i_b = (i_bh // HKV).to(tl.int64)
    i_hkv = (i_bh % HKV).to(tl.int64)

    q_start = tl.load(cu_q_lens + i_b)
    q_len = tl.load(cu_q_lens + i_b + 1) - q_start
    if i_m * BLOCK_M >= q_len * GROUP:
        return
    # Clamped so that even unchecked lengths stay inside the block table row.
    kv_len = tl.minimum(tl.maximum(tl.load(kv_lens + i_b), 0), max_kv)

    o_r = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_i = o_r // GROUP
    o_h = i_hkv * GROUP + o_r % GROUP
    o_d = tl.arange(0, HEAD_DIM)
    o_t = q_start.to(tl.int64) + o_i
    m_r = (o_i < q_len) & (o_t >= 0) & (o_t < num_rows)
    b_q = tl.load(q + o_t[:, None] * stride_qt + o_h[:, None] * stride_qh + o_d[None, :] * stride_qd,
                  mask=m_r[:, None], other=0.0)
    if INTERP_BF16:
        b_q = b_q.to(tl.float32)

    # Row r sees keys [0, b_limit[r]); the first and last query of the block bound the unmasked and
    # masked key ranges.
    i_lo = (i_m * BLOCK_M) // GROUP
    i_hi = tl.minimum((i_m * BLOCK_M + BLOCK_M - 1) // GROUP, q_len - 1)
    if IS_CAUSAL:
        b_limit = kv_len - (q_len - 1 - o_i)
        full_end = tl.maximum(kv_len - (q_len - 1 - i_lo), 0)
        kv_end = tl.maximum(kv_len - (q_len - 1 - i_hi), 0)
    else:
        b_limit = tl.zeros([BLOCK_M], dtype=tl.int32) + kv_len
        full_end = kv_len
        kv_end = kv_len
    if SPLIT:
        chunk = tl.cdiv(tl.cdiv(kv_end, num_splits), BLOCK_N) * BLOCK_N
        lo = (i_s * chunk).to(tl.int32)
        hi = tl.minimum(lo + chunk, kv_end)
    else:
        lo = 0
        hi = kv_end
    mid = lo + (tl.maximum(tl.minimum(hi, full_end) - lo, 0) // BLOCK_N) * BLOCK_N

    p_k = k_cache + i_hkv * stride_kh
    p_v = v_cache + i_hkv * stride_vh
    p_bt = block_table + i_b * stride_btb
    b_acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    i_page = _tile_pages(p_bt, lo, hi, stride_btp, num_pages, PAGE_SIZE, BLOCK_N)
    for start in range(lo, mid, BLOCK_N):
        i_next = _tile_pages(p_bt, start + BLOCK_N, hi, stride_btp, num_pages, PAGE_SIZE, BLOCK_N)
        b_acc, b_l, b_m = _paged_attention_tile(
            b_acc, b_l, b_m, b_q, i_page, p_k, p_v, start, hi, b_limit,
            stride_kp, stride_ks, stride_kd, stride_vp, stride_vs, stride_vd, scale_log2,
            HEAD_DIM, PAGE_SIZE, BLOCK_N, False, INTERP_BF16, DOT_PRECISION,
        )
        i_page = i_next
    for start in range(mid, hi, BLOCK_N):
        i_next = _tile_pages(p_bt, start + BLOCK_N, hi, stride_btp, num_pages, PAGE_SIZE, BLOCK_N)
        b_acc, b_l, b_m = _paged_attention_tile(
            b_acc, b_l, b_m, b_q, i_page, p_k, p_v, start, hi, b_limit,
            stride_kp, stride_ks, stride_kd, stride_vp, stride_vs, stride_vd, scale_log2,
            HEAD_DIM, PAGE_SIZE, BLOCK_N, True, INTERP_BF16, DOT_PRECISION,
        )
        i_page = i_next

    # A row that saw no key gets out 0 and lse -inf.
    b_l_safe = tl.where(b_l == 0.0, 1.0, b_l)
    b_o = b_acc / b_l_safe[:, None]
    if INTERP_BF16 and not SPLIT:
        b_o = _round_bf16(b_o)
    p_o = o + i_s * stride_os + o_t[:, None] * stride_ot + o_h[:, None] * stride_oh + o_d[None, :] * stride_od
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_r[:, None])
    if STORE_LSE:
        b_lse = tl.where(b_l == 0.0, float("-inf"), (b_m + tl.log2(b_l_safe)) * 0.6931471805599453)
        tl.store(lse + i_s * stride_ls + o_t * stride_lt + o_h * stride_lh, b_lse, mask=m_r)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(num_programs: int, max_kv_len: int, num_sms: int) -> int:
    """Split count from shapes only: split when the grid fills less than one wave and the cache is long.

    num_programs: B * Hkv * query blocks; max_kv_len: the key span of the block table.
    """
    if num_programs >= num_sms or max_kv_len < 2 * MIN_KEYS_PER_SPLIT:
        return 1
    return max(1, min(triton.cdiv(num_sms, num_programs), max_kv_len // MIN_KEYS_PER_SPLIT, MAX_SPLITS))


def _launch_shape(max_rows: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps), each choice spill-free for sm_90 and sm_80 (scripts/compile_gates.py).

    float32 dots run as FMAs with both operands in registers: small row blocks (16 at head_dim 128, at
    most 32 below) and 8 warps; the 16-bit tiles spill there. 16-bit: 64 keys a tile, 4 warps, except
    32 rows at head_dim <= 64 (32 keys: 32x64 spills 8 B on sm_80) and 64 rows at head_dim 128 (8 warps:
    4 need 255 registers and spill with causal + split)."""
    block_m = min(64, max(16, triton.next_power_of_2(max(max_rows, 1))))
    if dtype == torch.float32:
        if head_dim > 64 or block_m == 16:
            return 16, 32, 8
        return 32, 64, 8
    if block_m == 32 and head_dim <= 64:
        return 32, 32, 4
    if block_m == 64 and head_dim > 64:
        return 64, 64, 8
    return block_m, 64, 4


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    kv_lens: torch.Tensor,
    cu_q_lens: torch.Tensor,
    max_q_len: int,
    causal: bool,
    scale: float,
    return_lse: bool,
    *,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of packed varlen queries against a paged KV cache.

    q: [T, H, D]; k_cache, v_cache: [num_pages, page_size, Hkv, D] (a layer view of a pool is fine);
    block_table: int32 [B, max_pages]; kv_lens: int32 [B]; cu_q_lens: int32 [B + 1]; max_q_len: a host
    int >= every q_len. Causal masking is bottom-right aligned. Returns out [T, H, D] (q.dtype) and
    lse [T, H] float32 (shape [0] unless return_lse). `num_splits` forces the split-KV count
    (1 disables it); by default it is chosen from the shapes.
    """
    t, h, d = q.shape
    num_pages, page_size, hkv, _ = k_cache.shape
    b = block_table.shape[0]
    if d < 16 or d > MAX_HEAD_DIM or d & (d - 1):
        raise ValueError(f"triton paged_attention: head_dim must be a power of two in [16, {MAX_HEAD_DIM}], got {d}")
    if page_size & (page_size - 1):
        raise ValueError(f"triton paged_attention: page_size must be a power of two, got {page_size}")
    group = h // hkv
    max_kv = block_table.shape[1] * page_size

    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((t, h), dtype=torch.float32, device=q.device) if return_lse else None
    empty_lse = q.new_empty((0,), dtype=torch.float32)
    if t == 0:
        return out, lse if return_lse else empty_lse
    if b == 0 or max_kv == 0 or max_q_len <= 0:
        out.zero_()
        if return_lse:
            lse.fill_(float("-inf"))
        return out, lse if return_lse else empty_lse

    block_m, block_n, num_warps = _launch_shape(max_q_len * group, d, q.dtype)
    num_m = triton.cdiv(max_q_len * group, block_m)
    if num_splits is None:
        num_sms = _num_sms(q.device.index or 0) if q.is_cuda else 1
        num_splits = choose_num_splits(b * hkv * num_m, max_kv, num_sms)
    num_splits = max(1, min(int(num_splits), triton.cdiv(max_kv, block_n)))
    split = num_splits > 1
    if split:
        o_dst = torch.empty((num_splits, t, h, d), dtype=torch.float32, device=q.device)
        lse_dst = torch.empty((num_splits, t, h), dtype=torch.float32, device=q.device)
    else:
        o_dst = out.unsqueeze(0)
        lse_dst = lse.unsqueeze(0) if return_lse else empty_lse.view(1, 0, 1)

    grid = (b * hkv, num_m, num_splits)
    _paged_attention_fwd_kernel[grid](
        q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, o_dst, lse_dst,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        block_table.stride(0), block_table.stride(1),
        o_dst.stride(0), o_dst.stride(1), o_dst.stride(2), o_dst.stride(3),
        lse_dst.stride(0), lse_dst.stride(1), lse_dst.stride(2),
        hkv,
        num_splits,
        scale * math.log2(math.e),
        num_pages,
        max_kv,
        t,
        GROUP=group,
        HEAD_DIM=d,
        PAGE_SIZE=page_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        IS_CAUSAL=bool(causal),
        SPLIT=split,
        STORE_LSE=split or return_lse,
        INTERP_BF16=INTERPRET and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=2,
    )
    if split:
        combine_splits(o_dst, lse_dst, out, lse)
    return out, lse if return_lse else empty_lse
