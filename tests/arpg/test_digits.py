"""End-to-end proof on real data: the shipped ARPG trained on scikit-learn's 8x8 digits, judged by an
independent classifier fitted on the real training split only.

Training (`ARPG.forward`: random orders, class dropout), the attention ops' math (the reference kernels
on CPU), the random-order paged sampler (`arpg.generate`) and the zero-shot edits (`arpg.edit`) all
have to be right for these numbers to come out.
"""

import os

import pytest
import torch

pytest.importorskip("sklearn")

from arpg import digits as D  # noqa: E402
from arpg.checkpoint import load_checkpoint  # noqa: E402

# The CFG scale and seed of the accuracy test: the evaluation's recommended setting
# (benchmarks/results/digits/results.md).
CFG = D.RECOMMENDED_CFG
SEED = 0


@pytest.fixture(scope="module")
def split():
    return D.load_split()


@pytest.fixture(scope="module")
def judge(split):
    return D.Judge(split)


@pytest.fixture(scope="module")
def model():
    return D.load_digits_model()


def test_split_is_fixed_and_stratified(split):
    assert split.x_train.shape == (1437, 64) and split.x_test.shape == (360, 64)
    assert split.x_train.dtype == torch.int64 and int(split.x_train.min()) == 0 and int(split.x_train.max()) == 16
    counts = torch.bincount(split.y_test, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # stratified: 10% +- 1 per class
    again = D.load_split()
    assert torch.equal(again.x_train, split.x_train) and torch.equal(again.y_test, split.y_test)
    # Train and test are disjoint rows of load_digits().
    assert split.x_train.shape[0] + split.x_test.shape[0] == 1797


def test_judge_is_a_good_judge(split, judge):
    assert judge.accuracy(split.x_test, split.y_test) >= 0.95


def test_shipped_checkpoint_loads(model):
    assert os.path.getsize(D.SHIPPED_CHECKPOINT) < 4 * 2**20
    c = model.config
    assert (c.vocab_size, c.num_classes, c.grid_size, c.head_dim) == (17, 10, 8, 32)
    # DESIGN.md section 1 table layout: 17 pixel values, [MASK] = 17, classes 18..27, no class 28, 1 unused.
    assert (c.mask_token_id, c.class_token_id(0), c.null_class_id, c.num_embeddings) == (17, 18, 28, 30)
    assert model.embeddings.weight.shape == (30, c.dim)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.training


def test_shipped_checkpoint_fits_held_out_digits(model, split):
    # The model's own likelihood, under random orders, classifies held-out digits (argmax_c p(x | c)):
    # the class conditioning was learned, not just the pixel statistics.
    x, y = split.x_test[:120], split.y_test[:120]
    g = torch.Generator().manual_seed(0)
    orders = torch.rand(x.shape[0], 64, generator=g).argsort(1)
    nll = torch.empty(x.shape[0], 10)
    with torch.no_grad():
        for c in range(10):
            logits, _ = model(x, torch.full_like(y, c), orders=orders)
            nll[:, c] = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x.gather(1, orders),
                                                          reduction="none").sum(1)
    assert (nll.argmin(1) == y).float().mean() >= 0.9
    assert nll.gather(1, y[:, None]).mean() / 64 < 1.45  # nats per pixel; uniform over 17 values is 2.83


def test_class_conditional_accuracy_16_steps(model, judge):
    labels = torch.arange(10).repeat_interleave(20)
    toks = D.generate_digits(model, labels, num_steps=16, cfg_scale=CFG, seed=SEED)
    assert toks.shape == (200, 64) and toks.dtype == torch.int64
    assert int(toks.min()) >= 0 and int(toks.max()) < 17
    acc = judge.accuracy(toks, labels)
    assert acc >= 0.8, f"judge accuracy {acc:.3f} at 16 steps, CFG {CFG}"


