"""Configs: parameter counts and the published state-dict names and shapes (meta device, no memory)."""

import pytest
import torch

from arpg import ARPG, CONFIGS, RASTER_CONFIGS, ARPGConfig, RasterLM, find_multiple

PUBLISHED = {
    # name: (n_layer, n_head, dim, parameters)
    "ARPG-L": (24, 16, 1024, 319_845_376),
    "ARPG-XL": (36, 20, 1280, 718_997_760),
    "ARPG-XXL": (48, 24, 1536, 1_302_449_664),
}


def expected_state_dict_shapes(n_layer: int, dim: int, vocab: int = 16384, classes: int = 1000) -> dict:
    hidden = find_multiple(int(2 * 4 * dim / 3), 256)
    shapes = {"embeddings.weight": (vocab + classes + 3, dim)}
    ffn = {"ffn.w1.weight": (hidden, dim), "ffn.w3.weight": (hidden, dim), "ffn.w2.weight": (dim, hidden)}
    norms = {"attn_norm.weight": (dim,), "ffn_norm.weight": (dim,)}
    for i in range(n_layer // 2):
        for proj in ("to_q", "to_k", "to_v", "proj"):
            shapes[f"layers.self_dec.{i}.attn.{proj}.weight"] = (dim, dim)
        for proj in ("to_q", "proj"):
            shapes[f"layers.cross_dec.{i}.attn.{proj}.weight"] = (dim, dim)
        for part in ("self_dec", "cross_dec"):
            for name, shape in {**ffn, **norms}.items():
                shapes[f"layers.{part}.{i}.{name}"] = shape
    shapes.update(
        {
            "layers.norm.weight": (dim,),
            "layers.to_k.weight": (dim, dim),
            "layers.to_v.weight": (dim, dim),
            "norm.weight": (dim,),
            "head.weight": (vocab, dim),
        }
    )
    return shapes


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_sizes(name):
    n_layer, n_head, dim, n_params = PUBLISHED[name]
    cfg = CONFIGS[name]
    assert (cfg.n_layer, cfg.n_head, cfg.dim, cfg.head_dim) == (n_layer, n_head, dim, 64)
    assert (cfg.vocab_size, cfg.num_classes, cfg.grid_size, cfg.seq_len) == (16384, 1000, 16, 256)
    with torch.device("meta"):
        model = ARPG(name)
    assert sum(p.numel() for p in model.parameters()) == n_params
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_state_dict_shapes(n_layer, dim)


def test_ffn_hidden_dim():
    assert CONFIGS["ARPG-L"].ffn_hidden_dim == 2816
    assert CONFIGS["ARPG-XL"].ffn_hidden_dim == 3584
    assert CONFIGS["ARPG-XXL"].ffn_hidden_dim == 4096


def test_token_ids():
    cfg = CONFIGS["ARPG-L"]
    assert cfg.mask_token_id == 16384
    assert cfg.class_token_id(0) == 16385 and cfg.class_token_id(999) == 17384
    assert cfg.null_class_id == 17385
    assert cfg.num_embeddings == 17387


@pytest.mark.parametrize("name", ["Raster-L", "Raster-XL", "Raster-XXL"])
def test_raster_sizes_match_arpg(name):
    cfg = RASTER_CONFIGS[name]
    arpg_cfg = CONFIGS[name.replace("Raster", "ARPG")]
    assert (cfg.dim, cfg.n_head, cfg.head_dim, cfg.n_layer) == (
        arpg_cfg.dim,
        arpg_cfg.n_head,
        arpg_cfg.head_dim,
        arpg_cfg.n_layer,
    )
    with torch.device("meta"):
        model = RasterLM(name)
    assert len(model.layers) == cfg.n_layer


def test_config_roundtrip_and_errors():
    cfg = CONFIGS["ARPG-tiny"]
    assert ARPGConfig.from_dict(cfg.to_dict()) == cfg
    assert ARPGConfig.from_name("ARPG-XL") == CONFIGS["ARPG-XL"]
    with pytest.raises(ValueError, match="divisible by n_head"):
        ARPGConfig(dim=100, n_head=3)
    with pytest.raises(ValueError, match="divisible by 4"):
        ARPGConfig(dim=12, n_head=2)
    with pytest.raises(KeyError, match="unknown config"):
        ARPGConfig.from_name("ARPG-XXXL")
    with pytest.raises(ValueError, match="unknown ARPGConfig fields"):
        ARPGConfig.from_dict({"dim": 64, "n_heads": 2})
    with pytest.raises(ValueError, match="even n_layer"):
        ARPG(ARPGConfig(dim=64, n_layer=3, n_head=2, vocab_size=8, num_classes=2, grid_size=2))
