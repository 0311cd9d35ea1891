"""Triton append_kv: scatter new K/V rows into a paged cache through a slot mapping."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .merge import INTERPRET, _round_bf16

__all__ = ["append_kv", "append_kv_rope"]


@triton.jit
def _append_kv_kernel(
    k, v, k_cache, v_cache, slot_mapping,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcp, stride_kcs, stride_kch, stride_kcd,
    stride_vcp, stride_vcs, stride_vch, stride_vcd,
    HKV, PAGE_SIZE, num_slots,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # k, v: [T, HKV, D]; k/v_cache: [num_pages, PAGE_SIZE, HKV, D]; slot_mapping: int64 [T]
    i_t = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    i_slot = tl.load(slot_mapping + i_t).to(tl.int64)
    # -1 skips the row; so does any slot outside the cache (unchecked input never writes out of bounds).
    if (i_slot < 0) | (i_slot >= num_slots):
        return
    i_page = i_slot // PAGE_SIZE
    i_off = i_slot % PAGE_SIZE
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    o_d = tl.arange(0, BLOCK_D)
    m_hd = (o_h[:, None] < HKV) & (o_d[None, :] < HEAD_DIM)

    b_k = tl.load(k + i_t * stride_kt + o_h[:, None] * stride_kh + o_d[None, :] * stride_kd, mask=m_hd)
    b_v = tl.load(v + i_t * stride_vt + o_h[:, None] * stride_vh + o_d[None, :] * stride_vd, mask=m_hd)
    p_kc = k_cache + i_page * stride_kcp + i_off * stride_kcs + o_h[:, None] * stride_kch + o_d[None, :] * stride_kcd
    p_vc = v_cache + i_page * stride_vcp + i_off * stride_vcs + o_h[:, None] * stride_vch + o_d[None, :] * stride_vcd
    tl.store(p_kc, b_k.to(k_cache.dtype.element_ty), mask=m_hd)
    tl.store(p_vc, b_v.to(v_cache.dtype.element_ty), mask=m_hd)


@triton.jit
def _append_kv_rope_kernel(
    k, v, k_cache, v_cache, slot_mapping, rope,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcp, stride_kcs, stride_kch, stride_kcd,
    stride_vcp, stride_vcs, stride_vch, stride_vcd,
    stride_rt, stride_ri,
    HKV, PAGE_SIZE, num_slots,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):
    # append_kv of k rotated pairwise: rope [T, HEAD_DIM / 2, 2] float32 (cos, sin); BLOCK_D covers the pairs.
    i_t = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    i_slot = tl.load(slot_mapping + i_t).to(tl.int64)
    if (i_slot < 0) | (i_slot >= num_slots):
        return
    i_page = i_slot // PAGE_SIZE
    i_off = i_slot % PAGE_SIZE
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    o_i = tl.arange(0, BLOCK_D)  # pair index
    m_i = o_i < HEAD_DIM // 2
    m_hi = (o_h[:, None] < HKV) & m_i[None, :]
    cos = tl.load(rope + i_t * stride_rt + o_i * stride_ri, mask=m_i, other=0.0)
    sin = tl.load(rope + i_t * stride_rt + o_i * stride_ri + 1, mask=m_i, other=0.0)
    p_k = k + i_t * stride_kt + o_h[:, None] * stride_kh + (2 * o_i[None, :]) * stride_kd
    x0 = tl.load(p_k, mask=m_hi).to(tl.float32)
    x1 = tl.load(p_k + stride_kd, mask=m_hi).to(tl.float32)
    y0 = x0 * cos[None, :] - x1 * sin[None, :]
    y1 = x1 * cos[None, :] + x0 * sin[None, :]
    if INTERP_BF16:  # the interpreter truncates float32 -> bf16 casts
        y0 = _round_bf16(y0)
        y1 = _round_bf16(y1)
    p_kc = k_cache + i_page * stride_kcp + i_off * stride_kcs + o_h[:, None] * stride_kch + (2 * o_i[None, :]) * stride_kcd
    tl.store(p_kc, y0.to(k_cache.dtype.element_ty), mask=m_hi)
    tl.store(p_kc + stride_kcd, y1.to(k_cache.dtype.element_ty), mask=m_hi)
    o_d = tl.arange(0, 2 * BLOCK_D)
    m_hd = (o_h[:, None] < HKV) & (o_d[None, :] < HEAD_DIM)
    b_v = tl.load(v + i_t * stride_vt + o_h[:, None] * stride_vh + o_d[None, :] * stride_vd, mask=m_hd)
    p_vc = v_cache + i_page * stride_vcp + i_off * stride_vcs + o_h[:, None] * stride_vch + o_d[None, :] * stride_vcd
    tl.store(p_vc, b_v.to(v_cache.dtype.element_ty), mask=m_hd)


def append_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write rows into the cache in place.

    k, v: [T, Hkv, D]; k_cache, v_cache: [num_pages, page_size, Hkv, D] (a layer view of a pool is fine);
    slot_mapping: int64 [T], slot = page * page_size + offset, -1 skips the row.
    """
    t, hkv, d = k.shape
    page_size = k_cache.shape[1]
    if t == 0 or hkv == 0 or d == 0:
        return
    block_d = triton.next_power_of_2(d)
    block_h = max(1, min(triton.next_power_of_2(hkv), 4096 // block_d))
    grid = (t, triton.cdiv(hkv, block_h))
    _append_kv_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        hkv, page_size, k_cache.shape[0] * page_size,
        HEAD_DIM=d,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
    )


def append_kv_rope(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    rope: torch.Tensor,
) -> None:
    """`append_kv` of k rotated by rope (float32 [T, D // 2, 2], (cos, sin) per pair) and v, in place."""
    t, hkv, d = k.shape
    page_size = k_cache.shape[1]
    if t == 0 or hkv == 0 or d == 0:
        return
    rope = rope.contiguous()  # (cos, sin) adjacent: the kernel reads sin at cos + 1
    block_i = triton.next_power_of_2(d // 2)
    block_h = max(1, min(triton.next_power_of_2(hkv), 2048 // block_i))
    grid = (t, triton.cdiv(hkv, block_h))
    _append_kv_rope_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping, rope,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        rope.stride(0), rope.stride(1),
        hkv, page_size, k_cache.shape[0] * page_size,
        HEAD_DIM=d,
        BLOCK_H=block_h,
        BLOCK_D=block_i,
        INTERP_BF16=INTERPRET and k_cache.dtype == torch.bfloat16,
    )
