"""The LlamaGen VQ-16 tokenizer (arpg/vq.py): names/shapes of the published state dict, the forward
against an independent float64 functional re-computation, the quantizer, loading and uint8 I/O."""

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arpg.vq import (
    VQ_CONFIGS,
    VQCheckpointError,
    VQConfig,
    VQModel,
    from_uint8,
    load_vq,
    to_uint8,
)

TINY = VQConfig.tiny()


def make_tiny(seed=0, cfg=TINY):
    torch.manual_seed(seed)
    model = VQModel(cfg).eval()
    with torch.no_grad():  # non-trivial norm affines, so a mix-up of norms shows
        for n, p in model.named_parameters():
            if ".norm" in n and n.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif ".norm" in n and n.endswith("bias"):
                p.uniform_(-0.2, 0.2)
    return model


def images(b=2, h=32, w=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


# ---------------------------------------------------------------------------------------------
# Expected state dict of LlamaGen's tokenizer/tokenizer_image/vq_model.py, written out from its rules.


def expected_shapes(cfg: VQConfig):
    out = {}

    def conv(name, cin, cout, k):
        out[name + ".weight"] = (cout, cin, k, k)
        out[name + ".bias"] = (cout,)

    def norm(name, c):
        out[name + ".weight"] = (c,)
        out[name + ".bias"] = (c,)

    def res(name, cin, cout):
        norm(name + ".norm1", cin)
        conv(name + ".conv1", cin, cout, 3)
        norm(name + ".norm2", cout)
        conv(name + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(name + ".nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(name + ".norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    ch, mult, L, nrb = cfg.ch, cfg.ch_mult, len(cfg.ch_mult), cfg.num_res_blocks
    top = ch * mult[-1]
    conv("encoder.conv_in", 3, ch, 3)
    cin = ch
    for i in range(L):
        for j in range(nrb):
            res(f"encoder.conv_blocks.{i}.res.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
            if i == L - 1:
                attn(f"encoder.conv_blocks.{i}.attn.{j}", cin)
        if i != L - 1:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", cin, cin, 3)
    res("encoder.mid.0", top, top)
    attn("encoder.mid.1", top)
    res("encoder.mid.2", top, top)
    norm("encoder.norm_out", top)
    conv("encoder.conv_out", top, cfg.z_channels, 3)

    conv("decoder.conv_in", cfg.z_channels, top, 3)
    res("decoder.mid.0", top, top)
    attn("decoder.mid.1", top)
    res("decoder.mid.2", top, top)
    cin = top
    for i, level in enumerate(reversed(range(L))):
        for j in range(nrb + 1):
            res(f"decoder.conv_blocks.{i}.res.{j}", cin, ch * mult[level])
            cin = ch * mult[level]
            if i == 0:
                attn(f"decoder.conv_blocks.{i}.attn.{j}", cin)
        if level != 0:
            conv(f"decoder.conv_blocks.{i}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", cin)
    conv("decoder.conv_out", cin, 3, 3)

    out["quantize.embedding.weight"] = (cfg.codebook_size, cfg.codebook_embed_dim)
    out["quantize.codebook_used"] = (65536,)
    conv("quant_conv", cfg.z_channels, cfg.codebook_embed_dim, 1)
    conv("post_quant_conv", cfg.codebook_embed_dim, cfg.z_channels, 1)
    return out


@pytest.mark.parametrize("cfg", [VQConfig(), TINY], ids=["VQ-16", "tiny"])
def test_state_dict_names_and_shapes(cfg):
    with torch.device("meta"):
        model = VQModel(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(cfg)


def test_full_config_on_meta():
    cfg = VQConfig()
    assert VQ_CONFIGS["VQ-16"] == cfg
    assert (cfg.codebook_size, cfg.codebook_embed_dim, cfg.z_channels, cfg.ch) == (16384, 8, 256, 128)
    assert cfg.ch_mult == (1, 1, 2, 2, 4) and cfg.num_res_blocks == 2 and cfg.downsample_factor == 16
    with torch.device("meta"):
        model = VQModel(cfg)
    sd = model.state_dict()
    known = {
        "quantize.embedding.weight": (16384, 8),
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
        "quant_conv.weight": (8, 256, 1, 1),
        "post_quant_conv.weight": (256, 8, 1, 1),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.conv_blocks.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.conv_blocks.3.downsample.conv.weight": (256, 256, 3, 3),
        "decoder.conv_blocks.0.attn.2.q.weight": (512, 512, 1, 1),
        "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.conv_blocks.3.upsample.conv.weight": (128, 128, 3, 3),
        "decoder.conv_blocks.4.res.2.conv2.weight": (128, 128, 3, 3),
        "encoder.mid.1.norm.weight": (512,),
    }
    for k, shape in known.items():
        assert tuple(sd[k].shape) == shape, k
    for absent in ("encoder.conv_blocks.4.downsample.conv.weight", "decoder.conv_blocks.4.upsample.conv.weight",
                   "encoder.conv_blocks.3.attn.0.q.weight", "decoder.conv_blocks.1.attn.0.q.weight",
                   "encoder.conv_blocks.0.res.0.nin_shortcut.weight"):
        assert absent not in sd
    # LlamaGen's VQ-16 is reported as a 72M-parameter tokenizer.
    assert sum(p.numel() for p in model.parameters()) == 71_883_403
    assert len(sd) == 344


# ---------------------------------------------------------------------------------------------
# Independent float64 functional re-computation from the state dict alone.


def _gn(x, sd, name):
    return F.group_norm(x, 32, sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)


def _conv(x, sd, name, stride=1, padding=None):
    w = sd[name + ".weight"]
    padding = w.shape[-1] // 2 if padding is None else padding
    return F.conv2d(x, w, sd[name + ".bias"], stride=stride, padding=padding)


def _swish(x):
    return x * torch.sigmoid(x)


def _res(x, sd, name):
    h = _conv(_swish(_gn(x, sd, name + ".norm1")), sd, name + ".conv1")
    h = _conv(_swish(_gn(h, sd, name + ".norm2")), sd, name + ".conv2")
    if name + ".nin_shortcut.weight" in sd:
        x = _conv(x, sd, name + ".nin_shortcut")
    return x + h


def _attn(x, sd, name):
    b, c, hh, ww = x.shape
    hn = _gn(x, sd, name + ".norm")
    q = _conv(hn, sd, name + ".q").reshape(b, c, -1)
    k = _conv(hn, sd, name + ".k").reshape(b, c, -1)
    v = _conv(hn, sd, name + ".v").reshape(b, c, -1)
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / c**0.5, dim=2)  # [b, query, key]
    o = torch.einsum("bcj,bij->bci", v, w).reshape(b, c, hh, ww)
    return x + _conv(o, sd, name + ".proj_out")


def ref_encode_latents(sd, cfg, x):
    L, nrb = len(cfg.ch_mult), cfg.num_res_blocks
    h = _conv(x, sd, "encoder.conv_in")
    for i in range(L):
        for j in range(nrb):
            h = _res(h, sd, f"encoder.conv_blocks.{i}.res.{j}")
            if i == L - 1:
                h = _attn(h, sd, f"encoder.conv_blocks.{i}.attn.{j}")
        if i != L - 1:
            name = f"encoder.conv_blocks.{i}.downsample.conv"
            h = _conv(F.pad(h, (0, 1, 0, 1)), sd, name, stride=2, padding=0)
    h = _res(h, sd, "encoder.mid.0")
    h = _attn(h, sd, "encoder.mid.1")
    h = _res(h, sd, "encoder.mid.2")
    h = _conv(_swish(_gn(h, sd, "encoder.norm_out")), sd, "encoder.conv_out")
    return _conv(h, sd, "quant_conv")


def ref_decode_latents(sd, cfg, z):
    L, nrb = len(cfg.ch_mult), cfg.num_res_blocks
    h = _conv(_conv(z, sd, "post_quant_conv"), sd, "decoder.conv_in")
    h = _res(h, sd, "decoder.mid.0")
    h = _attn(h, sd, "decoder.mid.1")
    h = _res(h, sd, "decoder.mid.2")
    for i in range(L):
        for j in range(nrb + 1):
            h = _res(h, sd, f"decoder.conv_blocks.{i}.res.{j}")
            if i == 0:
                h = _attn(h, sd, f"decoder.conv_blocks.{i}.attn.{j}")
        if i != L - 1:
            name = f"decoder.conv_blocks.{i}.upsample.conv"
            h = _conv(F.interpolate(h, scale_factor=2, mode="nearest"), sd, name)
    return _conv(_swish(_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out")


def ref_codes(sd, z):
    e = F.normalize(sd["quantize.embedding.weight"], dim=-1)
    zl = F.normalize(z.permute(0, 2, 3, 1), dim=-1)
    return (zl @ e.t()).argmax(dim=-1)  # nearest unit vector = largest cosine


def test_forward_matches_float64_reference():
    model = make_tiny()
    sd = {k: v.double() for k, v in model.state_dict().items()}
    x = images(2, 32, 48)
    with torch.no_grad():
        z = model.encode_latents(x)
        z_ref = ref_encode_latents(sd, TINY, x.double())
        torch.testing.assert_close(z.double(), z_ref, rtol=1e-4, atol=1e-4)
        codes = model.encode(x)
        # compare codes where the reference's best match is unambiguous
        e = F.normalize(sd["quantize.embedding.weight"], dim=-1)
        cos = F.normalize(z_ref.permute(0, 2, 3, 1), dim=-1) @ e.t()
        top2 = cos.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 1e-4
        assert clear.float().mean() > 0.8
        assert torch.equal(codes[clear], ref_codes(sd, z_ref)[clear])
        out = model.decode_codes(codes)
        out_ref = ref_decode_latents(sd, TINY, e[codes].permute(0, 3, 1, 2))
        torch.testing.assert_close(out.double(), out_ref, rtol=1e-4, atol=1e-4)


def test_encode_decode_shapes_tiny():
    model = make_tiny()
    x = images(2, 32, 48)
    codes = model.encode(x)
    assert codes.shape == (2, 2, 3) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < TINY.codebook_size
    assert not codes.requires_grad
    with torch.no_grad():
        out = model.decode_codes(codes)
        rec = model(x)
    assert out.shape == (2, 3, 32, 48) and out.dtype == torch.float32
    torch.testing.assert_close(rec, out)  # forward = decode(quantize(encode))
    # decode accepts any integer dtype and batch-size 1
    with torch.no_grad():
        torch.testing.assert_close(model.decode_codes(codes[:1].to(torch.int32)), out[:1], rtol=1e-4, atol=1e-4)


def test_encode_is_batch_independent():
    model = make_tiny()
    x = images(3, 16, 32)
    codes = model.encode(x)
    for i in range(3):
        assert torch.equal(model.encode(x[i : i + 1])[0], codes[i])


def test_quantizer_idempotent_and_scale_invariant():
    model = make_tiny()
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, TINY.codebook_size, (2, 3, 5), generator=g)
    z = model.codes_to_latents(codes)
    assert z.shape == (2, TINY.codebook_embed_dim, 3, 5)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2, 3, 5))  # l2-normalised rows
    with torch.no_grad():
        z_q, again = model.quantize_latents(z)
        assert torch.equal(again, codes)
        torch.testing.assert_close(z_q, z)
        assert torch.equal(model.quantize_latents(7.5 * z)[1], codes)  # latents are normalised first


def test_quantizer_picks_nearest_normalised_row():
    model = make_tiny()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # a trained codebook's rows are not unit-norm (they are at init)
        w = model.quantize.embedding.weight
        w.mul_(torch.logspace(-1, 1, w.shape[0])[torch.randperm(w.shape[0], generator=g)][:, None])
    z = torch.randn(2, TINY.codebook_embed_dim, 4, 4, generator=g)
    with torch.no_grad():
        z_q, codes = model.quantize_latents(z)
    e = F.normalize(model.quantize.embedding.weight.detach(), dim=-1)
    zn = F.normalize(z.permute(0, 2, 3, 1), dim=-1).reshape(-1, e.shape[1])
    d = torch.cdist(zn, e)
    assert torch.equal(codes.reshape(-1), d.argmin(dim=1))
    # the raw rows would pick other codes: the normalisation is what this checks
    assert not torch.equal(d.argmin(dim=1), torch.cdist(zn, model.quantize.embedding.weight.detach()).argmin(dim=1))
    torch.testing.assert_close(z_q, e[codes].permute(0, 3, 1, 2))
    # chunked distance blocks give the same answer
    model.quantize.chunk_rows = 5
    with torch.no_grad():
        assert torch.equal(model.quantize_latents(z)[1], codes)


def test_quantizer_straight_through_gradient():
    model = make_tiny()
    z = torch.randn(1, TINY.codebook_embed_dim, 2, 2, requires_grad=True)
    z_q, codes = model.quantize_latents(z)
    assert z_q.requires_grad
    z_q.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    torch.testing.assert_close(z_q.detach(), model.codes_to_latents(codes))


def test_get_codebook_entry_layouts():
    q = make_tiny().quantize
    codes = torch.arange(2 * 3 * 4).reshape(2, 3, 4) % TINY.codebook_size
    e = F.normalize(q.embedding.weight.detach(), dim=-1)
    with torch.no_grad():
        cf = q.get_codebook_entry(codes.reshape(-1), (2, TINY.codebook_embed_dim, 3, 4), channel_first=True)
        cl = q.get_codebook_entry(codes.reshape(-1), (2, 3, 4, TINY.codebook_embed_dim), channel_first=False)
        flat = q.get_codebook_entry(codes)
    torch.testing.assert_close(cf, e[codes].permute(0, 3, 1, 2))
    torch.testing.assert_close(cl, e[codes])
    torch.testing.assert_close(flat, e[codes])


# ---------------------------------------------------------------------------------------------
# Loading


def _save(tmp_path, obj, name="vq.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("layout", ["model", "state_dict", "ema", "bare", "module_prefix"])
def test_load_roundtrip(tmp_path, layout):
    model = make_tiny(seed=5)
    sd = model.state_dict()
    if layout == "bare":
        obj = sd
    elif layout == "module_prefix":
        obj = {"model": {"module." + k: v for k, v in sd.items()}}
    else:
        obj = {layout: sd, "steps": 10}
    if layout == "model":
        obj["ema"] = {k: torch.zeros_like(v) for k, v in sd.items()}  # `model` wins over `ema`
    loaded = load_vq(_save(tmp_path, obj), TINY)
    assert not loaded.training
    assert loaded.encoder.conv_in.weight.device.type == "cpu"
    for k, v in loaded.state_dict().items():
        assert v.device.type == "cpu" and v.dtype == torch.float32, k
        assert torch.equal(v, sd[k]), k
    x = images(2, 16, 32, seed=6)
    with torch.no_grad():
        codes = model.encode(x)
        assert torch.equal(loaded.encode(x), codes)
        torch.testing.assert_close(loaded.decode_codes(codes), model.decode_codes(codes), rtol=0, atol=0)


def test_load_without_usage_buffer_and_dtype(tmp_path):
    model = make_tiny(seed=7)
    sd = {k: v for k, v in model.state_dict().items() if k != "quantize.codebook_used"}
    path = _save(tmp_path, {"model": sd})
    loaded = load_vq(path, TINY)
    assert torch.count_nonzero(loaded.quantize.codebook_used) == 0
    loaded64 = load_vq(path, TINY, dtype=torch.float64)
    assert loaded64.decoder.conv_out.weight.dtype == torch.float64
    x = images(1, 16, 16, seed=8)
    with torch.no_grad():
        codes = model.encode(x)
        out = model.decode_codes(codes)
        out64 = loaded64.decode_codes(codes)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out, rtol=1e-4, atol=1e-4)
    # a fresh model's state dict loads (the usage buffer round-trips too)
    fresh = VQModel(TINY).state_dict()
    load_vq(_save(tmp_path, {"model": fresh}, "fresh.pt"), TINY)


def test_load_refuses_mismatches(tmp_path):
    sd = make_tiny().state_dict()

    missing = dict(sd)
    del missing["decoder.conv_blocks.1.res.0.conv2.bias"]
    with pytest.raises(VQCheckpointError, match=r"missing.*decoder\.conv_blocks\.1\.res\.0\.conv2\.bias"):
        load_vq(_save(tmp_path, {"model": missing}, "a.pt"), TINY)

    extra = dict(sd)
    extra["quantize.entropy_temperature"] = torch.zeros(1)
    with pytest.raises(VQCheckpointError, match=r"unexpected.*quantize\.entropy_temperature"):
        load_vq(_save(tmp_path, {"model": extra}, "b.pt"), TINY)

    wrong = dict(sd)
    wrong["quant_conv.weight"] = torch.zeros(5, TINY.z_channels, 1, 1)
    with pytest.raises(VQCheckpointError, match=r"shape.*quant_conv\.weight.*\(5, 32, 1, 1\).*\(4, 32, 1, 1\)"):
        load_vq(_save(tmp_path, {"model": wrong}, "c.pt"), TINY)

    # the tiny weights do not fit the full config; every problem is reported in one message
    with pytest.raises(VQCheckpointError) as info:
        load_vq(_save(tmp_path, {"model": sd}, "d.pt"))
    msg = str(info.value)
    assert "shape mismatch" in msg and "missing" in msg and "unexpected" in msg
    assert "decoder.conv_blocks.0.attn.0.k.bias: checkpoint (64,) vs model (512,)" in msg


def test_load_non_strict(tmp_path):
    model = make_tiny(seed=9)
    sd = dict(model.state_dict())
    del sd["decoder.conv_out.bias"]
    sd["extra.thing"] = torch.ones(2)
    loaded = load_vq(_save(tmp_path, {"model": sd}), TINY, strict=False)
    assert torch.equal(loaded.encoder.conv_in.weight, model.encoder.conv_in.weight)
    assert loaded.decoder.conv_out.bias.device.type == "cpu"
    wrong = dict(model.state_dict())
    wrong["quant_conv.bias"] = torch.zeros(3)
    with pytest.raises(VQCheckpointError, match=r"quant_conv\.bias"):  # shapes are checked even so
        load_vq(_save(tmp_path, {"model": wrong}, "w.pt"), TINY, strict=False)


def test_load_rejects_pickled_objects_and_junk(tmp_path):
    sd = make_tiny().state_dict()
    path = _save(tmp_path, {"model": sd, "args": argparse.Namespace(vq_model="VQ-16")})
    with pytest.raises(VQCheckpointError, match="weights_only"):
        load_vq(path, TINY)
    with pytest.raises(VQCheckpointError, match="no tensors"):
        load_vq(_save(tmp_path, {"model": {"a": 1}}, "junk.pt"), TINY)
    with pytest.raises(VQCheckpointError, match="expected a dict"):
        load_vq(_save(tmp_path, [torch.zeros(1)], "list.pt"), TINY)


# ---------------------------------------------------------------------------------------------
# uint8 conversion


def test_to_uint8_formula():
    x = torch.tensor([-1.0, -1.5, 0.0, 1.0, 2.0, 0.5, float("nan")]).reshape(1, 1, 1, 7).expand(1, 3, 1, 7)
    u = to_uint8(x)
    assert u.shape == (1, 1, 7, 3) and u.dtype == torch.uint8
    # clamp(127.5 x + 128, 0, 255) truncated: -1 -> 0.5 -> 0, 0 -> 128, 1 -> 255.5 -> 255, 0.5 -> 191.75 -> 191
    assert u[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 191, 0]
    assert to_uint8(x[0]).shape == (1, 7, 3)


def test_uint8_roundtrip():
    g = torch.Generator().manual_seed(10)
    u = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8, generator=g)
    u[0, 0, 0] = torch.tensor([0, 255, 128], dtype=torch.uint8)
    x = from_uint8(u.numpy())
    assert x.shape == (2, 3, 5, 7) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert x[0, 0, 0, 0] == -1.0 and x[0, 1, 0, 0] == 1.0
    assert torch.equal(to_uint8(x), u)  # exact on uint8 values
    assert torch.equal(from_uint8(u), x)  # torch input too
    single = from_uint8(u[1].numpy())
    assert single.shape == (1, 3, 5, 7) and torch.equal(single[0], x[1])
    # float -> uint8 -> float stays within one level (1 / 127.5)
    xf = torch.rand(2, 3, 5, 7, generator=g) * 2 - 1
    assert (from_uint8(to_uint8(xf)) - xf).abs().max() <= 1 / 127.5 + 1e-6


def test_to_pil():
    pytest.importorskip("PIL")
    from arpg.vq import to_pil

    ims = to_pil(images(2, 16, 8))
    assert len(ims) == 2 and ims[0].size == (8, 16) and ims[0].mode == "RGB"


# ---------------------------------------------------------------------------------------------
# Bad inputs


@pytest.fixture(scope="module")
def tiny_model():
    return make_tiny()


@pytest.mark.parametrize(
    "bad, pattern",
    [
        (torch.zeros(3, 32, 32), "images.*rank 4"),
        (torch.zeros(1, 4, 32, 32), "images.*3 channels"),
        (torch.zeros(1, 1, 32, 32), "images.*3 channels"),
        (torch.zeros(1, 3, 24, 32), "images.*multiples of 16"),
        (torch.zeros(1, 3, 32, 40), "images.*multiples of 16"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "images.*floating"),
        (np.zeros((1, 3, 32, 32), np.float32), "images.*torch.Tensor"),
    ],
)
def test_encode_rejects(tiny_model, bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        tiny_model.encode(bad)
    with pytest.raises(ValueError, match=pattern):
        tiny_model(bad)


@pytest.mark.parametrize(
    "bad, pattern",
    [
        (torch.zeros(2, 4, dtype=torch.long), "codes.*rank 3"),
        (torch.zeros(1, 2, 2, 1, dtype=torch.long), "codes.*rank 3"),
        (torch.zeros(1, 2, 2), "codes.*integer"),
        (torch.full((1, 2, 2), 64), r"codes.*\[0, 64\)"),
        (torch.full((1, 2, 2), -1), r"codes.*\[0, 64\)"),
        (torch.zeros(0, 2, 2, dtype=torch.long), "codes.*non-empty"),
        ([[[0]]], "codes.*torch.Tensor"),
    ],
)
def test_decode_rejects(tiny_model, bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        tiny_model.decode_codes(bad)


def test_other_rejections(tiny_model):
    with pytest.raises(ValueError, match="z.*rank 4"):
        tiny_model.quantize_latents(torch.zeros(4, 2, 2))
    with pytest.raises(ValueError, match="z.*4 channels"):
        tiny_model.quantize_latents(torch.zeros(1, 8, 2, 2))
    with pytest.raises(ValueError, match="images.*rank 3 or 4"):
        to_uint8(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="images.*3 channels"):
        to_uint8(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="array.*uint8"):
        from_uint8(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="array.*3 channels"):
        from_uint8(np.zeros((2, 2, 4), np.uint8))
    with pytest.raises(ValueError, match="array.*rank 3 or 4"):
        from_uint8(np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="ch_mult"):
        VQConfig(ch=48)
    with pytest.raises(ValueError, match="codebook_size"):
        VQConfig(codebook_size=0)
