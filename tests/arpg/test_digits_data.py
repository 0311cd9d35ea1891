"""The digits pipeline's pieces that need no trained model: the fixed split, the judge, and a short
training run through `ARPG.forward` whose saved checkpoint loads back with its config."""

import pytest
import torch

pytest.importorskip("sklearn")

from arpg import digits as D  # noqa: E402
from arpg.checkpoint import load_checkpoint  # noqa: E402


def test_split_is_fixed_and_stratified():
    a, b = D.load_split(), D.load_split()
    assert a.x_train.shape == (1437, 64) and a.x_test.shape == (360, 64)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert int(a.x_train.min()) == 0 and int(a.x_train.max()) == 16
    assert torch.bincount(a.y_test, minlength=10).min() >= 35


def test_judge_reads_real_test_digits():
    split = D.load_split()
    assert D.Judge(split).accuracy(split.x_test, split.y_test) >= 0.9


def test_short_training_saves_a_loadable_checkpoint(tmp_path):
    torch.set_num_threads(1)
    path = str(tmp_path / "digits.safetensors")
    model, info = D.train(out=path, steps=4, batch_size=16, dim=32, n_layer=2, n_head=1)
    loaded = load_checkpoint(path)
    assert loaded.config == model.config and loaded.config.grid_size == 8 and loaded.config.vocab_size == 17
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p.to(q.dtype), q), name  # stored in float16 to keep the file small
