"""Checkpoint loading and saving: every container key, safetensors, prefixes, refusals."""

import pytest
import torch

from arpg import ARPG, CONFIGS, CheckpointError, RasterLM, load_checkpoint, save_checkpoint


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


@pytest.mark.parametrize("key", ["state_dict", "model", "module", "ema"])
def test_pt_each_key(tmp_path, make_model, key):
    model = make_model()
    path = tmp_path / "ckpt.pt"
    torch.save({key: model.state_dict(), "step": 7}, path)
    loaded = load_checkpoint(str(path), "ARPG-tiny")
    assert isinstance(loaded, ARPG) and not loaded.training
    assert same_weights(loaded, model)
    assert same_weights(load_checkpoint(str(path), CONFIGS["ARPG-tiny"], key=key), model)


def test_auto_prefers_raw_weights_over_ema(tmp_path, make_model):
    model, ema = make_model(seed=0), make_model(seed=1)
    path = tmp_path / "train.pt"
    torch.save({"ema": ema.state_dict(), "model": model.state_dict(), "optimizer": {}}, path)
    assert same_weights(load_checkpoint(str(path), "ARPG-tiny"), model)
    assert same_weights(load_checkpoint(str(path), "ARPG-tiny", key="ema"), ema)
    with pytest.raises(CheckpointError, match="no state dict under 'state_dict'"):
        load_checkpoint(str(path), "ARPG-tiny", key="state_dict")


def test_module_prefix_and_top_level(tmp_path, make_model):
    model = make_model()
    path = tmp_path / "ddp.pt"
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    assert same_weights(load_checkpoint(str(path), "ARPG-tiny"), model)
    torch.save(model.state_dict(), path)
    assert same_weights(load_checkpoint(str(path), "ARPG-tiny"), model)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_roundtrip_with_stored_config(tmp_path, make_model, suffix):
    model = make_model("ARPG-tiny-g8")
    path = str(tmp_path / ("model" + suffix))
    save_checkpoint(model, path)
    loaded = load_checkpoint(path)  # config from the file
    assert loaded.config == model.config and same_weights(loaded, model)
    half = load_checkpoint(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    raster = make_model("Raster-tiny")
    save_checkpoint(raster, path)
    loaded = load_checkpoint(path)
    assert isinstance(loaded, RasterLM) and same_weights(loaded, raster)


def test_loaded_model_generates_the_same(tmp_path, make_model):
    from arpg import generate

    model = make_model()
    path = str(tmp_path / "m.safetensors")
    save_checkpoint(model, path)
    loaded = load_checkpoint(path, "ARPG-tiny")
    labels = torch.tensor([1, 2])
    assert torch.equal(generate(loaded, labels, 3, seed=0), generate(model, labels, 3, seed=0))


def test_refuses_bad_checkpoints(tmp_path, make_model):
    model = make_model()
    sd = model.state_dict()
    path = str(tmp_path / "bad.pt")

    missing = {k: v for k, v in sd.items() if k != "layers.to_v.weight"}
    torch.save({"state_dict": missing}, path)
    with pytest.raises(CheckpointError, match=r"missing \(1\): layers\.to_v\.weight"):
        load_checkpoint(path, "ARPG-tiny")
    partial = load_checkpoint(path, "ARPG-tiny", strict=False)
    assert torch.equal(partial.layers.to_k.weight, model.layers.to_k.weight)

    extra = dict(sd, **{"layers.extra.weight": torch.zeros(3)})
    torch.save({"state_dict": extra}, path)
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): layers\.extra\.weight"):
        load_checkpoint(path, "ARPG-tiny")

    # ARPG-tiny weights (dim 64) do not fit a dim-32 config: refused with names and shapes, even non-strict.
    torch.save({"state_dict": sd}, path)
    for strict in (True, False):
        match = r"(?s)wrong shape.*embeddings\.weight: checkpoint \(77, 64\) vs model \(39, 32\)"
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(path, "ARPG-tiny-g16", strict=strict)

    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(path, "ARPG-tiny")
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError, match="no config stored"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "nope.pt"), "ARPG-tiny")
