"""The `arpg` command line on a tiny random model and a tiny random tokenizer, and on the shipped digits model."""

import numpy as np
import pytest
import torch
from PIL import Image

from arpg import ARPG, RasterLM, save_checkpoint
from arpg.cli import main
from arpg.digits import SHIPPED_CHECKPOINT
from arpg.distributed import batch_seed, class_labels
from arpg.vq import VQConfig, VQModel, to_uint8


def random_model(cls, name):
    torch.manual_seed(0)
    model = cls(name)
    model.reset_parameters(std=0.1, zero_head=False)  # a non-zero head: tokens depend on the inputs
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    save_checkpoint(random_model(ARPG, "ARPG-tiny"), str(d / "tiny.pt"))
    save_checkpoint(random_model(RasterLM, "Raster-tiny"), str(d / "raster.pt"))
    torch.manual_seed(0)
    vq = VQModel(VQConfig.tiny())  # 64 codes, the tiny model's vocabulary
    torch.save({"model": vq.state_dict()}, d / "vq.pt")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "in.png")
    Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)).save(d / "wide.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[5:20, 30:60] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(d / "empty.png")
    (d / "config.json").write_text('{"dim": 64}')
    return d


def run(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def fails(capsys, argv, match: str) -> str:
    """Run argv, expect exit status 2 and one error line (besides argparse's usage) containing `match`."""
    assert run(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    if lines and lines[0].startswith("usage: "):  # argparse's usage, continued on indented lines
        lines = [line for line in lines[1:] if not line.startswith(" ")]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert lines[0].startswith(f"arpg {argv[0]}: error: ") and match in lines[0], lines[0]
    return lines[0]


FAST = ["--steps", 3, "--no-progress"]


def test_sample_writes_images_and_tokens(files, tmp_path):
    d = files
    vq = ["--vq", d / "vq.pt", "--vq-config", "VQ-tiny"]
    common = ["sample", "--ckpt", d / "tiny.pt", "--classes", "3,1,7", "--num-per-class", 2, "--batch", 4,
              "--cfg", 2.0, "--seed", 5, *FAST]
    assert run([*common, *vq, "--png", tmp_path / "grid.png", "--npz", tmp_path / "img.npz"]) == 0
    assert run([*common, "--npz", tmp_path / "tok.npz"]) == 0  # no tokenizer: token grids
    img, tok = np.load(tmp_path / "img.npz"), np.load(tmp_path / "tok.npz")
    assert img["arr_0"].dtype == np.uint8 and img["arr_0"].shape == (6, 64, 64, 3)
    assert list(img["labels"]) == [3, 3, 1, 1, 7, 7] and list(tok["labels"]) == [3, 3, 1, 1, 7, 7]
    assert tok["tokens"].shape == (6, 4, 4) and tok["tokens"].dtype == np.int64
    # The images are the tokenizer's decoding of the same tokens (same seed, same batches).
    torch.manual_seed(0)
    vq_model = VQModel(VQConfig.tiny()).eval()
    with torch.no_grad():
        want = to_uint8(vq_model.decode_codes(torch.from_numpy(tok["tokens"]))).numpy()
    assert np.array_equal(img["arr_0"], want)
    with Image.open(tmp_path / "grid.png") as im:  # 6 images of 64 px in a 3 x 2 grid, 2 px gaps, labels under
        assert im.size == (3 * 66 + 2, 2 * (66 + 14) + 2)
        band = np.asarray(im.convert("RGB"))[2 + 64 : 2 + 64 + 14, 2 : 2 + 64]
        assert (band < 128).any() and (band == 255).any()  # the label's ink on white
        assert np.array_equal(np.asarray(im.convert("RGB"))[2 : 2 + 64, 2 : 2 + 64], img["arr_0"][0])
    assert run([*common, *vq, "--png", tmp_path / "bare.png", "--no-labels"]) == 0
    with Image.open(tmp_path / "bare.png") as im:
        assert im.size == (3 * 66 + 2, 2 * 66 + 2)
    # --num-images spreads over the classes in class order; the seed decides.
    assert run(["sample", "--ckpt", d / "tiny.pt", "--num-images", 5, "--cfg", 1, "--npz", tmp_path / "a.npz",
                "--tokens-only", *vq, *FAST]) == 0
    assert list(np.load(tmp_path / "a.npz")["labels"]) == [0, 2, 4, 6, 8]
    assert class_labels([4, 9], num_images=3) == [4, 4, 9] and class_labels([1, 2], 2) == [1, 1, 2, 2]
    assert batch_seed(0, 1) == batch_seed(0, 1) != batch_seed(0, 2) != batch_seed(1, 1)


def test_sample_errors(files, tmp_path, capsys):
    d = files
    out = ["--npz", tmp_path / "x.npz"]
    fails(capsys, ["sample", "--ckpt", d / "nope.pt", "--num-images", 2, *out], "no such file")
    # Wrong size: the weights' shapes disagree; wrong grid: only the stored config can tell.
    fails(capsys, ["sample", "--ckpt", d / "tiny.pt", "--config", "ARPG-tiny-g16", "--num-images", 2, *out],
          "another config than --config ARPG-tiny-g16")
    fails(capsys, ["sample", "--ckpt", d / "tiny.pt", "--config", "ARPG-tiny-g8", "--num-images", 2, *out],
          "grid_size 4 vs 8")
    bare = tmp_path / "bare.pt"
    torch.save({"model": torch.load(d / "tiny.pt")["state_dict"]}, bare)
    fails(capsys, ["sample", "--ckpt", bare, "--num-images", 2, *out], "pass --config")
    fails(capsys, ["sample", "--ckpt", bare, "--config", "ARPG-tiny-g16", "--num-images", 2, *out],
          "wrong shape for this config")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    fails(capsys, ["sample", "--ckpt", tmp_path / "junk.pt", "--num-images", 2, *out], "is not a checkpoint")
    # Starts like a torch zip file but is cut short: torch.load's error, on one line.
    (tmp_path / "cut.pt").write_bytes((d / "tiny.pt").read_bytes()[:200])
    fails(capsys, ["sample", "--ckpt", tmp_path / "cut.pt", "--num-images", 2, *out], "cut.pt: cannot be read (RuntimeError: PytorchStreamReader")
    fails(capsys, ["sample", "--ckpt", d / "tiny.pt", "--num-images", 2, "--png", tmp_path / "x.png"], "needs images")
    fails(capsys, ["sample", "--ckpt", d / "tiny.pt", "--num-images", 2, "--vq", d / "vq.pt", *out],
          "does not fit --vq-config VQ-16")
    fails(capsys, ["sample", "--ckpt", d / "tiny.pt", "--classes", "1,10", *out], "not in [0, 10)")
    fails(capsys, ["sample", "--ckpt", d / "tiny.pt", "--num-images", 2, "--steps", 17, *out], "takes 1 to 16 steps")
    assert run(["sample", "--ckpt", d / "tiny.pt", "--num-images", 0, *out]) == 2  # argparse-level
    assert not (tmp_path / "x.npz").exists()


def test_inpaint_and_outpaint(files, tmp_path):
    d = files
    base = ["--ckpt", d / "tiny.pt", "--vq", d / "vq.pt", "--vq-config", "VQ-tiny", "--class", 2, "--cfg", 1.5,
            *FAST]
    assert run(["inpaint", *base, "--image", d / "in.png", "--mask", d / "mask.png", "--num", 3, "--batch", 2,
                "--png", tmp_path / "m.png", "--npz", tmp_path / "m.npz"]) == 0
    res = np.load(tmp_path / "m.npz")
    assert res["arr_0"].shape == (3, 64, 64, 3) and list(res["labels"]) == [2, 2, 2]
    with Image.open(tmp_path / "m.png") as im:  # the input with the region darkened, then 3 results
        assert im.size == (2 * 66 + 2, 2 * 66 + 2)
    assert run(["inpaint", *base, "--image", d / "in.png", "--box", "0,0,20,33", "--box-units", "pixels",
                "--num", 1, "--npz", tmp_path / "b.npz"]) == 0
    assert np.load(tmp_path / "b.npz")["arr_0"].shape == (1, 64, 64, 3)
    # Outpainting to the right doubles the width (a 4 x 8 token canvas on the 4 x 4 model: expansion).
    assert run(["outpaint", *base, "--image", d / "in.png", "--side", "right", "--num", 2,
                "--npz", tmp_path / "o.npz", "--png", tmp_path / "o.png"]) == 0
    assert np.load(tmp_path / "o.npz")["arr_0"].shape == (2, 64, 128, 3)
    # A 2 x 4 token image completed downwards on the model's own 4 x 4 grid.
    assert run(["outpaint", *base, "--image", d / "wide.png", "--side", "bottom", "--canvas", "4,4", "--num", 1,
                "--npz", tmp_path / "w.npz"]) == 0
    assert np.load(tmp_path / "w.npz")["arr_0"].shape == (1, 64, 64, 3)


def test_edit_errors(files, tmp_path, capsys):
    d = files
    base = ["--vq", d / "vq.pt", "--vq-config", "VQ-tiny", "--class", 2, "--png", tmp_path / "x.png", *FAST]
    ckpt = ["--ckpt", d / "tiny.pt"]
    img = ["--image", d / "in.png"]
    fails(capsys, ["inpaint", *ckpt, *base, *img, "--mask", d / "empty.png"], "marks no pixel")
    fails(capsys, ["inpaint", *ckpt, *base, *img, "--mask", d / "wide.png"], "the mask is 64x32 pixels")
    fails(capsys, ["inpaint", *ckpt, *base, *img, "--mask", d / "missing.png"], "mask not found")
    fails(capsys, ["inpaint", *ckpt, *base, *img], "exactly one of --mask and --box")
    fails(capsys, ["inpaint", *ckpt, *base, *img, "--box", "0,0,5,2"], "--box 0,0,5,2")
    fails(capsys, ["inpaint", *ckpt, *base, "--image", d / "wide.png", "--box", "0,0,1,1"], "pass --resize")
    fails(capsys, ["inpaint", *ckpt, *base, "--image", d / "nope.png", "--box", "0,0,1,1"], "image not found")
    fails(capsys, ["inpaint", "--ckpt", d / "raster.pt", *base, *img, "--box", "0,0,1,1"], "needs an ARPG")
    fails(capsys, ["outpaint", *ckpt, *base, *img, "--side", "left", "--canvas", "3,8"], "smaller than")
    assert run(["inpaint", *ckpt, *base, *img, "--box", "0,0,1"]) == 2  # argparse: 4 integers
    assert not (tmp_path / "x.png").exists()


def test_digits_commands_are_handed_to_their_own_parsers(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train-digits", "--help"])
    assert e.value.code == 0 and "usage: arpg train-digits" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["eval-digits", "--help"])
    assert e.value.code == 0 and "usage: arpg eval-digits" in capsys.readouterr().out


def test_sample_digits_without_a_tokenizer(tmp_path):
    # The digits model's tokens are pixel values: `--ckpt digits` (or the file itself) gives images with no --vq.
    common = ["sample", "--classes", "0,1,7", "--num-per-class", 2, "--cfg", 5, "--device", "cpu", *FAST]
    assert run([*common, "--ckpt", "digits", "--png", tmp_path / "a.png", "--npz", tmp_path / "a.npz"]) == 0
    assert run([*common, "--ckpt", SHIPPED_CHECKPOINT, "--png", tmp_path / "b.png"]) == 0
    with Image.open(tmp_path / "a.png") as im:  # 6 digits of 8 x 8 pixels drawn 8x: a 3 x 2 grid with 2 px gaps
        assert im.size == (3 * 66 + 2, 2 * 66 + 2)
        grid = np.asarray(im.convert("L"))
    tile = grid[2:66, 2:66]
    assert tile.min() < 64 and tile.max() > 192  # ink and paper, not a constant picture
    with Image.open(tmp_path / "b.png") as im:
        assert np.array_equal(np.asarray(im.convert("L")), grid)
    res = np.load(tmp_path / "a.npz")
    assert res["arr_0"].shape == (6, 8, 8, 3) and res["arr_0"].dtype == np.uint8
    assert list(res["labels"]) == [0, 0, 1, 1, 7, 7]
    assert np.array_equal(tile[::8, ::8], res["arr_0"][0, :, :, 0])  # the PNG is the images, nearest-upscaled


@pytest.mark.parametrize("case", ["no-cuda", "cuda-index", "negative-box", "negative-class", "json-ckpt",
                                  "missing-ckpt", "zero-steps"])
def test_argument_errors_name_the_argument(files, tmp_path, capsys, monkeypatch, case):
    d = files
    out = ["--png", tmp_path / "out.png", "--npz", tmp_path / "out.npz"]
    sample = ["sample", "--ckpt", d / "tiny.pt", "--num-images", 2, *out, *FAST]
    edit = ["--ckpt", d / "tiny.pt", "--vq", d / "vq.pt", "--vq-config", "VQ-tiny", "--image", d / "in.png",
            "--class", 2, *out, *FAST]
    if case == "no-cuda":  # not blamed on the checkpoint
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        argv, match = [*sample, "--device", "cuda"], "argument --device: cuda: CUDA is not available"
    elif case == "cuda-index":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        argv, match = [*sample, "--device", "cuda:1"], "argument --device: cuda:1: this machine has 1 CUDA device"
    elif case == "negative-box":  # a list starting with '-' reaches the range check, not argparse's option parsing
        argv, match = ["inpaint", *edit, "--box", "-1,0,4,4"], "--box -1,0,4,4: need 0 <= r0 < r1 <= 4"
    elif case == "negative-class":
        argv = ["sample", "--ckpt", d / "tiny.pt", "--classes", "-1,3", "--npz", tmp_path / "out.npz", *FAST]
        match = "--classes: [-1] not in [0, 10)"
    elif case == "json-ckpt":  # torch.load's unpickling text is not shown
        argv = ["sample", "--ckpt", d / "config.json", "--num-images", 2, *out]
        match = f"argument --ckpt/--model: {d / 'config.json'} is not a checkpoint (expected a torch .pt/.pth or .safetensors"
    elif case == "missing-ckpt":
        argv = ["sample", "--ckpt", d / "nope.pt", "--num-images", 2, *out]
        match = f"argument --ckpt/--model: {d / 'nope.pt'}: no such file"
    else:  # the subparser reports it, with its prog
        argv, match = [*sample, "--steps", 0], "argument --steps: must be a positive integer"
    fails(capsys, argv, match)
    assert not any(tmp_path.iterdir())


def test_sample_help_says_what_the_defaults_do(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # argparse wraps the help to the terminal's width
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert ("--classes CLASSES comma-separated class labels (default with --num-per-class or --num-images: "
            "all classes)") in help_text
    assert "--num-per-class NUM_PER_CLASS images per class (default with --classes: 1)" in help_text
    assert "at least one of --classes, --num-per-class and --num-images" in help_text
    base = ["sample", "--ckpt", files / "tiny.pt", "--tokens-only", *FAST]
    assert run([*base, "--classes", "3,1", "--npz", tmp_path / "c.npz"]) == 0
    assert list(np.load(tmp_path / "c.npz")["labels"]) == [3, 1]
    assert run([*base, "--num-per-class", 2, "--npz", tmp_path / "n.npz"]) == 0
    assert list(np.load(tmp_path / "n.npz")["labels"]) == [c for c in range(10) for _ in range(2)]
    capsys.readouterr()
    fails(capsys, [*base, "--npz", tmp_path / "x.npz"], "give --classes, --num-per-class and/or --num-images")
    assert not (tmp_path / "x.npz").exists()
