"""The raster baseline on the paged engine."""

import pytest
import torch

from arpg import RasterLM, generate


def test_raster_engine_matches_training_forward(make_model):
    model = make_model("Raster-tiny", std=0.05)
    cfg = model.config
    labels = torch.tensor([2, -1])
    tokens, logits = generate(model, labels, seed=0, cfg_scale=1.0, return_logits=True)
    assert tokens.shape == (2, cfg.seq_len) and len(logits) == cfg.seq_len
    assert all(x.shape == (2, 1, cfg.vocab_size) for x in logits)
    with torch.no_grad():
        train_logits, _ = model(tokens, labels)
    torch.testing.assert_close(torch.cat(logits, dim=1), train_logits, atol=1e-5, rtol=1e-5)


def test_raster_cfg_and_determinism(make_model):
    model = make_model("Raster-tiny")
    labels = torch.tensor([1, 3])
    a, logits = generate(model, labels, seed=5, cfg_scale=3.0, cfg_schedule="linear", return_logits=True)
    b = generate(model, labels, model.config.seq_len, seed=5, cfg_scale=3.0, cfg_schedule="linear")
    assert torch.equal(a, b) and logits[0].shape[0] == 4
    with pytest.raises(ValueError, match="one token per step"):
        generate(model, labels, 4)


def test_raster_full_grid(make_model):
    model = make_model("Raster-tiny-g16")
    assert isinstance(model, RasterLM) and model.config.seq_len == 256
    tokens, logits = generate(model, torch.tensor([0]), 256, seed=0, return_logits=True)
    assert tokens.shape == (1, 256) and len(logits) == 256
    with torch.no_grad():
        train_logits, _ = model(tokens, torch.tensor([0]))
    torch.testing.assert_close(torch.cat(logits, dim=1), train_logits, atol=1e-5, rtol=1e-5)
