"""Model configurations: one dataclass, a dict of named sizes (gpt-fast style)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of k that is >= n."""
    return n if n % k == 0 else n + k - (n % k)


# Fields that only change training (dropout rates); two configs that differ only in them hold the same
# weights and decode alike.
TRAINING_ONLY_FIELDS = ("token_dropout", "resid_dropout", "ffn_dropout", "drop_path")


@dataclass
class ARPGConfig:
    """Sizes of an ARPG (or raster baseline) transformer.

    Token id layout (V = vocab_size, C = num_classes): `[0, V)` image tokens, `V` the [MASK] token,
    `V + 1 + c` class c, `V + C + 1` the "no class" id (CFG and class dropout), `V + C + 2` unused.
    """

    dim: int = 1024
    n_layer: int = 24
    n_head: int = 16
    vocab_size: int = 16384
    num_classes: int = 1000
    grid_size: int = 16
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    class_dropout: float = 0.1
    ffn_multiple_of: int = 256
    # Training-time regularisation (the original's `token_dropout_p`, `resid_dropout_p`, `ffn_dropout_p`,
    # `drop_path_rate`); active in train mode only, never in decoding. Off by default: the original's
    # training defaults are 0.1 / 0.1 / 0.1 / 0.0 (`arpg train` sets them).
    token_dropout: float = 0.0
    resid_dropout: float = 0.0
    ffn_dropout: float = 0.0
    drop_path: float = 0.0

    def __post_init__(self):
        if self.dim % self.n_head:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_head ({self.n_head})")
        if self.head_dim % 4:
            raise ValueError(f"head_dim ({self.head_dim}) must be divisible by 4 for the 2D RoPE")
        if self.grid_size < 1 or self.vocab_size < 1 or self.num_classes < 1:
            raise ValueError("grid_size, vocab_size and num_classes must be positive")
        for name in ("class_dropout", *TRAINING_ONLY_FIELDS):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden size: find_multiple(int(2 * 4 * dim / 3), ffn_multiple_of)."""
        return find_multiple(int(2 * 4 * self.dim / 3), self.ffn_multiple_of)

    @property
    def seq_len(self) -> int:
        """Image tokens per image (grid_size ** 2)."""
        return self.grid_size**2

    @property
    def n_self_layers(self) -> int:
        return self.n_layer // 2

    @property
    def n_cross_layers(self) -> int:
        return self.n_layer // 2

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size

    @property
    def null_class_id(self) -> int:
        return self.vocab_size + self.num_classes + 1

    @property
    def num_embeddings(self) -> int:
        return self.vocab_size + self.num_classes + 3

    def class_token_id(self, label: int) -> int:
        return self.vocab_size + 1 + label

    def architecture(self) -> dict[str, Any]:
        """The fields that fix the weights and the decoding (all but class dropout and the dropouts)."""
        return {k: v for k, v in self.to_dict().items() if k != "class_dropout" and k not in TRAINING_ONLY_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ARPGConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ARPGConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_name(cls, name: str) -> "ARPGConfig":
        table = CONFIGS if name in CONFIGS else RASTER_CONFIGS
        if name not in table:
            raise KeyError(f"unknown config {name!r}; known: {sorted(CONFIGS) + sorted(RASTER_CONFIGS)}")
        return dataclasses.replace(table[name])


CONFIGS: dict[str, ARPGConfig] = {
    "ARPG-L": ARPGConfig(dim=1024, n_layer=24, n_head=16),
    "ARPG-XL": ARPGConfig(dim=1280, n_layer=36, n_head=20),
    "ARPG-XXL": ARPGConfig(dim=1536, n_layer=48, n_head=24),
    # Test sizes: head_dim 32 keeps the Triton fast paths legal.
    "ARPG-tiny": ARPGConfig(
        dim=64, n_layer=4, n_head=2, vocab_size=64, num_classes=10, grid_size=4, ffn_multiple_of=32
    ),
    "ARPG-tiny-g8": ARPGConfig(
        dim=64, n_layer=4, n_head=2, vocab_size=64, num_classes=10, grid_size=8, ffn_multiple_of=32
    ),
    "ARPG-tiny-g16": ARPGConfig(
        dim=32, n_layer=2, n_head=1, vocab_size=32, num_classes=4, grid_size=16, ffn_multiple_of=32
    ),
}

# LlamaGen-style raster-order baselines: same d / h / head_dim, all n_layer layers are self layers.
RASTER_CONFIGS: dict[str, ARPGConfig] = {
    "Raster-L": dataclasses.replace(CONFIGS["ARPG-L"]),
    "Raster-XL": dataclasses.replace(CONFIGS["ARPG-XL"]),
    "Raster-XXL": dataclasses.replace(CONFIGS["ARPG-XXL"]),
    "Raster-tiny": dataclasses.replace(CONFIGS["ARPG-tiny"]),
    "Raster-tiny-g16": dataclasses.replace(CONFIGS["ARPG-tiny-g16"]),
}


def get_config(config_or_name: "ARPGConfig | str") -> ARPGConfig:
    if isinstance(config_or_name, ARPGConfig):
        return config_or_name
    return ARPGConfig.from_name(config_or_name)
