"""The trainer (arpg.train) on the CPU: world sizes, DDP and FSDP2 over gloo, resume, crash-safe saves,
the data layouts, and bad input."""

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import arpg
import arpg.digits as D
from arpg import train as T
from arpg.config import CONFIGS
from arpg.data_codes import CodeDataError, CodeFolder, PackedCodes, TensorCodes, open_codes, pack_codes

TINY = CONFIGS["ARPG-tiny"]  # 4x4 grid, 64 codes, 10 classes


def make_codes(root, per_class=8, n_aug=2, seq=16, vocab=64, classes=10, seed=0):
    """The original's layout: <root>/<class>/<i>.npy of [1, n_aug, seq]: images of a class share a
    pattern (mostly one code, a stripe of another), a fifth of the codes random."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(os.path.join(root, str(c)), exist_ok=True)
        for i in range(per_class):
            base = np.where(np.arange(seq) % 4 == 0, (7 * c + 3) % vocab, (5 * c) % vocab)
            aug = np.stack([(base + a) % vocab for a in range(n_aug)])
            noisy = np.where(rng.random(aug.shape) < 0.8, aug, rng.integers(0, vocab, aug.shape))
            np.save(os.path.join(root, str(c), f"{i}.npy"), noisy[None].astype(np.int64))
    return str(root)


def recipe(dropouts=0.0, **kw):
    model = dataclasses.replace(TINY, token_dropout=dropouts, resid_dropout=dropouts, ffn_dropout=dropouts)
    base = dict(model=model, steps=6, global_batch=8, lr=1e-3, lr_ref_batch=None, warmup=2, ema=0.9, log_every=1)
    base.update(kw)
    return T.TrainConfig(**base)


def log_rows(run):
    with open(os.path.join(run, "log.csv")) as f:
        return list(csv.DictReader(f))


def losses(run):
    return [(int(r["step"]), float(r["loss"])) for r in log_rows(run)]


def final_weights(run):
    return torch.load(os.path.join(run, "final.pt"), weights_only=True)["model"]


def assert_same_weights(a, b, atol=1e-5):
    # Adam turns reduction-order noise in near-zero gradients into differences of up to ~lr * 1e-3.
    # (Adam is also blind to the gradient scale: the tests compare the grad norms as well.)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=atol, msg=k)


def assert_same_losses(a, b, tol=1e-5):
    assert [s for s, _ in a] == [s for s, _ in b]
    for (s, x), (_, y) in zip(a, b):
        assert abs(x - y) <= tol * max(1.0, abs(x)), (s, x, y)


def cli_args(cfg, data, out):
    m = cfg.model
    return ["--data", data, "--out", out, "--config", "ARPG-tiny", "--steps", str(cfg.steps), "--global-batch",
            str(cfg.global_batch), "--lr", str(cfg.lr), "--lr-ref-batch", "0", "--warmup", str(cfg.warmup),
            "--ema", str(cfg.ema), "--log-every", str(cfg.log_every), "--token-dropout", str(m.token_dropout),
            "--resid-dropout", str(m.resid_dropout), "--ffn-dropout", str(m.ffn_dropout),
            "--ckpt-every", str(cfg.ckpt_every), "--keep", str(cfg.keep), "--device", "cpu"]


def run_cli(args, procs=1):
    cmd = [sys.executable, "-m", "arpg", "train", *args, "--procs", str(procs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


# --------------------------------------------------------------------------------------------------


# The digits trainer before the move into arpg.train (its own loop in arpg/digits.py at f3e40a6), this
# recipe, seed 0: the loss of every step and two sums of the final (EMA) weights.
OLD_DIGITS_LOSSES = [2.8332135677337646, 2.801535129547119, 2.7323365211486816, 2.6078197956085205,
                     2.4866204261779785, 2.3633058071136475, 2.3088138103485107, 2.244070053100586,
                     2.1629996299743652, 2.1400060653686523, 2.1108181476593018, 2.138434410095215]
OLD_DIGITS_ABS_SUM = 2394.3713228498023
OLD_DIGITS_HEAD_SUM = -0.5103930466575548
DIGITS_KW = dict(steps=12, batch_size=16, warmup=3, dim=32, n_layer=2, n_head=1, ema=0.9, optimizer="muon",
                 input_noise=0.25, seed=0)


def test_digits_training_is_unchanged_by_the_move():
    model, _ = D.train(out=None, procs=1, threads=None, log=None, **DIGITS_KW)
    sd = model.state_dict()
    # The constants were taken on an Intel Xeon (AVX-512); another CPU's BLAS rounds differently (an AMD
    # EPYC with AVX2: 5.8e-9 and 1.0e-7 relative, losses within 2.4e-7), far inside these tolerances,
    # while a change to the training itself moves them by orders of magnitude more.
    assert sum(float(v.double().abs().sum()) for v in sd.values()) == pytest.approx(OLD_DIGITS_ABS_SUM, rel=1e-6)
    assert float(sd["head.weight"].double().sum()) == pytest.approx(OLD_DIGITS_HEAD_SUM, rel=1e-5)
    split = D.load_split()
    seen = []
    T.train(D.digits_recipe(**DIGITS_KW), TensorCodes(split.x_train, split.y_train), log=None,
            on_step=lambda step, loss: seen.append(loss))
    assert seen == pytest.approx(OLD_DIGITS_LOSSES, abs=1e-6)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, strategy):
    data = make_codes(tmp_path / "codes")
    cfg = recipe(ckpt_every=3, keep=0)
    one = str(tmp_path / "one")
    T.train(cfg, open_codes(data), out=one, log=None)
    two = str(tmp_path / "two")
    run_cli(cli_args(cfg, data, two) + ["--strategy", strategy], procs=2)
    assert_same_losses(losses(one), losses(two))
    grad_one = [float(r["grad_norm"]) for r in log_rows(one)]
    assert grad_one == pytest.approx([float(r["grad_norm"]) for r in log_rows(two)], rel=1e-5)
    assert_same_weights(final_weights(one), final_weights(two))
    step6 = os.path.join(two, "checkpoints", "step-0000006" + (".pt" if strategy == "ddp" else ""))
    assert os.path.isdir(step6) == (strategy == "fsdp")
    for key in ("model", "ema"):  # load_checkpoint reads either kind of checkpoint, raw or EMA weights
        a = arpg.load_checkpoint(os.path.join(one, "checkpoints", "step-0000006.pt"), key=key).state_dict()
        assert_same_weights(a, arpg.load_checkpoint(step6, key=key).state_dict())
    if strategy == "fsdp":
        # A run killed after its step-3 checkpoint (what it leaves on disk), resumed on two processes,
        # ends where the uninterrupted run ended.
        killed = str(tmp_path / "killed")
        shutil.copytree(two, killed)
        shutil.rmtree(os.path.join(killed, "checkpoints", "step-0000006"))
        os.remove(os.path.join(killed, "final.pt"))
        with open(os.path.join(killed, "checkpoints", "latest"), "w") as f:
            f.write("step-0000003\n")
        run_cli(cli_args(cfg, data, killed) + ["--strategy", "fsdp", "--resume"], procs=2)
        assert_same_losses(losses(two), losses(killed), tol=1e-6)
        assert_same_weights(final_weights(two), final_weights(killed), atol=1e-7)


def test_gradient_accumulation_matches_the_whole_batch(tmp_path):
    data = open_codes(make_codes(tmp_path / "codes"))
    _, whole = T.train(recipe(), data, log=None)
    a, _ = T.train(recipe(), data, log=None)
    b, acc = T.train(recipe(micro_batch=2), data, log=None)
    assert_same_losses(whole["losses"], acc["losses"])
    assert_same_weights(a.state_dict(), b.state_dict())


_KILL_SCRIPT = """
import json, os, signal, sys
from arpg import train as T
from arpg.data_codes import open_codes
cfg = T.TrainConfig.from_dict(json.loads(sys.argv[1]))
def on_step(step, loss):
    if step == int(sys.argv[4]):
        os.kill(os.getpid(), signal.SIGKILL)
