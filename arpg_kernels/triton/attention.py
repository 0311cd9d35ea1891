"""Triton dense attention, FlashAttention-2 style: forward storing the LSE; backward in two launches, the
row sums delta = rowsum(dO * O) - dLSE, then one kernel whose programs each compute either a key block's
dK and dV or a query block's dQ (the Triton tutorial's single-kernel form: the dQ programs recompute the
scores and dP, 7 GEMMs per tile pair where FA2 takes 5 by accumulating dQ with atomics; no atomics here).

Causal masking is bottom-right aligned (query i sees keys j <= i + Lk - Lq), which lets Lq differ from
Lk. Each loop is split into an unmasked stage, over key (or query) tiles that every row of the block
sees, and a masked stage over the diagonal and ragged tail. GQA: a query head h reads KV head
h // (H / Hkv); the dK/dV program of a KV head loops over its query heads, so no atomics are needed.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .merge import _round_bf16

__all__ = ["attention_forward", "attention_backward"]

# The interpreter stores bf16 as raw 16-bit integers, so arithmetic on bf16 tiles is wrong there:
# with INTERP_BF16 the kernels upcast bf16 tiles right after loading and round outputs by hand.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# The largest head_dim the dense and paged kernels' tiles are chosen (and gated spill-free) for.
MAX_HEAD_DIM = 128


def _configs(names, interpret_tiles, tiles):
    """Autotune configs over the tile sizes `names` (e.g. BLOCK_M, BLOCK_N). `tiles` maps (float32,
    head_dim > 64) to lists of (*sizes, warps, stages): float32 ("ieee" dots run as FMAs with both operands
    in registers) and the larger head_dim need smaller tiles than 16-bit inputs at head_dim <= 64, whose
    tiles spill there. `_pick_configs` keeps the list of the inputs' class; registers grow with head_dim,
    so each list is gated (scripts/compile_gates.py: no spills on sm_90 and sm_80) at its class's largest
    head_dim, 64 or 128. Autotuning needs a driver to time configs, so the interpreter gets exactly one."""
    if INTERPRET:
        return [triton.Config(dict(zip(names, interpret_tiles)), num_warps=4, num_stages=1)]
    configs = []
    for kind, kind_tiles in tiles.items():
        for *sizes, warps, stages in kind_tiles:
            config = triton.Config(dict(zip(names, sizes)), num_warps=warps, num_stages=stages)
            config.arpg_kind = kind
            configs.append(config)
    return configs


def _pick_configs(configs, named_args, **kwargs):
    kind = (kwargs["DOT_PRECISION"] == "ieee", kwargs["HEAD_DIM"] > 64)
    return [c for c in configs if getattr(c, "arpg_kind", kind) == kind]


_PRUNE = {"early_config_prune": _pick_configs}
# Tiles keyed (float32, head_dim > 64), each list what scripts/compile_gates.py compiled spill-free for
# sm_90 and sm_80 (benchmarks/results/compile/kernels.csv). Forward: (BLOCK_M, BLOCK_N, warps, stages).
# Backward, one launch for both passes: dK/dV take BLOCK_M1 query rows at a time against a BLOCK_N1 key
# block, dQ BLOCK_N2 keys at a time against a BLOCK_M2 query block: (M1, N1, M2, N2, warps, stages).
_FWD_CONFIGS = _configs(("BLOCK_M", "BLOCK_N"), (32, 16), {
    (False, False): [(64, 64, 8, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 2)],
    (False, True): [(64, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 2)],
    (True, False): [(32, 32, 4, 2), (64, 32, 8, 2), (32, 16, 4, 2)],
    (True, True): [(32, 16, 4, 2), (16, 32, 4, 2), (32, 16, 8, 2)],
})
_BWD_CONFIGS = _configs(("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"), (16, 32, 32, 16), {
    (False, False): [(32, 64, 64, 32, 4, 2), (32, 128, 128, 32, 8, 2), (16, 64, 64, 16, 4, 2), (16, 128, 128, 16, 8, 2)],
    (False, True): [(32, 64, 64, 32, 8, 2), (16, 64, 64, 16, 8, 2), (16, 32, 64, 32, 4, 2)],
    (True, False): [(16, 16, 32, 16, 4, 2), (16, 16, 16, 32, 4, 2)],
    (True, True): [(16, 32, 16, 32, 4, 2), (16, 16, 16, 16, 4, 2)],
})
# Keyed on the lengths rounded up to a power of two (LQ_KEY, LK_KEY), not the exact ones: a new length
# re-tunes only when it crosses a power of two.
_AUTOTUNE_KEY = ["LQ_KEY", "LK_KEY", "HEAD_DIM", "GROUP", "IS_CAUSAL"]


@triton.jit
def _attn_fwd_tile(
    b_acc, b_l, b_m, b_q,
    p_kt, p_vn, start, hi, b_limit,
    scale_log2,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # p_kt: [HEAD_DIM, BLOCK_N] and p_vn: [BLOCK_N, HEAD_DIM] pointers to the tile of keys start...
    o_n = start + tl.arange(0, BLOCK_N)
    if MASKED:
        m_n = o_n < hi
        b_kt = tl.load(p_kt, mask=m_n[None, :], other=0.0)
        b_v = tl.load(p_vn, mask=m_n[:, None], other=0.0)
    else:
        b_kt = tl.load(p_kt)
        b_v = tl.load(p_vn)
    if INTERP_BF16:
        b_kt = b_kt.to(tl.float32)
        b_v = b_v.to(tl.float32)

    b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION) * scale_log2
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


@triton.autotune(configs=_FWD_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _attn_fwd_kernel(
    q, k, v, o, lse,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_lb, stride_lm, stride_lh,
    H, LQ, LK, LQ_KEY, LK_KEY,
    scale_log2,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # q, o: [B, LQ, H, D]; k, v: [B, LK, H / GROUP, D]; lse: [B, LQ, H]
    i_bh = tl.program_id(0)  # B * H on axis 0 (up to 2^31 - 1; axis 1 stops at 65,535)
    i_m = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    i_hkv = i_h // GROUP

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, HEAD_DIM)
    m_m = o_m < LQ
    p_q = q + i_b * stride_qb + i_h * stride_qh
    b_q = tl.load(p_q + o_m[:, None] * stride_qm + o_d[None, :] * stride_qd, mask=m_m[:, None], other=0.0)
    if INTERP_BF16:
        b_q = b_q.to(tl.float32)

    if IS_CAUSAL:
        b_limit = o_m + (LK - LQ + 1)
        full_end = tl.minimum(tl.maximum(i_m * BLOCK_M + LK - LQ + 1, 0), LK)
        hi = tl.minimum(tl.maximum(tl.minimum(i_m * BLOCK_M + BLOCK_M, LQ) + LK - LQ, 0), LK)
    else:
        b_limit = tl.zeros([BLOCK_M], dtype=tl.int32) + LK
        full_end = LK
        hi = LK
    mid = (full_end // BLOCK_N) * BLOCK_N

    o_n = tl.arange(0, BLOCK_N)
    p_kt = k + i_b * stride_kb + i_hkv * stride_kh + o_n[None, :] * stride_kn + o_d[:, None] * stride_kd
    p_vn = v + i_b * stride_vb + i_hkv * stride_vh + o_n[:, None] * stride_vn + o_d[None, :] * stride_vd
    b_acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for start in range(0, mid, BLOCK_N):
        b_acc, b_l, b_m = _attn_fwd_tile(
            b_acc, b_l, b_m, b_q, p_kt, p_vn, start, hi, b_limit, scale_log2,
            BLOCK_N, False, INTERP_BF16, DOT_PRECISION,
        )
        p_kt += BLOCK_N * stride_kn
        p_vn += BLOCK_N * stride_vn
    for start in range(mid, hi, BLOCK_N):
        b_acc, b_l, b_m = _attn_fwd_tile(
            b_acc, b_l, b_m, b_q, p_kt, p_vn, start, hi, b_limit, scale_log2,
            BLOCK_N, True, INTERP_BF16, DOT_PRECISION,
        )
        p_kt += BLOCK_N * stride_kn
        p_vn += BLOCK_N * stride_vn

    b_l_safe = tl.where(b_l == 0.0, 1.0, b_l)
    b_o = b_acc / b_l_safe[:, None]
    if INTERP_BF16:
        b_o = _round_bf16(b_o)
    p_o = o + i_b * stride_ob + i_h * stride_oh + o_m[:, None] * stride_om + o_d[None, :] * stride_od
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_m[:, None])
    b_lse = tl.where(b_l == 0.0, float("-inf"), (b_m + tl.log2(b_l_safe)) * 0.6931471805599453)
    tl.store(lse + i_b * stride_lb + i_h * stride_lh + o_m * stride_lm, b_lse, mask=m_m)


@triton.jit
def _attn_bwd_preprocess_kernel(
    o, do, dlse, delta,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_gb, stride_gm, stride_gh,
    H, LQ,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # delta: [B, H, LQ] float32 = rowsum(do * o) - dlse
    i_bh = tl.program_id(0)  # B * H on axis 0 (up to 2^31 - 1; axis 1 stops at 65,535)
    i_m = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, HEAD_DIM)
    m_m = o_m < LQ
    b_o = tl.load(o + i_b * stride_ob + i_h * stride_oh + o_m[:, None] * stride_om + o_d[None, :] * stride_od,
                  mask=m_m[:, None], other=0.0).to(tl.float32)
    b_do = tl.load(do + i_b * stride_dob + i_h * stride_doh + o_m[:, None] * stride_dom + o_d[None, :] * stride_dod,
                   mask=m_m[:, None], other=0.0).to(tl.float32)
    b_g = tl.load(dlse + i_b * stride_gb + i_h * stride_gh + o_m * stride_gm, mask=m_m, other=0.0)
    b_delta = tl.sum(b_o * b_do, 1) - b_g
    tl.store(delta + i_bh.to(tl.int64) * LQ + o_m, b_delta, mask=m_m)


@triton.jit
def _attn_bwd_dkdv_tile(
    b_dk, b_dv, b_k, b_v,
    p_qt, p_do, p_lse, p_delta, start, o_n, LQ, LK,
    scale_log2,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # p_qt: [HEAD_DIM, BLOCK_M], p_do: [BLOCK_M, HEAD_DIM], p_lse, p_delta: [BLOCK_M] at query rows start...
    o_m = start + tl.arange(0, BLOCK_M)
    m_m = o_m < LQ
    b_qt = tl.load(p_qt, mask=m_m[None, :], other=0.0)
    b_do = tl.load(p_do, mask=m_m[:, None], other=0.0)
    if INTERP_BF16:
        b_qt = b_qt.to(tl.float32)
        b_do = b_do.to(tl.float32)
    # Rows past LQ, and rows that saw no key (lse = -inf), get lse = +inf so their p is 0.
    b_lse = tl.load(p_lse, mask=m_m, other=float("inf"))
    b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse * 1.4426950408889634)
    b_delta = tl.load(p_delta, mask=m_m, other=0.0)

    b_st = tl.dot(b_k, b_qt, input_precision=DOT_PRECISION) * scale_log2
    b_pt = tl.exp2(b_st - b_lse[None, :])
    if MASKED:
        b_pt = tl.where(o_n[:, None] <= o_m[None, :] + (LK - LQ), b_pt, 0.0)
    b_dv = tl.dot(b_pt.to(b_do.dtype), b_do, b_dv, input_precision=DOT_PRECISION)
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)
    b_dst = b_pt * (b_dpt - b_delta[None, :])
    b_dk = tl.dot(b_dst.to(b_qt.dtype), tl.trans(b_qt), b_dk, input_precision=DOT_PRECISION)
    return b_dk, b_dv


@triton.jit
def _attn_bwd_dkdv_block(
    q, k, v, do, lse, delta, dk, dv,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_lb, stride_lm, stride_lh,
    stride_dkb, stride_dkn, stride_dkh, stride_dkd,
    stride_dvb, stride_dvn, stride_dvh, stride_dvd,
    i_b, i_hkv, i_n, HKV, LQ, LK,
    scale, scale_log2,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # dK, dV of key block i_n of (batch i_b, KV head i_hkv), summed over the GROUP query heads of that KV
    # head inside the program (no atomics).
    n_lo = i_n * BLOCK_N
    o_n = n_lo + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM)
    m_n = o_n < LK
    b_k = tl.load(k + i_b * stride_kb + i_hkv * stride_kh + o_n[:, None] * stride_kn + o_d[None, :] * stride_kd,
                  mask=m_n[:, None], other=0.0)
    b_v = tl.load(v + i_b * stride_vb + i_hkv * stride_vh + o_n[:, None] * stride_vn + o_d[None, :] * stride_vd,
                  mask=m_n[:, None], other=0.0)
    if INTERP_BF16:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)

    if IS_CAUSAL:
        # Query rows from first_row on see part of this key block; rows from full_row on see all of it.
        first_row = tl.maximum(n_lo - (LK - LQ), 0)
        full_row = tl.maximum(n_lo + BLOCK_N - 1 - (LK - LQ), 0)
        m_lo = (first_row // BLOCK_M) * BLOCK_M
        m_mid = m_lo + tl.cdiv(tl.maximum(full_row - m_lo, 0), BLOCK_M) * BLOCK_M
    else:
        m_lo = 0
        m_mid = 0

    b_dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    o_m = m_lo + tl.arange(0, BLOCK_M)
    for i_g in range(GROUP):
        i_h = i_hkv * GROUP + i_g
        p_qt = q + i_b * stride_qb + i_h * stride_qh + o_m[None, :] * stride_qm + o_d[:, None] * stride_qd
        p_do = do + i_b * stride_dob + i_h * stride_doh + o_m[:, None] * stride_dom + o_d[None, :] * stride_dod
        p_lse = lse + i_b * stride_lb + i_h * stride_lh + o_m * stride_lm
        p_delta = delta + (i_b * HKV * GROUP + i_h) * LQ + o_m
        for start in range(m_lo, tl.minimum(m_mid, LQ), BLOCK_M):
            b_dk, b_dv = _attn_bwd_dkdv_tile(
                b_dk, b_dv, b_k, b_v, p_qt, p_do, p_lse, p_delta, start, o_n, LQ, LK, scale_log2,
                BLOCK_M, True, INTERP_BF16, DOT_PRECISION,
            )
            p_qt += BLOCK_M * stride_qm
            p_do += BLOCK_M * stride_dom
            p_lse += BLOCK_M * stride_lm
            p_delta += BLOCK_M
        for start in range(m_mid, LQ, BLOCK_M):
            b_dk, b_dv = _attn_bwd_dkdv_tile(
                b_dk, b_dv, b_k, b_v, p_qt, p_do, p_lse, p_delta, start, o_n, LQ, LK, scale_log2,
                BLOCK_M, False, INTERP_BF16, DOT_PRECISION,
            )
            p_qt += BLOCK_M * stride_qm
            p_do += BLOCK_M * stride_dom
            p_lse += BLOCK_M * stride_lm
            p_delta += BLOCK_M

    b_dk = b_dk * scale
    if INTERP_BF16:
        b_dk = _round_bf16(b_dk)
        b_dv = _round_bf16(b_dv)
    p_dk = dk + i_b * stride_dkb + i_hkv * stride_dkh + o_n[:, None] * stride_dkn + o_d[None, :] * stride_dkd
    p_dv = dv + i_b * stride_dvb + i_hkv * stride_dvh + o_n[:, None] * stride_dvn + o_d[None, :] * stride_dvd
    tl.store(p_dk, b_dk.to(dk.dtype.element_ty), mask=m_n[:, None])
    tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_n[:, None])


@triton.jit
def _attn_bwd_dq_tile(
    b_dq, b_q, b_do, b_lse, b_delta,
    p_kt, p_vt, start, hi, b_limit,
    scale_log2,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # p_kt, p_vt: [HEAD_DIM, BLOCK_N] pointers to the tile of keys start...
    o_n = start + tl.arange(0, BLOCK_N)
    if MASKED:
        m_n = o_n < hi
        b_kt = tl.load(p_kt, mask=m_n[None, :], other=0.0)
        b_vt = tl.load(p_vt, mask=m_n[None, :], other=0.0)
    else:
        b_kt = tl.load(p_kt)
        b_vt = tl.load(p_vt)
    if INTERP_BF16:
        b_kt = b_kt.to(tl.float32)
        b_vt = b_vt.to(tl.float32)

    b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION) * scale_log2
    b_p = tl.exp2(b_s - b_lse[:, None])
    if MASKED:
        b_p = tl.where(o_n[None, :] < tl.minimum(b_limit, hi)[:, None], b_p, 0.0)
    b_dp = tl.dot(b_do, b_vt, input_precision=DOT_PRECISION)
    b_ds = b_p * (b_dp - b_delta[:, None])
    b_dq = tl.dot(b_ds.to(b_kt.dtype), tl.trans(b_kt), b_dq, input_precision=DOT_PRECISION)
    return b_dq


@triton.jit
def _attn_bwd_dq_block(
    q, k, v, do, lse, delta, dq,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_lb, stride_lm, stride_lh,
    stride_dqb, stride_dqm, stride_dqh, stride_dqd,
    i_b, i_h, i_m, H, LQ, LK,
    scale, scale_log2,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # dQ of query block i_m of (batch i_b, query head i_h).
    i_hkv = i_h // GROUP

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, HEAD_DIM)
    m_m = o_m < LQ
    b_q = tl.load(q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qm + o_d[None, :] * stride_qd,
                  mask=m_m[:, None], other=0.0)
    b_do = tl.load(do + i_b * stride_dob + i_h * stride_doh + o_m[:, None] * stride_dom + o_d[None, :] * stride_dod,
                   mask=m_m[:, None], other=0.0)
    if INTERP_BF16:
        b_q = b_q.to(tl.float32)
        b_do = b_do.to(tl.float32)
    b_lse = tl.load(lse + i_b * stride_lb + i_h * stride_lh + o_m * stride_lm, mask=m_m, other=float("inf"))
    b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse * 1.4426950408889634)
    b_delta = tl.load(delta + (i_b * H + i_h) * LQ + o_m, mask=m_m, other=0.0)

    if IS_CAUSAL:
        b_limit = o_m + (LK - LQ + 1)
        full_end = tl.minimum(tl.maximum(i_m * BLOCK_M + LK - LQ + 1, 0), LK)
        hi = tl.minimum(tl.maximum(tl.minimum(i_m * BLOCK_M + BLOCK_M, LQ) + LK - LQ, 0), LK)
    else:
        b_limit = tl.zeros([BLOCK_M], dtype=tl.int32) + LK
        full_end = LK
        hi = LK
    mid = (full_end // BLOCK_N) * BLOCK_N

    o_n = tl.arange(0, BLOCK_N)
    p_kt = k + i_b * stride_kb + i_hkv * stride_kh + o_n[None, :] * stride_kn + o_d[:, None] * stride_kd
    p_vt = v + i_b * stride_vb + i_hkv * stride_vh + o_n[None, :] * stride_vn + o_d[:, None] * stride_vd
    b_dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start in range(0, mid, BLOCK_N):
        b_dq = _attn_bwd_dq_tile(
            b_dq, b_q, b_do, b_lse, b_delta, p_kt, p_vt, start, hi, b_limit, scale_log2,
            BLOCK_N, False, INTERP_BF16, DOT_PRECISION,
        )
        p_kt += BLOCK_N * stride_kn
        p_vt += BLOCK_N * stride_vn
    for start in range(mid, hi, BLOCK_N):
        b_dq = _attn_bwd_dq_tile(
            b_dq, b_q, b_do, b_lse, b_delta, p_kt, p_vt, start, hi, b_limit, scale_log2,
            BLOCK_N, True, INTERP_BF16, DOT_PRECISION,
        )
        p_kt += BLOCK_N * stride_kn
        p_vt += BLOCK_N * stride_vn
    b_dq = b_dq * scale
    if INTERP_BF16:
        b_dq = _round_bf16(b_dq)
    p_dq = dq + i_b * stride_dqb + i_h * stride_dqh + o_m[:, None] * stride_dqm + o_d[None, :] * stride_dqd
    tl.store(p_dq, b_dq.to(dq.dtype.element_ty), mask=m_m[:, None])


@triton.autotune(configs=_BWD_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _attn_bwd_kernel(
    q, k, v, do, lse, delta, dk, dv, dq,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_lb, stride_lm, stride_lh,
    stride_dkb, stride_dkn, stride_dkh, stride_dkd,
    stride_dvb, stride_dvn, stride_dvh, stride_dvd,
    stride_dqb, stride_dqm, stride_dqh, stride_dqd,
    HKV, LQ, LK, LQ_KEY, LK_KEY,
    scale, scale_log2,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M1: tl.constexpr,
    BLOCK_N1: tl.constexpr,
    BLOCK_M2: tl.constexpr,
    BLOCK_N2: tl.constexpr,
):
    # dK/dV and dQ in one launch. Axis 0 is (batch, KV head) (up to 2^31 - 1; axis 1 stops at 65,535).
    # Along axis 1 the first cdiv(LK, BLOCK_N1) programs each own a key block (dK, dV over the group's
    # query heads, BLOCK_M1 query rows at a time); the rest each own a query block of one of the group's
    # heads (dQ, BLOCK_N2 keys at a time). Both read delta, which the preprocess launch wrote.
    i_bh = tl.program_id(0)
    i_p = tl.program_id(1)
    i_b = (i_bh // HKV).to(tl.int64)
    i_hkv = (i_bh % HKV).to(tl.int64)
    n_kv_blocks = tl.cdiv(LK, BLOCK_N1)
    if i_p < n_kv_blocks:
        _attn_bwd_dkdv_block(
            q, k, v, do, lse, delta, dk, dv,
            stride_qb, stride_qm, stride_qh, stride_qd,
            stride_kb, stride_kn, stride_kh, stride_kd,
            stride_vb, stride_vn, stride_vh, stride_vd,
            stride_dob, stride_dom, stride_doh, stride_dod,
            stride_lb, stride_lm, stride_lh,
            stride_dkb, stride_dkn, stride_dkh, stride_dkd,
            stride_dvb, stride_dvn, stride_dvh, stride_dvd,
            i_b, i_hkv, i_p, HKV, LQ, LK, scale, scale_log2,
            GROUP, HEAD_DIM, IS_CAUSAL, INTERP_BF16, DOT_PRECISION, BLOCK_M1, BLOCK_N1,
        )
    else:
        n_q_blocks = tl.cdiv(LQ, BLOCK_M2)
        j = i_p - n_kv_blocks
        _attn_bwd_dq_block(
            q, k, v, do, lse, delta, dq,
            stride_qb, stride_qm, stride_qh, stride_qd,
            stride_kb, stride_kn, stride_kh, stride_kd,
            stride_vb, stride_vn, stride_vh, stride_vd,
            stride_dob, stride_dom, stride_doh, stride_dod,
            stride_lb, stride_lm, stride_lh,
            stride_dqb, stride_dqm, stride_dqh, stride_dqd,
            i_b, i_hkv * GROUP + j // n_q_blocks, j % n_q_blocks, HKV * GROUP, LQ, LK, scale, scale_log2,
            GROUP, HEAD_DIM, IS_CAUSAL, INTERP_BF16, DOT_PRECISION, BLOCK_M2, BLOCK_N2,
        )


def _check_head_dim(d: int) -> None:
    if d < 16 or d > MAX_HEAD_DIM or d & (d - 1):
        raise ValueError(f"triton attention: head_dim must be a power of two in [16, {MAX_HEAD_DIM}], got {d}")


def _bucket(n: int) -> int:
    """The autotune key of a length: n rounded up to a power of two."""
    return triton.next_power_of_2(max(int(n), 1))


def _flags(dtype: torch.dtype) -> dict:
    return {
        "INTERP_BF16": INTERPRET and dtype == torch.bfloat16,
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention. q: [B, Lq, H, D]; k, v: [B, Lk, Hkv, D]; causal is bottom-right aligned.

    Returns out [B, Lq, H, D] (q.dtype) and lse [B, Lq, H] float32 (-inf, with out 0, for a query
    that sees no key).
    """
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    _check_head_dim(d)
    out = torch.empty((b, lq, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, lq, h), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse

    def grid(meta):
        return (b * h, triton.cdiv(lq, meta["BLOCK_M"]))

    _attn_fwd_kernel[grid](
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        h, lq, lk, _bucket(lq), _bucket(lk),
        scale * math.log2(math.e),
        GROUP=h // hkv,
        HEAD_DIM=d,
        IS_CAUSAL=bool(causal),
        **_flags(q.dtype),
    )
    return out, lse


def attention_backward(
    dout: torch.Tensor,
    dlse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `attention_forward` for both of its outputs.

    dout: [B, Lq, H, D]; dlse: [B, Lq, H] float32 (the gradient of lse); q, out: [B, Lq, H, D];
    k, v: [B, Lk, Hkv, D]; lse: [B, Lq, H] float32. Returns dq, dk, dv in the dtypes and shapes of
    q, k, v, with dk and dv summed over the query heads that share a KV head.
    """
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    _check_head_dim(d)
    group = h // hkv
    dq = torch.empty((b, lq, h, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, lk, hkv, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((b, lk, hkv, d), dtype=v.dtype, device=v.device)
    if b == 0 or h == 0:
        return dq, dk, dv
    flags = _flags(q.dtype)
    scale_log2 = scale * math.log2(math.e)

    delta = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    if lq > 0:
        block_m = 64
        _attn_bwd_preprocess_kernel[(b * h, triton.cdiv(lq, block_m))](
            out, dout, dlse, delta,
            *out.stride(), *dout.stride(), *dlse.stride(),
            h, lq,
            HEAD_DIM=d,
            BLOCK_M=block_m,
        )
    if lq == 0 and lk == 0:
        return dq, dk, dv

    def grid(meta):
        return (b * hkv, triton.cdiv(lk, meta["BLOCK_N1"]) + group * triton.cdiv(lq, meta["BLOCK_M2"]))

    _attn_bwd_kernel[grid](
        q, k, v, dout, lse, delta, dk, dv, dq,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse.stride(),
        *dk.stride(), *dv.stride(), *dq.stride(),
        hkv, lq, lk, _bucket(lq), _bucket(lk),
        scale, scale_log2,
        GROUP=group,
        HEAD_DIM=d,
        IS_CAUSAL=bool(causal),
        **flags,
    )
    return dq, dk, dv
