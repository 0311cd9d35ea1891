"""LlamaGen-style raster-order baseline: one causal decoder, one token per step, class token first.

Same d / h / head_dim and 2D RoPE as ARPG, with all n_layer layers as self layers. It decodes on the
same engine (paged cache, `paged_attention` with one query per sequence per step, CUDA graphs), so
ARPG vs raster comparisons measure the order and parallelism, not the code.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import RASTER_CONFIGS, ARPGConfig, get_config
from .model import (LoopStep, PagedBatch, RMSNorm, SelfDecoder, _norm, check_guidance, cpu_decode_loop,
                    cpu_decode_step, head_logits, precompute_rope_2d, step_ops)

__all__ = ["RasterLM", "RASTER_CONFIGS"]


class RasterLM(nn.Module):
    """Raster-order class-conditional image LM. Token ids as in ARPG (class `V + 1 + c`, no class `V + C + 1`)."""

    decode_order = "raster"

    def __init__(self, config: "ARPGConfig | str"):
        super().__init__()
        config = get_config(config)
        self.config = config
        self.embeddings = nn.Embedding(config.num_embeddings, config.dim)
        self.layers = nn.ModuleList([SelfDecoder(config) for _ in range(config.n_layer)])
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._rope: dict[torch.device, torch.Tensor] = {}
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @property
    def num_cache_layers(self) -> int:
        return self.config.n_layer

    def reset_parameters(self, std: float = 0.02, zero_head: bool = True) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        if zero_head:
            nn.init.zeros_(self.head.weight)

    def rope_table(self, device) -> torch.Tensor:
        device = torch.device(device)
        table = self._rope.get(device)
        if table is None:
            c = self.config
            table = precompute_rope_2d(c.grid_size, c.head_dim, c.rope_base).to(device)
            self._rope[device] = table
        return table

    def class_ids(self, labels: torch.Tensor) -> torch.Tensor:
        c = self.config
        labels = labels.long()
        return torch.where(labels < 0, torch.full_like(labels, c.null_class_id), labels + c.vocab_size + 1)

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, L] (raster order), labels [B] -> logits float32 [B, L, V] (logits[:, j] predicts
        tokens[:, j]) and the mean cross-entropy. Class dropout applies in train mode."""
        c = self.config
        bsz, seq = tokens.shape
        if seq != c.seq_len:
            raise ValueError(f"tokens has {seq} positions, config expects grid_size**2 = {c.seq_len}")
        cls = self.class_ids(labels.to(tokens.device))
        if self.training and c.class_dropout > 0:
            drop = torch.rand(bsz, device=tokens.device, generator=generator) < c.class_dropout
            cls = torch.where(drop, torch.full_like(cls, c.null_class_id), cls)
        x = self.embeddings(torch.cat([cls[:, None], tokens[:, :-1]], dim=1))
        rope = self.rope_table(tokens.device)[:seq].expand(bsz, -1, -1, -1)
        for layer in self.layers:
            x = layer(x, rope)
        logits = self.head(self.norm(x)).float()
        return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))

    def decode_step(self, tokens, pos_in, pos_q, cache, batch: PagedBatch,
                    guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens, pos_in: [T] (one per sequence) -> float32 logits [T, V] for the next token; with guidance
        (float32 [T / 2, 1]: conditional rows, then their unconditional partners) the guided logits [T / 2, V]
        (`arpg.model.head_logits`).

        pos_q is unused (the next position is implied by the order)."""
        check_guidance(guidance, tokens.shape[0], tokens.device)
        table = self.rope_table(tokens.device)
        logits = cpu_decode_step(self, self.layers, tokens, pos_in, pos_in if pos_q is None else pos_q, table, cache,
                                 batch, True, guidance=guidance)
        if logits is not None:
            return logits
        rope = table[pos_in]
        x = self.embeddings(tokens)
        for i, layer in enumerate(self.layers):
            x = layer.forward_paged(x, rope, *cache.layer(i), batch, causal=True)
        return head_logits(self.head, _norm(self.norm, x, step_ops(x, self.norm.weight)), guidance)

    def decode_loop(self, buf: torch.Tensor, steps: list[LoopStep], cache, draw, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0) -> bool:
        """As `arpg.model.ARPG.decode_loop`: every step's fed tokens attend each other causally and give the
        logits (each step's pos_q is ignored, as `decode_step` ignores it)."""
        steps = [dataclasses.replace(st, pos_q=st.pos_in, causal=True) for st in steps]
        return cpu_decode_loop(self, self.layers, None, self.rope_table(buf.device), cache, buf, steps, draw,
                               temperature, top_k, top_p)


# The decode_step that RasterLM.decode_loop replays (as ARPG's: arpg.engine._loop_goes_with_step).
RasterLM.decode_loop.decode_step = RasterLM.decode_step
