"""The LlamaGen VQ-16 image tokenizer: encoder, l2-normalised vector quantizer and decoder.

ARPG generates 16x16 grids of codes from LlamaGen's ``vq_ds16_c2i.pt`` tokenizer (codebook 16384,
code dim 8, 16x downsampling), and this module is that tokenizer for inference: images in [-1, 1]
become int64 codes [B, H/16, W/16] and codes become images again.

State-dict names and shapes follow ``tokenizer/tokenizer_image/vq_model.py`` of
FoundationVision/LlamaGen (commit 3786e6a; hp-l33/ARPG's ``models/vq_model.py`` has the same names),
so the published file loads strictly (L = len(ch_mult), R = num_res_blocks):

    encoder.conv_in
    encoder.conv_blocks.{i}.res.{j}.{norm1,conv1,norm2,conv2[,nin_shortcut]}   i < L, j < R
    encoder.conv_blocks.{i}.attn.{j}.{norm,q,k,v,proj_out}                     i == L - 1 only
    encoder.conv_blocks.{i}.downsample.conv                                    i < L - 1
    encoder.mid.{0,2} (ResnetBlock), encoder.mid.1 (AttnBlock), encoder.norm_out, encoder.conv_out
    decoder.conv_in, decoder.mid.{0,1,2}
    decoder.conv_blocks.{i}.res.{j}                                            j < R + 1
    decoder.conv_blocks.{i}.attn.{j}                                           i == 0 only
    decoder.conv_blocks.{i}.upsample.conv                                      i < L - 1
    decoder.norm_out, decoder.conv_out
    quantize.embedding.weight [codebook_size, codebook_embed_dim]
    quantize.codebook_used [65536]    (LlamaGen's training-usage buffer; unused, optional on load)
    quant_conv (z_channels -> codebook_embed_dim, 1x1), post_quant_conv (the reverse, 1x1)

``nin_shortcut`` (1x1) exists where a residual block changes the channel count. The decoder's
``conv_blocks`` run from the lowest resolution up: ``decoder.conv_blocks.0`` has ``ch * ch_mult[-1]``
channels and the attention blocks, ``decoder.conv_blocks.{L-1}`` has ``ch * ch_mult[0]``.

Numerics follow the same file: GroupNorm(32, eps=1e-6, affine) then swish (x * sigmoid(x)) before
every 3x3 conv of a residual block; single-head spatial attention scaled by 1/sqrt(C); Downsample
pads (left 0, right 1, top 0, bottom 1) with zeros then a stride-2 3x3 conv; Upsample is nearest x2
then a 3x3 conv. The quantizer l2-normalises both the latent vectors and the codebook rows, picks
``argmin |z|^2 + |e|^2 - 2 z.e`` and returns the *normalised* codebook row, which is what the
decoder sees (``get_codebook_entry`` also returns normalised rows). Training-only parts (commit /
entropy losses, usage tracking) are left out.

Image conventions (LlamaGen's sampling scripts): model images are float [B, 3, H, W] in [-1, 1];
``to_uint8`` computes ``clamp(127.5 * x + 128, 0, 255)`` and converts to uint8, which truncates, so
the net effect is round-half-up of ``127.5 * (x + 1)`` (x = -1 -> 0.5 -> 0, x = 1 -> 255.5 -> 255);
``from_uint8`` is the exact inverse on uint8 values: ``u / 127.5 - 1``.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "AttnBlock",
    "Decoder",
    "Downsample",
    "Encoder",
    "ResnetBlock",
    "Upsample",
    "VQCheckpointError",
    "VQConfig",
    "VQModel",
    "VQ_CONFIGS",
    "VectorQuantizer",
    "from_uint8",
    "load_vq",
    "to_pil",
    "to_uint8",
]

# LlamaGen registers a 65536-entry float buffer `quantize.codebook_used` (recent codes, for a
# usage statistic during training). It is part of the published state dict, so it is kept here
# for strict loading in both directions, but nothing at inference reads it.
CODEBOOK_USAGE_LEN = 65536
_USAGE_KEY = "quantize.codebook_used"


@dataclass(frozen=True)
class VQConfig:
    """Hyper-parameters of the tokenizer. The defaults are LlamaGen's VQ-16 (``vq_ds16_c2i.pt``)."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    z_channels: int = 256
    ch: int = 128
    ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    dropout: float = 0.0
    codebook_l2_norm: bool = True
    in_channels: int = 3

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        ints = ("codebook_size", "codebook_embed_dim", "z_channels", "ch", "num_res_blocks", "in_channels")
        for name in ints:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"VQConfig.{name} must be a positive int, got {v!r}")
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ValueError(
                f"VQConfig.ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult!r}"
            )
        for m in self.ch_mult:
            if (self.ch * m) % 32:
                raise ValueError(
                    f"VQConfig: ch * ch_mult entries must be divisible by 32 (GroupNorm(32)), "
                    f"got ch={self.ch}, "
                    f"ch_mult={self.ch_mult}"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VQConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along each side: 2 ** (len(ch_mult) - 1), 16 for VQ-16."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def tiny(cls) -> "VQConfig":
        """A small config with the same structure (five levels, 16x downsampling) for CPU tests."""
        return cls(
            codebook_size=64, codebook_embed_dim=4, z_channels=32, ch=32, ch_mult=(1, 1, 1, 2, 2),
            num_res_blocks=1,
        )


VQ_CONFIGS: Dict[str, VQConfig] = {"VQ-16": VQConfig(), "VQ-tiny": VQConfig.tiny()}


class VQCheckpointError(ValueError):
    """A tokenizer checkpoint that cannot be read or does not fit the model (names or shapes)."""


# ----------------------------------------------------------------------------------------------
# Building blocks (names follow LlamaGen's vq_model.py)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """norm1 -> swish -> conv1 -> norm2 -> swish -> dropout -> conv2, plus a (1x1 when channels change) skip."""

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (1x1 q/k/v/proj_out), with a residual."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = _group_norm(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # [B, C, H, W] -> [B, HW, C]; softmax(q k^T / sqrt(C)) v, as in the published bmm version.
        q, k, v = (t.reshape(b, c, h * w).transpose(1, 2) for t in (self.q(hn), self.k(hn), self.v(hn)))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 conv: [H, W] -> [H/2, W/2]."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """[B, 3, H, W] -> [B, z_channels, H/f, W/f] with f = 2 ** (len(ch_mult) - 1)."""

    def __init__(
        self, in_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, dropout=0.0, z_channels=256
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for i_level, mult in enumerate(ch_mult):
            last = i_level == self.num_resolutions - 1
            level = nn.Module()
            level.res = nn.ModuleList()
            level.attn = nn.ModuleList()
            block_out = ch * mult
            for _ in range(num_res_blocks):
                level.res.append(ResnetBlock(block_in, block_out, dropout=dropout))
                block_in = block_out
                if last:
                    level.attn.append(AttnBlock(block_in))
            if not last:
                level.downsample = Downsample(block_in)
            self.conv_blocks.append(level)

        self.mid = nn.ModuleList(
            [
                ResnetBlock(block_in, block_in, dropout=dropout),
                AttnBlock(block_in),
                ResnetBlock(block_in, block_in, dropout=dropout),
            ]
        )
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, level in enumerate(self.conv_blocks):
            for j in range(self.num_res_blocks):
                h = level.res[j](h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """[B, z_channels, h, w] -> [B, 3, h*f, w*f]; ``conv_blocks`` run from the lowest resolution up."""

    def __init__(
        self, z_channels=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, dropout=0.0, out_channels=3
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.ModuleList(
            [
                ResnetBlock(block_in, block_in, dropout=dropout),
                AttnBlock(block_in),
                ResnetBlock(block_in, block_in, dropout=dropout),
            ]
        )

        self.conv_blocks = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            level = nn.Module()
            level.res = nn.ModuleList()
            level.attn = nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                level.res.append(ResnetBlock(block_in, block_out, dropout=dropout))
                block_in = block_out
                if i_level == self.num_resolutions - 1:
                    level.attn.append(AttnBlock(block_in))
            if i_level != 0:
                level.upsample = Upsample(block_in)
            self.conv_blocks.append(level)

        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for i_level, level in enumerate(self.conv_blocks):
            for j in range(self.num_res_blocks + 1):
                h = level.res[j](h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i_level != self.num_resolutions - 1:
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-row quantizer; with ``l2_norm`` both latents and rows are unit-normalised first."""

    # Rows of latents per distance block, so the [rows, codebook_size] distance matrix stays bounded.
    chunk_rows = 4096

    def __init__(self, n_e: int, e_dim: int, l2_norm: bool = True):
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(n_e, e_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / n_e, 1.0 / n_e)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, p=2, dim=-1))
        self.register_buffer("codebook_used", torch.zeros(CODEBOOK_USAGE_LEN))

    def codebook(self) -> torch.Tensor:
        """The rows the decoder sees: l2-normalised when ``l2_norm``. [n_e, e_dim]"""
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Codes (int64) of the nearest rows to vectors z [..., e_dim]; distances in float32."""
        flat = z.reshape(-1, self.e_dim).float()
        emb = self.embedding.weight.float()
        if self.l2_norm:
            flat = F.normalize(flat, p=2, dim=-1)
            emb = F.normalize(emb, p=2, dim=-1)
        emb_sq = (emb * emb).sum(dim=1)
        out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        for s in range(0, flat.shape[0], self.chunk_rows):
            zc = flat[s : s + self.chunk_rows]
            # |z - e|^2 = |z|^2 + |e|^2 - 2 z.e, the same expression (and argmin tie-break) as LlamaGen.
            d = (zc * zc).sum(dim=1, keepdim=True) + emb_sq - 2.0 * (zc @ emb.t())
            out[s : s + zc.shape[0]] = d.argmin(dim=1)
        return out.reshape(z.shape[:-1])

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """z [B, e_dim, h, w] -> (z_q [B, e_dim, h, w], codes int64 [B, h, w]).

        z_q is the (normalised) codebook row of each code. When z needs grad, the straight-through
        estimator ``zn + (z_q - zn).detach()`` of the published file is returned instead (equal in
        value up to rounding), zn being the normalised latent.
        """
        zl = z.permute(0, 2, 3, 1)
        codes = self.lookup(zl)
        z_q = self.codebook()[codes].to(z.dtype)  # [B, h, w, e_dim]
        if torch.is_grad_enabled() and z.requires_grad:
            zn = F.normalize(zl, p=2, dim=-1) if self.l2_norm else zl
            z_q = zn + (z_q - zn).detach()
        return z_q.permute(0, 3, 1, 2).contiguous(), codes

    def get_codebook_entry(self, indices: torch.Tensor, shape=None, channel_first: bool = True) -> torch.Tensor:
        """Rows for ``indices``; LlamaGen's signature.

        With ``shape`` None: ``codebook()[indices]`` ([..., e_dim]). With ``channel_first``, ``shape`` is
        (B, C, H, W) and indices (any layout with B*H*W entries, raster order) give [B, C, H, W];
        otherwise the rows are viewed as ``shape`` (e.g. (B, H, W, C)).
        """
        z_q = self.codebook()[indices]
        if shape is None:
            return z_q
        if channel_first:
            b, c, h, w = shape
            return z_q.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        return z_q.reshape(shape)


class VQModel(nn.Module):
    """LlamaGen's VQ tokenizer (module names as in the published ``vq_model.py``)."""

    def __init__(self, config: Optional[VQConfig] = None):
        super().__init__()
        config = VQConfig() if config is None else config
        if not isinstance(config, VQConfig):
            raise ValueError(f"config must be a VQConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = Encoder(
            in_channels=config.in_channels,
            ch=config.ch,
            ch_mult=config.ch_mult,
            num_res_blocks=config.num_res_blocks,
            dropout=config.dropout,
            z_channels=config.z_channels,
        )
        self.decoder = Decoder(
            z_channels=config.z_channels,
            ch=config.ch,
            ch_mult=config.ch_mult,
            num_res_blocks=config.num_res_blocks,
            dropout=config.dropout,
            out_channels=config.in_channels,
        )
        self.quantize = VectorQuantizer(
            config.codebook_size, config.codebook_embed_dim, config.codebook_l2_norm
        )
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def _param_dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    # -- input checks ---------------------------------------------------------------------------

    def _check_images(self, images) -> None:
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"images must have rank 4 [B, 3, H, W], got shape {tuple(images.shape)}")
        c = self.config.in_channels
        if images.shape[1] != c:
            raise ValueError(
                f"images must have {c} channels (dim 1 of [B, {c}, H, W]), got shape {tuple(images.shape)}"
            )
        f = self.downsample_factor
        h, w = images.shape[2], images.shape[3]
        if h == 0 or w == 0 or h % f or w % f:
            raise ValueError(f"images height and width must be positive multiples of {f}, got {h}x{w}")
        if not images.is_floating_point():
            raise ValueError(
                f"images must be floating point in [-1, 1], got dtype {images.dtype} (see from_uint8)"
            )

    def _check_codes(self, codes) -> None:
        if not isinstance(codes, torch.Tensor):
            raise ValueError(f"codes must be a torch.Tensor [B, h, w], got {type(codes).__name__}")
        if codes.dim() != 3:
            raise ValueError(
                f"codes must have rank 3 [B, h, w], got shape {tuple(codes.shape)} "
                "(reshape [B, h*w] to [B, h, w])"
            )
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        if codes.numel() == 0:
            raise ValueError(f"codes must be non-empty, got shape {tuple(codes.shape)}")
        lo, hi = int(codes.min()), int(codes.max())
        n = self.config.codebook_size
        if lo < 0 or hi >= n:
            raise ValueError(f"codes must lie in [0, {n}), got values in [{lo}, {hi}]")

    # -- public API -----------------------------------------------------------------------------

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-quantization latents [B, codebook_embed_dim, H/f, W/f] (encoder then quant_conv)."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images.to(self._param_dtype())))

    def quantize_latents(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """z [B, codebook_embed_dim, h, w] -> (z_q [B, codebook_embed_dim, h, w], codes int64 [B, h, w])."""
        if not isinstance(z, torch.Tensor) or z.dim() != 4:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            e = self.config.codebook_embed_dim
            raise ValueError(f"z must be a tensor of rank 4 [B, {e}, h, w], got {shape}")
        if z.shape[1] != self.config.codebook_embed_dim:
            e = self.config.codebook_embed_dim
            raise ValueError(f"z must have {e} channels (dim 1), got shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise ValueError(f"z must be floating point, got dtype {z.dtype}")
        return self.quantize(z)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images float [B, 3, H, W] in [-1, 1] -> codes int64 [B, H/16, W/16] (no autograd)."""
        return self.quantize_latents(self.encode_latents(images))[1]

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latents [B, codebook_embed_dim, h, w] -> images [B, 3, h*f, w*f]."""
        return self.decoder(self.post_quant_conv(z_q.to(self._param_dtype())))

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> normalised codebook rows [B, codebook_embed_dim, h, w]."""
        self._check_codes(codes)
        b, h, w = codes.shape
        return self.quantize.get_codebook_entry(codes.long(), (b, self.config.codebook_embed_dim, h, w), True)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int [B, h, w] -> images float [B, 3, 16h, 16w], roughly in [-1, 1] (not clamped)."""
        return self.decode_latents(self.codes_to_latents(codes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction: encode, quantize, decode. images [B, 3, H, W] -> [B, 3, H, W]."""
        z_q, _ = self.quantize_latents(self.encode_latents(images))
        return self.decode_latents(z_q)


# ----------------------------------------------------------------------------------------------
# Checkpoint loading


def _extract_state_dict(obj, path: str) -> Dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise VQCheckpointError(f"{path}: expected a dict, got {type(obj).__name__}")
    sd = None
    for key in ("model", "state_dict", "ema"):
        if isinstance(obj.get(key), Mapping):
            sd = obj[key]
            break
    if sd is None:
        sd = obj  # a bare state dict
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise VQCheckpointError(
            f"{path}: no tensors found (looked under 'model', 'state_dict', 'ema' and the top level; "
            f"top-level keys: {sorted(map(str, obj.keys()))[:20]})"
        )
    if all(k.startswith("module.") for k in tensors):  # saved from a DDP wrapper
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def _fmt_names(names: Sequence[str], limit: int = 20) -> str:
    names = sorted(names)
    s = ", ".join(names[:limit])
    return s + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_vq(
    path: Union[str, os.PathLike],
    config: Optional[VQConfig] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    strict: bool = True,
    revision: Optional[str] = None,
) -> VQModel:
    """Load a tokenizer from a ``.pt`` file (e.g. LlamaGen's ``vq_ds16_c2i.pt``), in eval mode.

    ``path`` may also be a name of ``arpg.hub.TOKENIZERS`` (``"VQ-16"``; an existing file of that name
    wins), fetched through the Hugging Face cache at ``revision``; ``config`` then defaults to that name's.

    The file is read with ``torch.load(path, map_location="cpu", weights_only=True)``; the weights
    sit under ``model`` (LlamaGen), else ``state_dict`` or ``ema``, else the top level is the state
    dict; a ``module.`` prefix on every name is stripped. ``quantize.codebook_used`` (a training
    statistic) may be absent and is then zero. With ``strict`` any other missing or unexpected name
    is an error; shape mismatches are always errors. The error lists every offending name.
    Floating weights are converted to ``dtype`` (default float32).
    """
    path = os.fspath(path)
    from . import hub

    path, entry = hub.resolve_name(path, hub.TOKENIZERS, "tokenizer", revision)
    if entry is not None and config is None:
        config = VQ_CONFIGS[entry.config]
    config = VQConfig() if config is None else config
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise VQCheckpointError(
            f"{path}: cannot be read with weights_only=True (it holds non-tensor Python objects; "
            f"re-save just the state dict): {e}"
        ) from e
    except Exception as e:  # a damaged file raises almost anything
        first = (str(e).strip().splitlines() or [""])[0]
        raise VQCheckpointError(f"{path}: cannot be read ({type(e).__name__}: {first}); truncated or damaged?") from e
    sd = _extract_state_dict(obj, path)

    with torch.device("meta"):
        skeleton = VQModel(config)
    expected = {k: v for k, v in skeleton.state_dict().items()}

    missing = [k for k in expected if k not in sd and k != _USAGE_KEY]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): " + "; ".join(sorted(mismatched)[:20]))
    if strict and missing:
        problems.append(f"{len(missing)} missing name(s): {_fmt_names(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected name(s): {_fmt_names(unexpected)}")
    if problems:
        head = f"{path}: state dict does not fit VQModel({config}):\n  "
        raise VQCheckpointError(head + "\n  ".join(problems))

    target = torch.float32 if dtype is None else dtype
    if strict:
        # Every tensor is present: build on the meta device and adopt the checkpoint's tensors.
        model = skeleton
        loaded = {}
        for k, ref in expected.items():
            t = sd[k] if k in sd else torch.zeros(ref.shape, dtype=torch.float32)
            loaded[k] = t.to(target) if t.is_floating_point() else t
        model.load_state_dict(loaded, strict=True, assign=True)
    else:
        model = VQModel(config)
        model.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False)
        model.to(target)
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------
# uint8 image conversion


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """images float [B, 3, H, W] (or [3, H, W]) in [-1, 1] -> uint8 [B, H, W, 3] (or [H, W, 3]).

    Computes ``clamp(127.5 * x + 128, 0, 255)`` in float32 and converts to uint8 (truncation), as
    LlamaGen's sampling scripts do; so -1 -> 0.5 -> 0, 0 -> 128, 1 -> 255.5 -> 255, i.e. round-half-up
    of 127.5 * (x + 1). NaN maps to 0. Stays on the input's device.
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
    if images.dim() not in (3, 4):
        raise ValueError(
            f"images must have rank 3 or 4 ([3, H, W] or [B, 3, H, W]), got shape {tuple(images.shape)}"
        )
    if images.shape[-3] != 3:
        raise ValueError(f"images must have 3 channels (dim -3), got shape {tuple(images.shape)}")
    x = torch.clamp(127.5 * images.detach().float() + 128.0, 0.0, 255.0)
    x = torch.nan_to_num(x, nan=0.0)
    return x.movedim(-3, -1).to(torch.uint8)


def from_uint8(
    array: Union[np.ndarray, torch.Tensor], device: Union[str, torch.device, None] = None
) -> torch.Tensor:
    """uint8 [B, H, W, 3] or [H, W, 3] (numpy or torch) -> float32 [B, 3, H, W] in [-1, 1]: u / 127.5 - 1.

    A single image gains a batch dimension of 1. ``to_uint8(from_uint8(u)) == u`` exactly.
    """
    if isinstance(array, np.ndarray):
        if array.dtype != np.uint8:
            raise ValueError(f"array must have dtype uint8, got {array.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(array))
    elif isinstance(array, torch.Tensor):
        if array.dtype != torch.uint8:
            raise ValueError(f"array must have dtype uint8, got {array.dtype}")
        t = array
    else:
        raise ValueError(f"array must be a numpy array or torch tensor of uint8, got {type(array).__name__}")
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4:
        raise ValueError(f"array must have rank 3 or 4 ([H, W, 3] or [B, H, W, 3]), got shape {tuple(t.shape)}")
    if t.shape[-1] != 3:
        raise ValueError(f"array must have 3 channels (last dim), got shape {tuple(t.shape)}")
    if device is not None:
        t = t.to(device)
    return (t.permute(0, 3, 1, 2).float() / 127.5 - 1.0).contiguous()


def to_pil(images: torch.Tensor) -> List["object"]:
    """images float [B, 3, H, W] in [-1, 1] -> list of PIL RGB images (needs Pillow)."""
    from PIL import Image  # optional dependency, only for this helper

    u8 = to_uint8(images)
    if u8.dim() == 3:
        u8 = u8.unsqueeze(0)
    return [Image.fromarray(a) for a in u8.cpu().numpy()]
