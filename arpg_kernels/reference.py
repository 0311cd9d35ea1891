"""Pure-PyTorch implementations of the ops: the oracle for every backend and the CPU implementation.

Every function here takes inputs that `arpg_kernels.checks` has already validated and a resolved
float `scale`. Math runs in float32 (float64 stays float64); outputs come back in the input dtype,
LSE in float32. Nothing here synchronizes with the host, so the reference also runs inside a CUDA
graph capture (slowly).
"""

from __future__ import annotations

import torch

__all__ = [
    "paged_attention",
    "append_kv",
    "append_kv_rope",
    "rope",
    "attention_forward",
    "attention_backward",
    "merge_attention_states",
    "gather_kv",
    "filter_logits",
    "sample_tokens",
]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked_softmax_attention(q, k, v, mask, scale):
    """q: [..., H, Lq, D], k/v: [..., H, Lk, D], mask: bool broadcastable to [..., H, Lq, Lk].

    Returns out [..., H, Lq, D] and lse [..., H, Lq]; rows without a visible key give 0 and -inf.
    """
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    # Subtracting a finite stand-in keeps fully masked rows at exp(-inf) = 0 instead of NaN.
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1))
    return torch.matmul(p, v), lse


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, max_kv_len: int):
    """Gather each sequence's pages into dense tensors.

    k_cache, v_cache: [num_pages, page_size, Hkv, D]; block_table: int32 [B, max_pages].
    Returns k, v: [B, max_kv_len, Hkv, D] (rows past a sequence's kv_len hold whatever its pages hold).
    """
    num_pages, page_size = k_cache.shape[:2]
    n_pages = -(-max_kv_len // page_size)
    pages = block_table[:, :n_pages].long().clamp(0, max(num_pages - 1, 0))
    b = block_table.shape[0]
    flat = pages.reshape(-1)
    k = k_cache.index_select(0, flat).view(b, n_pages * page_size, *k_cache.shape[2:])[:, :max_kv_len]
    v = v_cache.index_select(0, flat).view(b, n_pages * page_size, *v_cache.shape[2:])[:, :max_kv_len]
    return k, v


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of packed varlen queries against a paged KV cache.

    q: [T, H, D]; k_cache, v_cache: [num_pages, page_size, Hkv, D]; block_table: int32 [B, max_pages];
    kv_lens: int32 [B]; cu_q_lens: int32 [B + 1]. Returns out [T, H, D] (q.dtype) and lse [T, H]
    float32 (empty unless return_lse).

    The key span is the whole block table (a shape, not a value), so this never reads device data
    on the host.
    """
    t, h, d = q.shape
    b = block_table.shape[0]
    hkv = k_cache.shape[2]
    acc = _acc_dtype(q.dtype)
    max_kv = block_table.shape[1] * k_cache.shape[1]
    if t == 0 or b == 0 or max_kv == 0:
        out = torch.zeros_like(q)
        lse = q.new_full((t, h), float("-inf"), dtype=torch.float32)
        return out, lse if return_lse else q.new_empty((0,), dtype=torch.float32)

    k, v = gather_kv(k_cache, v_cache, block_table, max_kv)  # [B, S, Hkv, D]
    # Scatter packed queries into a padded [B, max_q_len] grid.
    cu = cu_q_lens.long()
    q_lens = cu[1:] - cu[:-1]
    row = torch.arange(t, device=q.device)
    seq = torch.searchsorted(cu[1:], row, right=True)  # sequence owning each packed row
    pos = row - cu[seq]  # index of the row within its sequence
    qmax = max(int(max_q_len), 1)
    qp = q.new_zeros((b, qmax, h, d), dtype=acc)
    qp[seq, pos] = q.to(acc)

    group = h // hkv
    key = torch.arange(max_kv, device=q.device)
    kv_len = kv_lens.long()
    mask = key[None, None, :] < kv_len[:, None, None]  # [B, 1, S]
    if causal:
        qi = torch.arange(qmax, device=q.device)
        limit = kv_len[:, None] - q_lens[:, None] + qi[None, :] + 1  # [B, Lq]
        mask = mask & (key[None, None, :] < limit[:, :, None])
    else:
        mask = mask.expand(b, qmax, max_kv)
    # Heads sharing a KV head become extra query rows, so K/V are never repeated: [B, Hkv, G * Lq, D].
    qg = qp.view(b, qmax, hkv, group, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, group * qmax, d)
    kf, vf = k.to(acc).transpose(1, 2), v.to(acc).transpose(1, 2)  # [B, Hkv, S, D]
    mask_g = mask[:, None, None].expand(b, 1, group, qmax, max_kv).reshape(b, 1, group * qmax, max_kv)
    o, lse = _masked_softmax_attention(qg, kf, vf, mask_g, scale)
    o = o.view(b, hkv, group, qmax, d).permute(0, 3, 1, 2, 4).reshape(b, qmax, h, d)
    lse = lse.view(b, hkv, group, qmax).permute(0, 3, 1, 2).reshape(b, qmax, h)
    out = o[seq, pos].to(q.dtype)  # [T, H, D]
    lse = lse[seq, pos].float()  # [T, H]
    return out, lse if return_lse else q.new_empty((0,), dtype=torch.float32)


def append_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write rows into the cache: k, v: [T, Hkv, D]; slot_mapping: int64 [T], -1 skips a row."""
    num_pages, page_size = k_cache.shape[:2]
    flat_k = k_cache.view(num_pages * page_size, *k_cache.shape[2:])
    flat_v = v_cache.view(num_pages * page_size, *v_cache.shape[2:])
    keep = slot_mapping >= 0
    # Skipped rows go to a scratch index past the end, so no host-side boolean indexing is needed.
    slots = torch.where(keep, slot_mapping, torch.full_like(slot_mapping, num_pages * page_size))
    pad_k = torch.cat([flat_k, flat_k.new_empty((1, *flat_k.shape[1:]))])
    pad_v = torch.cat([flat_v, flat_v.new_empty((1, *flat_v.shape[1:]))])
    pad_k.index_copy_(0, slots, k.to(k_cache.dtype))
    pad_v.index_copy_(0, slots, v.to(v_cache.dtype))
    flat_k.copy_(pad_k[:-1])
    flat_v.copy_(pad_v[:-1])


def rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by table[..., i, :] = (cos, sin), in float32; returns x's
    dtype. x: [T, H, D]; table: float32 [T, D // 2, 2]. The original's four products and two sums."""
    xs = x.float().reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    r = table.float().unsqueeze(-3)
    cos, sin = r[..., 0], r[..., 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return out.flatten(-2).to(x.dtype)


def append_kv_rope(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    table: torch.Tensor,
) -> None:
    """`append_kv` of rope(k, table) (table: float32 [T, D // 2, 2]) and v."""
    append_kv(rope(k, table), v, k_cache, v_cache, slot_mapping)


def _dense_mask(lq: int, lk: int, causal: bool, device) -> torch.Tensor:
    if not causal:
        return torch.ones((lq, lk), dtype=torch.bool, device=device)
    qi = torch.arange(lq, device=device)[:, None]
    kj = torch.arange(lk, device=device)[None, :]
    return kj < lk - lq + qi + 1


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention. q: [B, Lq, H, D]; k, v: [B, Lk, Hkv, D].

    Returns out [B, Lq, H, D] (q.dtype) and lse [B, Lq, H] float32.
    """
    acc = _acc_dtype(q.dtype)
    group = q.shape[2] // k.shape[2]
    qf = q.to(acc).transpose(1, 2)
    kf = k.to(acc).repeat_interleave(group, dim=2).transpose(1, 2)
    vf = v.to(acc).repeat_interleave(group, dim=2).transpose(1, 2)
    mask = _dense_mask(q.shape[1], k.shape[1], causal, q.device)
    o, lse = _masked_softmax_attention(qf, kf, vf, mask, scale)
    return o.transpose(1, 2).to(q.dtype).contiguous(), lse.transpose(1, 2).float().contiguous()


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

    dout: [B, Lq, H, D]; dlse: [B, Lq, H] float32 (zeros when the LSE is unused).
    Returns dq, dk, dv in the dtypes and shapes of q, k, v (GQA gradients summed over each group).
    """
    acc = _acc_dtype(q.dtype)
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    group = h // hkv
    qf = q.to(acc).transpose(1, 2)
    kf = k.to(acc).repeat_interleave(group, dim=2).transpose(1, 2)
    vf = v.to(acc).repeat_interleave(group, dim=2).transpose(1, 2)
    do = dout.to(acc).transpose(1, 2)
    o = out.to(acc).transpose(1, 2)
    lse_t = lse.to(acc).transpose(1, 2)  # [B, H, Lq]
    mask = _dense_mask(lq, lk, causal, q.device)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    finite = torch.isfinite(lse_t)
    p = torch.exp(s - torch.where(finite, lse_t, torch.zeros_like(lse_t)).unsqueeze(-1))
    p = p.masked_fill(~mask, 0.0).masked_fill(~finite.unsqueeze(-1), 0.0)
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, vf.transpose(-1, -2))
    # d lse / d s = p, so an LSE gradient enters as a shift of the row statistic.
    delta = (do * o).sum(-1) - dlse.to(acc).transpose(1, 2)
    ds = p * (dp - delta.unsqueeze(-1))
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    dk = dk.reshape(b, hkv, group, lk, d).sum(2)
    dv = dv.reshape(b, hkv, group, lk, d).sum(2)
    return (
        dq.transpose(1, 2).to(q.dtype).contiguous(),
        dk.transpose(1, 2).to(k.dtype).contiguous(),
        dv.transpose(1, 2).to(v.dtype).contiguous(),
    )


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attentions over disjoint key sets. out_*: [T, H, D]; lse_*: [T, H] float32.

    Returns out [T, H, D] (out_a.dtype) and lse [T, H] float32; two empty halves give 0 and -inf. An
    empty half (lse -inf) is ignored, whatever its output holds.
    """
    acc = _acc_dtype(out_a.dtype)
    la, lb = lse_a.to(acc), lse_b.to(acc)
    m = torch.maximum(la, lb)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = torch.exp(la - m_safe), torch.exp(lb - m_safe)
    denom = wa + wb
    empty = denom == 0
    denom_safe = torch.where(empty, torch.ones_like(denom), denom)
    # A side with no weight (an empty state) contributes nothing, whatever its output holds (NaN included).
    part_a = torch.where(wa.unsqueeze(-1) > 0, out_a.to(acc) * wa.unsqueeze(-1), 0.0)
    part_b = torch.where(wb.unsqueeze(-1) > 0, out_b.to(acc) * wb.unsqueeze(-1), 0.0)
    out = (part_a + part_b) / denom_safe.unsqueeze(-1)
    lse = torch.where(empty, torch.full_like(m, float("-inf")), m_safe + torch.log(denom_safe))
    return out.to(out_a.dtype), lse.float()


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k, then top-p (nucleus) filtering along the last dim; removed entries become -inf.

    Top-k keeps every logit >= the k-th largest. Top-p keeps the smallest prefix of the sorted
    distribution whose mass reaches top_p (always at least the most likely token). Returns a new
    tensor; the input is left alone.
    """
    if top_k and top_k > 0:
        k = min(int(top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum > top_p
        remove = torch.cat([torch.zeros_like(remove[..., :1]), remove[..., :-1]], dim=-1)
        logits = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor,
    uncond,
    cfg_scale,
    uniforms: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
) -> torch.Tensor:
    """One token per row: guidance, temperature, top-k/top-p, an inverse-CDF draw.

    logits: float32 [T, V]; uncond: float32 [T, V] or None, with cfg_scale float32 [T]: the row is
    `uncond + (logits - uncond) * cfg_scale` (the original's expression and order); uniforms: float64
    [T] in [0, 1). temperature <= 0 is greedy (argmax, a NaN counting as largest). Else the first token whose
    float64 cumulative probability exceeds `uniform * total`: an exact categorical draw of the filtered
    softmax (a token of probability 0 is never picked). A NaN row gives V - 1. Returns int64 [T].
    """
    if uncond is not None:
        logits = uncond + (logits - uncond) * cfg_scale[:, None]
    if temperature <= 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    # float64: u * total < total holds exactly, and rounding in the running sum is far below 1/V.
    cdf = torch.softmax(logits.float(), dim=-1).double().cumsum_(-1)
    index = torch.searchsorted(cdf, (uniforms[:, None] * cdf[..., -1:]).contiguous(), right=True).squeeze_(-1)
    return index.clamp_(max=cdf.shape[-1] - 1)  # only a NaN row gets past the end