def test_generation_reproducible_by_seed(model):
    labels = torch.arange(10)
    a = D.generate_digits(model, labels, num_steps=8, cfg_scale=CFG, seed=3)
    b = D.generate_digits(model, labels, num_steps=8, cfg_scale=CFG, seed=3)
    c = D.generate_digits(model, labels, num_steps=8, cfg_scale=CFG, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("region", D.MASKS)
def test_inpainting_beats_trivial_fill_and_keeps_known_pixels(model, judge, split, region):
    x, y = split.x_test[:120], split.y_test[:120]
    known = D.known_mask(region)
    trivial = judge.accuracy(D.mean_fill(x, known, split.x_train), y)
    # Zero-shot, class-conditional as in the paper: the model gets the known pixels and the true label.
    # (Without the label its fills lose to this trivial fill: see benchmarks/results/digits/results.md.)
    out = D.inpaint_digits(model, x, known, y, num_steps=8, cfg_scale=CFG, seed=SEED)
    assert torch.equal(out[:, known], x[:, known])
    assert int(out.min()) >= 0 and int(out.max()) < 17
    acc = judge.accuracy(out, y)
    assert acc > trivial + 0.15, f"inpainting {acc:.3f} vs trivial fill {trivial:.3f}"
    assert torch.equal(out, D.inpaint_digits(model, x, known, y, num_steps=8, cfg_scale=CFG, seed=SEED))


def test_outpainting_keeps_the_given_half(model, split):
    tiles = split.x_test[:20].view(-1, 8, 8)[:, :, :4]
    out = D.outpaint_digits(model, tiles, (8, 8), (0, 0), split.y_test[:20], num_steps=8, cfg_scale=CFG, seed=SEED)
    assert out.shape == (20, 8, 8)
    assert torch.equal(out[:, :, :4], tiles)


def test_known_mask_rejects_unknown_regions():
    assert int((~D.known_mask("center4x4")).sum()) == 16 and int((~D.known_mask("right_half")).sum()) == 32
    with pytest.raises(ValueError, match="region"):
        D.known_mask("top_half")


def test_frechet_distance():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g).double().numpy()
    b = (torch.randn(4000, 3, generator=g) * 2 + 1).double().numpy()
    assert abs(D.frechet_distance(a, a)) < 1e-9
    # Isotropic Gaussians: |mu|^2 + d * (1 - 2)^2 = 3 + 3.
    assert abs(D.frechet_distance(a, b) - 6.0) < 0.4


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_short_training_saves_a_loadable_checkpoint(tmp_path, optimizer):
    out = str(tmp_path / "d.safetensors")
    model, info = D.train(out=out, steps=3, batch_size=8, warmup=1, dim=32, n_layer=2, n_head=1, optimizer=optimizer,
                          procs=1, threads=None, log=None)
    loaded = load_checkpoint(out)
    assert loaded.config == model.config == D.digits_config(dim=32, n_layer=2, n_head=1)
    for (n, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p.to(q.dtype), q), n  # stored in float16 to keep the file small
    assert info["steps"] == 3 and info["optimizer"] == optimizer
    assert os.path.exists(str(tmp_path / "d.json"))


def test_data_parallel_training_matches_one_process():
    # Two single-threaded processes under torchrun (gloo) take the same global batches as one process:
    # the same weights up to the order of float reductions.
    kw = dict(steps=3, batch_size=8, warmup=1, dim=32, n_layer=2, n_head=1, threads=None, log=None)
    one, _ = D.train(out=None, procs=1, **kw)
    two, info = D.train(out=None, procs=2, **kw)
    assert info["procs"] == 2 and info["threads_per_proc"] == 1
    for (n, p), q in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_training_lowers_the_loss():
    _, info = D.train(out=None, steps=150, batch_size=16, warmup=5, lr=1e-2, dim=32, n_layer=2, n_head=1,
                      input_noise=0.0, procs=1, threads=None, log=None)
    assert info["test_loss"] < 2.5  # held-out nats per pixel, log(17) = 2.83 at initialisation (zero head)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="optimizer"):
        D.train(out=None, steps=1, optimizer="sgd", dim=32, n_layer=2, n_head=1, procs=1, threads=None, log=None)
    with pytest.raises(ValueError, match="steps"):
        D.train(out=None, steps=0, dim=32, n_layer=2, n_head=1, procs=1, threads=None, log=None)
    with pytest.raises(ValueError, match="input_noise"):
        D.train(out=None, steps=1, input_noise=1.0, procs=1, log=None)
    with pytest.raises(ValueError, match="procs"):
        D.train(out=None, steps=1, batch_size=5, procs=2, log=None)


def test_command_lines():
    assert D.main([]) == 2
    with pytest.raises(SystemExit):
        D.train_main(["--help"])
    assert "--n-per-class" in D._eval_parser().format_help()


def test_eval_writes_a_new_untracked_folder_by_default(tmp_path, monkeypatch, capsys):
    # The committed record (benchmarks/results/digits) is rewritten only when asked for by --out-dir.
    monkeypatch.chdir(tmp_path)
    assert D.eval_main(["--steps", "2", "--cfg", "1", "--n-per-class", "2", "--n-edit", "2", "--edit-steps", "2"]) == 0
    (run_dir,) = (tmp_path / "arpg-results").iterdir()
    assert run_dir.name.startswith("eval-digits-") and (run_dir / "results.md").is_file()
    assert f"wrote the results to {os.path.join('arpg-results', run_dir.name)}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arpg-results"]
    assert "--out-dir benchmarks/results/digits" in " ".join(D._eval_parser().format_help().split())


def test_eval_progress_counts_every_image(tmp_path, monkeypatch):
    import tqdm

    bars = []

    class Bar(tqdm.tqdm):
        def __init__(self, *a, **kw):
            kw["disable"] = False  # as on a terminal
            kw["file"] = open(os.devnull, "w")
            super().__init__(*a, **kw)
            bars.append(self)

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    lines = []
    D.evaluate(steps=[2], cfg_scales=[1.0, 2.0], n_per_class=2, n_edit=3, edit_steps=2, progress=True,
               log=lines.append)
    (bar,) = bars
    assert bar.unit == "img" and bar.total == 2 * 20 + 3 * 2 * 3 and bar.n == bar.total
    assert lines  # the real-data line goes through `log`; later lines go above the bar
