"""Triton kernels that combine partial attention states: two-way merge and the split-KV reduction."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["merge_attention_states", "combine_splits"]

# The interpreter stores bf16 as raw 16-bit integers and truncates float32 -> bf16 casts; with
# INTERP_BF16 the kernels round bf16 outputs by hand.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _round_bf16(x):
    # The interpreter truncates float32 -> bf16 casts; round to nearest even by hand, as the GPU does.
    b_u = x.to(tl.uint32, bitcast=True)
    b_u = ((b_u + 0x7FFF + ((b_u >> 16) & 1)) >> 16) << 16
    return b_u.to(tl.float32, bitcast=True)


def _block_h(h: int, d: int) -> int:
    # About 4K elements per program keeps registers modest at D = 128.
    return max(1, min(triton.next_power_of_2(h), max(1, 4096 // triton.next_power_of_2(d))))


@triton.jit
def _merge_states_kernel(
    o_a, l_a, o_b, l_b, o, lse,
    stride_oat, stride_oah,
    stride_lat, stride_lah,
    stride_obt, stride_obh,
    stride_lbt, stride_lbh,
    stride_ot, stride_oh,
    stride_lt, stride_lh,
    H,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    o_d = tl.arange(0, BLOCK_D)
    m_h = o_h < H
    m_hd = m_h[:, None] & (o_d[None, :] < HEAD_DIM)

    b_la = tl.load(l_a + i_t * stride_lat + o_h * stride_lah, mask=m_h, other=float("-inf")).to(tl.float32)
    b_lb = tl.load(l_b + i_t * stride_lbt + o_h * stride_lbh, mask=m_h, other=float("-inf")).to(tl.float32)
    b_m = tl.maximum(b_la, b_lb)
    # Both halves empty: subtract a finite stand-in so the weights come out 0, not NaN.
    b_m = tl.where(b_m == float("-inf"), 0.0, b_m)
    b_wa = tl.exp2((b_la - b_m) * 1.4426950408889634)
    b_wb = tl.exp2((b_lb - b_m) * 1.4426950408889634)
    b_den = b_wa + b_wb
    b_den_safe = tl.where(b_den == 0.0, 1.0, b_den)

    b_oa = tl.load(o_a + i_t * stride_oat + o_h[:, None] * stride_oah + o_d[None, :], mask=m_hd, other=0.0)
    b_ob = tl.load(o_b + i_t * stride_obt + o_h[:, None] * stride_obh + o_d[None, :], mask=m_hd, other=0.0)
    b_o = (b_oa.to(tl.float32) * b_wa[:, None] + b_ob.to(tl.float32) * b_wb[:, None]) / b_den_safe[:, None]
    if INTERP_BF16:
        b_o = _round_bf16(b_o)
    tl.store(o + i_t * stride_ot + o_h[:, None] * stride_oh + o_d[None, :], b_o.to(o.dtype.element_ty), mask=m_hd)
    b_lse = tl.where(b_den == 0.0, float("-inf"), b_m + tl.log2(b_den_safe) * 0.6931471805599453)
    tl.store(lse + i_t * stride_lt + o_h * stride_lh, b_lse, mask=m_h)


@triton.jit
def _combine_splits_kernel(
    o_part, l_part, o, lse,
    stride_ops, stride_opt, stride_oph,
    stride_lps, stride_lpt, stride_lph,
    stride_ot, stride_oh,
    stride_lt, stride_lh,
    H,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STORE_LSE: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):
    # o_part: [S, T, H, D] float32, l_part: [S, T, H] float32 (natural log; -inf for an empty split)
    i_t = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    o_d = tl.arange(0, BLOCK_D)
    m_h = o_h < H
    m_hd = m_h[:, None] & (o_d[None, :] < HEAD_DIM)

    p_l = l_part + i_t * stride_lpt + o_h * stride_lph
    b_m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    for i_s in range(NUM_SPLITS):
        b_m = tl.maximum(b_m, tl.load(p_l + i_s * stride_lps, mask=m_h, other=float("-inf")))
    b_m = tl.where(b_m == float("-inf"), 0.0, b_m)

    p_o = o_part + i_t * stride_opt + o_h[:, None] * stride_oph + o_d[None, :]
    b_acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    b_den = tl.zeros([BLOCK_H], dtype=tl.float32)
    for i_s in range(NUM_SPLITS):
        b_w = tl.exp2((tl.load(p_l + i_s * stride_lps, mask=m_h, other=float("-inf")) - b_m) * 1.4426950408889634)
        b_acc += b_w[:, None] * tl.load(p_o + i_s * stride_ops, mask=m_hd, other=0.0)
        b_den += b_w
    b_den_safe = tl.where(b_den == 0.0, 1.0, b_den)
    b_o = b_acc / b_den_safe[:, None]
    if INTERP_BF16:
        b_o = _round_bf16(b_o)
    tl.store(o + i_t * stride_ot + o_h[:, None] * stride_oh + o_d[None, :], b_o.to(o.dtype.element_ty), mask=m_hd)
    if STORE_LSE:
        b_lse = tl.where(b_den == 0.0, float("-inf"), b_m + tl.log2(b_den_safe) * 0.6931471805599453)
        tl.store(lse + i_t * stride_lt + o_h * stride_lh, b_lse, mask=m_h)


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attentions over disjoint key sets.

    out_a, out_b: [T, H, D]; lse_a, lse_b: [T, H] float32 (natural log, -inf for an empty set).
    Returns out [T, H, D] in out_a's dtype and lse [T, H] float32; two empty halves give 0 and -inf.
    """
    t, h, d = out_a.shape
    out = torch.empty((t, h, d), dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty((t, h), dtype=torch.float32, device=out_a.device)
    if t == 0 or h == 0:
        return out, lse
    block_h = _block_h(h, d)
    grid = (t, triton.cdiv(h, block_h))
    _merge_states_kernel[grid](
        out_a, lse_a, out_b, lse_b, out, lse,
        out_a.stride(0), out_a.stride(1),
        lse_a.stride(0), lse_a.stride(1),
        out_b.stride(0), out_b.stride(1),
        lse_b.stride(0), lse_b.stride(1),
        out.stride(0), out.stride(1),
        lse.stride(0), lse.stride(1),
        h,
        HEAD_DIM=d,
        BLOCK_H=block_h,
        BLOCK_D=triton.next_power_of_2(d),
        INTERP_BF16=INTERPRET and out.dtype == torch.bfloat16,
    )
    return out, lse


def combine_splits(
    out_part: torch.Tensor, lse_part: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None
) -> None:
    """Reduce split-KV partials into `out` (and `lse` when given).

    out_part: [S, T, H, D] float32; lse_part: [S, T, H] float32; out: [T, H, D]; lse: [T, H] float32.
    """
    s, t, h, d = out_part.shape
    if t == 0 or h == 0 or d == 0:
        return
    block_h = _block_h(h, d)
    grid = (t, triton.cdiv(h, block_h))
    store_lse = lse is not None
    lse_arg = lse if store_lse else lse_part
    _combine_splits_kernel[grid](
        out_part, lse_part, out, lse_arg,
        out_part.stride(0), out_part.stride(1), out_part.stride(2),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        out.stride(0), out.stride(1),
        lse_arg.stride(0) if store_lse else 0, lse_arg.stride(1) if store_lse else 0,
        h,
        NUM_SPLITS=s,
        HEAD_DIM=d,
        BLOCK_H=block_h,
        BLOCK_D=triton.next_power_of_2(d),
        STORE_LSE=store_lse,
        INTERP_BF16=INTERPRET and out.dtype == torch.bfloat16,
    )