T.train(cfg, open_codes(sys.argv[2]), out=sys.argv[3], log=None, on_step=on_step)
"""


def test_killed_run_resumes_step_for_step(tmp_path):
    # Dropouts on: the resumed run must also restore the RNG of the dropout masks.
    data = make_codes(tmp_path / "codes")
    cfg = recipe(dropouts=0.1, steps=8, ckpt_every=3)
    full = str(tmp_path / "full")
    T.train(cfg, open_codes(data), out=full, log=None)
    run = str(tmp_path / "run")
    res = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, json.dumps(cfg.to_dict()), data, run, "5"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert T.latest_checkpoint(run).endswith("step-0000003.pt")
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4]  # killed in step 5; row 4 came after the checkpoint
    T.train(cfg, open_codes(data), out=run, resume=True, log=None)
    assert losses(run) == losses(full)
    assert_same_weights(final_weights(run), final_weights(full), atol=0)


def test_a_crash_while_saving_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    data = open_codes(make_codes(tmp_path / "codes"))
    cfg = recipe(steps=6, ckpt_every=2, keep=0)
    run = str(tmp_path / "run")
    real_save, calls = torch.save, []

    def failing_save(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) == 2:  # the step-4 checkpoint: half the bytes, then the disk fills
            f.write(b"\x00" * 1000)
            raise OSError("No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        T.train(cfg, data, out=run, log=None)
    monkeypatch.setattr(torch, "save", real_save)
    ckpts = sorted(os.listdir(os.path.join(run, "checkpoints")))
    assert ckpts == ["latest", "step-0000002.pt"]  # no half-written file, no temporary left behind
    assert T.latest_checkpoint(run).endswith("step-0000002.pt")
    arpg.load_checkpoint(T.latest_checkpoint(run))  # still readable
    T.train(cfg, data, out=run, resume=True, log=None)
    full = str(tmp_path / "full")
    T.train(cfg, data, out=full, log=None)
    assert losses(run) == losses(full)
    assert_same_weights(final_weights(run), final_weights(full), atol=0)


def test_resume_drops_checkpoints_newer_than_latest(tmp_path):
    # Killed between renaming a checkpoint into place and rewriting `latest`: the newer files are dropped,
    # and keep=1 never deletes the checkpoint `latest` names.
    data = open_codes(make_codes(tmp_path / "codes"))
    full = str(tmp_path / "full")
    T.train(recipe(ckpt_every=2, keep=0), data, out=full, log=None)
    run = str(tmp_path / "run")
    shutil.copytree(full, run)
    os.remove(os.path.join(run, "final.pt"))
    with open(os.path.join(run, "checkpoints", "latest"), "w") as f:
        f.write("step-0000002.pt\n")
    open(os.path.join(run, "checkpoints", "step-0000004.pt.tmp-77"), "wb").close()
    T.train(recipe(ckpt_every=2, keep=1), data, out=run, resume=True, log=None)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest", "step-0000006.pt"]
    assert losses(run) == losses(full)
    assert_same_weights(final_weights(run), final_weights(full), atol=0)


@pytest.mark.parametrize("layout", ["folder", "packed"])
def test_loss_falls_with_the_original_regularisation(tmp_path, layout):
    data = make_codes(tmp_path / "codes", per_class=4)
    if layout == "packed":
        data = pack_codes(data, str(tmp_path / "packed"), shard_size=7).source
    model = dataclasses.replace(TINY, token_dropout=0.1, resid_dropout=0.1, ffn_dropout=0.1, drop_path=0.1)
    cfg = T.TrainConfig(model=model, steps=60, global_batch=8, lr=3e-3, lr_ref_batch=None, warmup=5, ema=0.0,
                        log_every=10)
    _, info = T.train(cfg, open_codes(data), log=None)
    first, last = info["losses"][0][1], info["losses"][-1][1]
    assert last < first - 0.5, info["losses"]


def test_pack_round_trip_reads_the_same_samples(tmp_path):
    src = make_codes(tmp_path / "codes", per_class=3, n_aug=3)
    folder = CodeFolder(src)
    packed = pack_codes(src, str(tmp_path / "packed"), shard_size=4)
    assert isinstance(open_codes(packed.source), PackedCodes) and len(packed) == len(folder) == 30
    assert len(packed.codes) == 8 and packed.codes[0].dtype == np.uint16
    rng = np.random.default_rng(1)
    idx, picks = rng.permutation(30)[:17], rng.integers(0, 2**40, 17)
    for a, b in zip(folder.read(idx, picks), packed.read(idx, picks)):
        assert torch.equal(a, b)
    with pytest.raises(CodeDataError, match="already exists"):
        pack_codes(src, packed.source)
    with pytest.raises(SystemExit) as e:
        T.pack_main([src, packed.source, "--no-progress"])
    assert e.value.code == 2


def test_export_writes_the_published_format(tmp_path):
    data = open_codes(make_codes(tmp_path / "codes"))
    run = str(tmp_path / "run")
    T.train(recipe(steps=3), data, out=run, log=None)
    ckpt = T.latest_checkpoint(run)
    for weights, key in (("ema", "ema"), ("raw", "model")):
        out = str(tmp_path / f"{weights}.pt")
        T.export_weights(ckpt, out, weights)
        obj = torch.load(out, weights_only=True)
        assert set(obj) == {"model", "config", "arch"}
        assert_same_weights(arpg.load_checkpoint(out).state_dict(), arpg.load_checkpoint(ckpt, key=key).state_dict(),
                            atol=0)
    # The command line: the same file; it never overwrites one.
    assert T.export_main([ckpt, str(tmp_path / "cli.pt"), "--weights", "raw"]) == 0
    assert_same_weights(arpg.load_checkpoint(str(tmp_path / "cli.pt")).state_dict(),
                        arpg.load_checkpoint(ckpt).state_dict(), atol=0)
    with pytest.raises(SystemExit) as e:
        T.export_main([ckpt, str(tmp_path / "cli.pt")])
    assert e.value.code == 2
    # The run's final.pt is the EMA weights, in the same format.
    assert_same_weights(final_weights(run), arpg.load_checkpoint(ckpt, key="ema").state_dict(), atol=0)


def _cli_error(capsys, argv):
    assert T.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_is_named_and_nothing_is_overwritten(tmp_path, capsys):
    base = ["--config", "ARPG-tiny", "--steps", "2", "--global-batch", "4", "--log-every", "0", "--device", "cpu"]
    run = str(tmp_path / "run")
    assert "no such code folder" in _cli_error(capsys, ["--data", str(tmp_path / "nope"), "--out", run, *base])
    os.makedirs(tmp_path / "empty")
    assert "no <class>/<name>.npy" in _cli_error(capsys, ["--data", str(tmp_path / "empty"), "--out", run, *base])
    short = make_codes(tmp_path / "short", per_class=1, seq=9)
    assert "9 codes per image, the model expects 16" in _cli_error(capsys, ["--data", short, "--out", run, *base])
    labels = make_codes(tmp_path / "labels", per_class=1, classes=12)
    assert "label 11 out of range" in _cli_error(capsys, ["--data", labels, "--out", run, *base])
    values = make_codes(tmp_path / "values", per_class=1, vocab=80)
    assert "out of range for a vocabulary of 64" in _cli_error(capsys, ["--data", values, "--out", run, *base])
    assert "unknown --config" in _cli_error(capsys, ["--data", short, "--out", run, "--config", "ARPG-huge"])
    assert not os.path.exists(os.path.join(run, "checkpoints", "latest"))

    good = make_codes(tmp_path / "good", per_class=1)
    shutil.rmtree(run, ignore_errors=True)
    assert T.main(["--data", good, "--out", run, *base]) == 0
    before = {n: open(os.path.join(run, n), "rb").read() for n in ("run.json", "final.pt")}
    assert "already holds a run" in _cli_error(capsys, ["--data", good, "--out", run, *base])
    err = _cli_error(capsys, ["--data", good, "--out", run, *base, "--lr", "0.5", "--resume"])
    assert "another config" in err and "lr 0.0001 vs 0.5" in err
    err = _cli_error(capsys, ["--data", good, "--out", run, *base, "--token-dropout", "0.2", "--resume"])
    assert "another config" in err and "model.token_dropout 0.1 vs 0.2" in err
    err = _cli_error(capsys, ["--data", good, "--out", run, *base[:2], "--steps", "3", *base[4:], "--resume"])
    assert "another config" in err and "steps 2 vs 3" in err  # the cosine schedule's length
    more = make_codes(tmp_path / "more", per_class=2)
    assert "dataset of 10 samples, this one has 20" in _cli_error(capsys, ["--data", more, "--out", run, *base,
                                                                           "--resume"])
    assert "no checkpoint to resume" in _cli_error(capsys, ["--data", good, "--out", str(tmp_path / "new"), *base,
                                                            "--resume"])
    assert before == {n: open(os.path.join(run, n), "rb").read() for n in ("run.json", "final.pt")}


def test_recipe_validation_names_the_field():
    data = TensorCodes(torch.zeros(8, 16, dtype=torch.long), torch.zeros(8, dtype=torch.long))
    for kw, word in ((dict(steps=0), "steps"), (dict(ema=1.0), "ema"), (dict(optimizer="sgd"), "optimizer"),
                     (dict(global_batch=16), "fewer than the global batch"), (dict(micro_batch=3), "micro_batch"),
                     (dict(strategy="zero"), "strategy"), (dict(precision="fp8"), "precision")):
        with pytest.raises(T.TrainError, match=word):
            T.train(recipe(**kw), data, log=None)
    with pytest.raises(ValueError, match="token_dropout"):
        dataclasses.replace(TINY, token_dropout=1.0)


def test_compile_and_bf16_autocast_train_the_same_model(tmp_path):
    data = open_codes(make_codes(tmp_path / "codes", per_class=1))
    cfg = recipe(steps=3, global_batch=8)
    _, eager = T.train(cfg, data, log=None)
    _, bf16 = T.train(dataclasses.replace(cfg, precision="bf16"), data, log=None)  # CPU autocast here
    assert_same_losses(eager["losses"], bf16["losses"], tol=2e-2)
    model, compiled = T.train(dataclasses.replace(cfg, compile=True), data, log=None)
    assert_same_losses(eager["losses"], compiled["losses"])
    assert "_orig_mod" not in "".join(model.state_dict())  # compiled in place: the plain names
