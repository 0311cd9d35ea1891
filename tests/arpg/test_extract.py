"""arpg extract-codes: the crops, the codes, the layouts, resuming, and bad input."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from arpg import extract as X
from arpg.data_codes import CodeFolder, PackedCodes
from arpg.vq import VQConfig, VQModel, from_uint8

SIZE = 32  # 2 x 2 codes with the tiny tokenizer's 16x downsampling


@pytest.fixture
def tree(tmp_path):
    """Two classes of random PNGs of odd sizes (so the crops and resizes do something)."""
    rng = np.random.default_rng(0)
    for name, shapes in (("cat", [(45, 61), (80, 40)]), ("dog", [(33, 70), (100, 100), (64, 48)])):
        os.makedirs(tmp_path / "img" / name)
        for i, (h, w) in enumerate(shapes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "img" / name / f"{i}.png")
    return str(tmp_path / "img")


@pytest.fixture
def vq(tmp_path):
    torch.manual_seed(0)
    model = VQModel(VQConfig.tiny()).eval()
    path = str(tmp_path / "vq.pt")
    torch.save({"model": model.state_dict()}, path)
    return model, path


def _expected_crops(path, aug):
    """The crops written out independently: LlamaGen's center crop, then flip or torchvision's TenCrop."""
    with Image.open(path) as im:
        pil = im.convert("RGB")

    def center(pil, s):
        while min(pil.size) >= 2 * s:
            pil = pil.resize((pil.size[0] // 2, pil.size[1] // 2), resample=Image.BOX)
        k = s / min(pil.size)
        pil = pil.resize((round(pil.size[0] * k), round(pil.size[1] * k)), resample=Image.BICUBIC)
        w, h = pil.size
        return np.array(pil.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)))

    if aug == "flip":
        c = center(pil, SIZE)
        return [c, np.fliplr(c)]
    big = Image.fromarray(center(pil, int(SIZE * 1.1)))
    out = []
    for img in (big, big.transpose(Image.FLIP_LEFT_RIGHT)):
        w, h = img.size
        t, l = int(round((h - SIZE) / 2)), int(round((w - SIZE) / 2))
        for x, y in ((0, 0), (w - SIZE, 0), (0, h - SIZE), (w - SIZE, h - SIZE), (l, t)):
            out.append(np.array(img.crop((x, y, x + SIZE, y + SIZE))))
    return out


@pytest.mark.parametrize("aug", ["flip", "ten-crop"])
def test_codes_equal_encode_of_the_same_crops(tree, vq, tmp_path, aug):
    model, _ = vq
    out = str(tmp_path / "codes")
    assert X.extract_codes(tree, out, model, SIZE, aug, batch_size=2) == 5
    items, classes = X.list_images(tree)
    assert classes == ["cat", "dog"]
    for path, label in items:
        got = np.load(os.path.join(out, str(label), os.path.splitext(os.path.basename(path))[0] + ".npy"))
        crops = np.stack(_expected_crops(path, aug))
        want = model.encode(from_uint8(np.ascontiguousarray(crops))).reshape(1, len(crops), -1).numpy()
        assert got.shape == (1, X.AUGMENTATIONS[aug], 4) and got.dtype == np.int64
        np.testing.assert_array_equal(got, want)
    folder = CodeFolder(out)
    assert len(folder) == 5 and folder.n_aug == X.AUGMENTATIONS[aug] and folder.seq_len == 4


def test_resume_skips_done_images_and_packed_layout_reads_the_same(tree, vq, tmp_path):
    model, path = vq
    out = str(tmp_path / "codes")
    assert X.extract_codes(tree, out, model, SIZE, "flip") == 5
    os.remove(os.path.join(out, "1", "2.npy"))
    open(os.path.join(out, "1", "2.npy.tmp-99"), "wb").close()  # what a kill during a write leaves
    assert X.extract_codes(tree, out, model, SIZE, "flip") == 1  # only the missing one
    assert len(CodeFolder(out)) == 5  # the leftover is not a sample
    packed = str(tmp_path / "packed")
    assert X.main(["--images", tree, "--out", packed, "--vq", path, "--vq-config", "VQ-tiny", "--image-size",
                   str(SIZE), "--layout", "packed", "--device", "cpu", "--no-progress"]) == 0
    assert not os.path.exists(packed + ".loose")
    a, b = CodeFolder(out), PackedCodes(packed)
    idx, picks = np.arange(5), np.array([0, 1, 1, 0, 3])
    for x, y in zip(a.read(idx, picks), b.read(idx, picks)):
        assert torch.equal(x, y)


def test_bad_input_is_named(tree, vq, tmp_path, capsys):
    model, path = vq
    with pytest.raises(X.ExtractError, match="no such image folder"):
        X.extract_codes(str(tmp_path / "nope"), str(tmp_path / "o"), model, SIZE)
    os.makedirs(tmp_path / "empty" / "a")
    with pytest.raises(X.ExtractError, match="no images"):
        X.extract_codes(str(tmp_path / "empty"), str(tmp_path / "o"), model, SIZE)
    with pytest.raises(X.ExtractError, match="multiple of the tokenizer's 16"):
        X.extract_codes(tree, str(tmp_path / "o"), model, 40)
    Image.new("RGB", (40, 40)).save(os.path.join(tree, "cat", "0.jpg"))
    with pytest.raises(X.ExtractError, match="would both be cat/0.npy"):
        X.extract_codes(tree, str(tmp_path / "o"), model, SIZE)
    os.remove(os.path.join(tree, "cat", "0.jpg"))
    with open(os.path.join(tree, "cat", "broken.png"), "wb") as f:
        f.write(b"not a png")
    with pytest.raises(X.ExtractError, match="broken.png: cannot read the image"):
        X.extract_codes(tree, str(tmp_path / "o"), model, SIZE)
    assert X.main(["--images", tree, "--out", str(tmp_path / "o"), "--vq", str(tmp_path / "missing.pt"),
                   "--vq-config", "VQ-tiny", "--device", "cpu"]) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_two_ranks_share_the_images(tree, vq, tmp_path):
    import subprocess
    import sys

    model, path = vq
    one = str(tmp_path / "one")
    X.extract_codes(tree, one, model, SIZE, "flip")
    two = str(tmp_path / "two")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "arpg",
           "extract-codes", "--images", tree, "--out", two, "--vq", path, "--vq-config", "VQ-tiny",
           "--image-size", str(SIZE), "--device", "cpu", "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = CodeFolder(one), CodeFolder(two)
    assert [os.path.relpath(f, one) for f in a.files] == [os.path.relpath(f, two) for f in b.files]
    for x, y in zip(a.read(np.arange(5), np.zeros(5, int)), b.read(np.arange(5), np.zeros(5, int))):
        assert torch.equal(x, y)
