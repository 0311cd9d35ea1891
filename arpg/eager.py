"""The eager oracle and baseline: decoding the way the original ARPG code does it.

Per step, each layer concatenates the new K/V onto dense per-layer tensors `[R, H, S, D]` and calls
`torch.nn.functional.scaled_dot_product_attention` (no mask). It shares the plan (`engine.make_plan`)
and the sampler (`sampling.sample`) with the paged engine, so given the same order and tokens the two
must produce the same logits at every step.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .engine import draw_order, make_plan
from .model import ARPG, apply_rope
from .sampling import make_generator, sample

__all__ = ["eager_generate"]


def _heads(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """[R, n, dim] -> [R, n, H, D]."""
    return t.view(*t.shape[:2], n_head, -1)


def _sdpa(q, k, v, causal: bool = False) -> torch.Tensor:
    """q: [R, n, H, D]; k, v: [R, H, S, D] -> [R, n, H * D]. causal: query i sees keys 0..S - n + i."""
    mask = None
    if causal:
        n, s = q.shape[1], k.shape[2]
        mask = torch.ones(n, s, dtype=torch.bool, device=q.device).tril(s - n)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask)
    return o.transpose(1, 2).flatten(2)


class _DenseCache:
    def __init__(self):
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """k, v: [R, n, H, D] -> the whole cache [R, H, S, D]."""
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


def _eager_step(model: ARPG, tokens, rope_in, rope_q, n_q: int, caches: list[_DenseCache],
                causal: bool = False) -> torch.Tensor:
    """tokens [R, n_in]; rope_in [n_in, D/2, 2]; rope_q [n_q, D/2, 2] -> float32 logits [R, n_q, V].
    causal: the fed tokens attend each other causally (`ARPG.decode_step`'s flag)."""
    h = model.config.n_head
    x = model.embeddings(tokens)
    for layer, cache in zip(model.layers.self_dec, caches):
        a = layer.attn
        xn = layer.attn_norm(x)
        q = apply_rope(_heads(a.to_q(xn), h), rope_in)
        k = apply_rope(_heads(a.to_k(xn), h), rope_in)
        k_all, v_all = cache.update(k, _heads(a.to_v(xn), h))
        x = x + a.proj(_sdpa(q, k_all, v_all, causal))
        x = x + layer.ffn(layer.ffn_norm(x))
    k, v = model.layers.shared_kv(x, rope_in)
    k_all, v_all = caches[-1].update(k, v)
    q_stream = model.mask_queries(tokens.shape[0], n_q)
    for layer in model.layers.cross_dec:
        a = layer.attn
        q = apply_rope(_heads(a.to_q(layer.attn_norm(q_stream)), h), rope_q)
        q_stream = q_stream + a.proj(_sdpa(q, k_all, v_all))
        q_stream = q_stream + layer.ffn(layer.ffn_norm(q_stream))
    return model.head(model.norm(q_stream)).float()


@torch.inference_mode()
def eager_generate(
    model: ARPG,
    labels: torch.Tensor,
    num_steps: int,
    schedule: Union[str, Sequence[int]] = "arccos",
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    order=None,
    return_logits: bool = False,
    teacher_tokens: Optional[torch.Tensor] = None,
):
    """Same arguments and results as `engine.generate` (for an ARPG model), computed eagerly."""
    cfg = model.config
    seq_len = cfg.seq_len
    device = next(model.parameters()).device
    labels = torch.as_tensor(labels, device=device).long().reshape(-1)
    bsz = labels.shape[0]
    use_cfg = cfg_scale != 1.0
    gen = make_generator(device, seed, generator)
    steps = make_plan(seq_len, num_steps, draw_order(seq_len, device, gen, order), schedule, cfg_scale, cfg_schedule)
    if teacher_tokens is not None:
        teacher_tokens = teacher_tokens.to(device).long().reshape(bsz, seq_len)

    rope = model.rope_table(device)
    caches = [_DenseCache() for _ in range(model.num_cache_layers)]
    out = torch.zeros(bsz, seq_len, dtype=torch.long, device=device)
    all_logits = []
    cls = model.class_ids(labels)
    tokens = (torch.cat([cls, torch.full_like(cls, cfg.null_class_id)]) if use_cfg else cls)[:, None]
    for st in steps:
        pos_in = torch.tensor(st.pos_in, device=device)
        targets = torch.tensor(st.targets, device=device)
        logits = _eager_step(model, tokens, rope[pos_in], rope[targets + 1], st.n_q, caches)
        if return_logits:
            all_logits.append(logits.clone())
        if teacher_tokens is not None:
            sampled = teacher_tokens.index_select(1, targets)
        elif use_cfg:
            sampled = sample(logits[:bsz], temperature, top_k, top_p, gen, uncond=logits[bsz:], cfg_scale=st.cfg)
        else:
            sampled = sample(logits, temperature, top_k, top_p, gen)
        out.index_copy_(1, targets, sampled)
        tokens = torch.cat([sampled, sampled]) if use_cfg else sampled
    return (out, all_logits) if return_logits else out
