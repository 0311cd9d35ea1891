"""Published weights by name (arpg.hub) against a local Hugging Face cache built here (offline), the
pipeline (`ARPGPipeline`) and `from_original`, all on tiny models standing in for the published ones."""

import dataclasses
import hashlib
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

pytest.importorskip("huggingface_hub", reason="the hub tests need huggingface_hub (in the test extra)")
from huggingface_hub import constants  # noqa: E402

from arpg import ARPG, ARPGPipeline, from_original, generate, hub, load_checkpoint, sample_seeds  # noqa: E402
from arpg.checkpoint import CheckpointError  # noqa: E402
from arpg.cli import main  # noqa: E402
from arpg.vq import VQConfig, VQModel, load_vq  # noqa: E402


COMMIT = "a" * 40
OTHER_COMMIT = "b" * 40


def put(cache, repo_id, filename, obj, commit=COMMIT, main=True):
    """Write `obj` (torch.save) as `filename` of `repo_id` at `commit` in a Hugging Face cache folder."""
    base = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = base / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    torch.save(obj, snapshot / filename)
    if main:
        (base / "refs").mkdir(exist_ok=True)
        (base / "refs" / "main").write_text(commit)
    return snapshot / filename


@pytest.fixture
def cache(tmp_path, monkeypatch, make_model):
    """An offline Hub cache with tiny stand-ins under the published names; the published names map to
    tiny configs. Returns (cache folder, {name: model}, tokenizer)."""
    root = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    models = {}
    for i, (name, entry) in enumerate(sorted(hub.MODELS.items())):
        monkeypatch.setitem(hub.MODELS, name, dataclasses.replace(entry, config="ARPG-tiny"))
        models[name] = make_model(seed=i)
        put(root, entry.repo_id, entry.filename, {"state_dict": models[name].state_dict()})
    monkeypatch.setitem(hub.TOKENIZERS, "VQ-16", dataclasses.replace(hub.TOKENIZERS["VQ-16"], config="VQ-tiny"))
    torch.manual_seed(0)
    vq = VQModel(VQConfig.tiny()).eval()
    put(root, "FoundationVision/LlamaGen", "vq_ds16_c2i.pt", {"model": vq.state_dict()})
    return root, models, vq


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_published_names_load_from_the_cache(cache):
    _, models, vq = cache
    for name in hub.MODELS:
        assert same_weights(load_checkpoint(name), models[name])
    assert same_weights(load_checkpoint("arpg-xl"), models["ARPG-XL"])  # any letter case
    assert same_weights(load_vq("VQ-16"), vq)


def test_a_local_file_of_that_name_wins(cache, tmp_path, monkeypatch, make_model):
    other = make_model(seed=9)
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": other.state_dict()}, tmp_path / "ARPG-L")
    assert same_weights(load_checkpoint("ARPG-L", "ARPG-tiny"), other)


def test_revision_pinning(cache, make_model):
    root, models, _ = cache
    pinned = make_model(seed=7)
    entry = hub.MODELS["ARPG-L"]
    put(root, entry.repo_id, entry.filename, {"state_dict": pinned.state_dict()}, commit=OTHER_COMMIT, main=False)
    assert same_weights(load_checkpoint("ARPG-L", revision=OTHER_COMMIT), pinned)
    assert same_weights(load_checkpoint("ARPG-L"), models["ARPG-L"])
    with pytest.raises(hub.HubError, match=f"revision {'c' * 40}"):
        load_checkpoint("ARPG-L", revision="c" * 40)


def test_a_missing_file_is_one_clear_line(cache):
    root, _, _ = cache
    entry = hub.MODELS["ARPG-XXL"]
    os.remove(root / f"models--{entry.repo_id.replace('/', '--')}" / "snapshots" / COMMIT / entry.filename)
    with pytest.raises(hub.HubError) as info:
        load_checkpoint("ARPG-XXL")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("ARPG-XXL: arpg_1b.pt of hp-l33/ARPG (revision main) is not in the Hugging Face cache")
    assert "offline mode is on (HF_HUB_OFFLINE)" in message and str(root) in message


def test_unknown_names_list_the_published_ones(cache):
    with pytest.raises(FileNotFoundError, match="published: ARPG-L, ARPG-XL, ARPG-XXL"):
        load_checkpoint("ARPG-XXXL")
    with pytest.raises(FileNotFoundError, match="published: VQ-16"):
        load_vq("VQ-8")


def test_a_damaged_file_is_refused(cache):
    root, _, _ = cache
    entry = hub.MODELS["ARPG-L"]
    path = root / f"models--{entry.repo_id.replace('/', '--')}" / "snapshots" / COMMIT / entry.filename
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated, no size or hash recorded: the reader refuses it
    with pytest.raises(CheckpointError, match="cannot be read .*truncated, damaged or not a checkpoint"):
        load_checkpoint("ARPG-L")


def test_recorded_size_and_sha256_are_checked(cache, monkeypatch):
    root, models, _ = cache
    entry = hub.MODELS["ARPG-L"]
    path = root / f"models--{entry.repo_id.replace('/', '--')}" / "snapshots" / COMMIT / entry.filename
    data = path.read_bytes()
    recorded = dataclasses.replace(entry, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(hub.MODELS, "ARPG-L", recorded)
    assert same_weights(load_checkpoint("ARPG-L"), models["ARPG-L"])
    path.write_bytes(data + b"\0")
    with pytest.raises(hub.HubError, match=f"has {len(data) + 1} bytes, the published file {len(data)}"):
        load_checkpoint("ARPG-L")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    path.write_bytes(bytes(flipped))
    with pytest.raises(hub.HubError, match="does not have the published SHA-256"):
        load_checkpoint("ARPG-L")


def test_without_huggingface_hub_the_error_says_so(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(hub.HubError, match=r"needs huggingface_hub \(pip install huggingface_hub\)"):
        load_checkpoint("ARPG-L")


def test_real_environment_variables_in_a_fresh_process(tmp_path, make_model):
    """HF_HOME and HF_HUB_OFFLINE=1 as a user sets them, read by huggingface_hub at import."""
    put(tmp_path / "home" / "hub", "hp-l33/ARPG", "arpg_300m.pt", {"state_dict": make_model(seed=3).state_dict()})
    script = textwrap.dedent("""
        import dataclasses
        from arpg import hub, load_checkpoint
        for name in hub.MODELS:
            hub.MODELS[name] = dataclasses.replace(hub.MODELS[name], config="ARPG-tiny")
        print(sum(p.numel() for p in load_checkpoint("ARPG-L").parameters()))
        try:
            load_checkpoint("ARPG-XL")
        except hub.HubError as e:
            print(e)
    """)
    env = dict(os.environ, HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    count, error = done.stdout.strip().splitlines()
    assert int(count) == sum(p.numel() for p in make_model().parameters())
    assert "arpg_700m.pt of hp-l33/ARPG (revision main) is not in the Hugging Face cache" in error
    assert str(tmp_path / "home" / "hub") in error and "offline mode is on" in error


def test_cli_takes_published_names_and_the_published_tokenizer_by_default(cache, tmp_path, capsys):
    argv = ["sample", "--model", "ARPG-L", "--classes", "1,2,3", "--steps", "3", "--no-progress",
            "--png", str(tmp_path / "grid.png"), "--npz", str(tmp_path / "img.npz")]
    assert main(argv) == 0
    capsys.readouterr()
    import numpy as np

    images = np.load(tmp_path / "img.npz")["arr_0"]
    assert images.shape == (3, 64, 64, 3)  # decoded: VQ-16 came by name
    entry = hub.MODELS["ARPG-XL"]
    os.remove(cache[0] / f"models--{entry.repo_id.replace('/', '--')}" / "snapshots" / COMMIT / entry.filename)
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--model", "ARPG-XL", "--classes", "1", "--png", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not in the Hugging Face cache" in err[0], err


# ------------------------------------------------------------------------------------------------
# ARPGPipeline


def test_pipeline_gives_generate_tokens_whatever_the_batch(cache, tmp_path):
    _, models, _ = cache
    pipe = ARPGPipeline.from_pretrained(model_type="ARPG-L", device="cpu")
    labels = [3, 1, 4, 1, 5]
    kwargs = dict(seed=11, num_steps=4, class_labels=labels, cfg_scale=2.0, top_k=20, progress=False,
                  return_tokens=True)
    out = pipe(**kwargs, batch_size=2, output_dir=str(tmp_path / "out"))
    want = generate(models["ARPG-L"], torch.tensor(labels), 4, schedule="arccos", cfg_scale=2.0, top_k=20,
                    seed=sample_seeds(11, len(labels)))
    assert torch.equal(out.tokens.view(len(labels), -1), want)
    assert torch.equal(pipe(**kwargs, batch_size=8).tokens, out.tokens)
    assert len(out.images) == 5 and out.images[0].size == (64, 64) and out.labels == labels
    assert out.grid.size == (4 * 66 + 2, 2 * 66 + 2)  # 4 per row, make_grid's padding of 2
    assert (tmp_path / "out" / "sampled_image.png").is_file()
    labelled = pipe(**kwargs, write_labels=True)
    assert labelled.grid.size[1] > out.grid.size[1]


def test_pipeline_switches_model_type_and_refuses_bad_arguments(cache):
    _, models, _ = cache
    pipe = ARPGPipeline.from_pretrained(model_type="ARPG-L", device="cpu")
    pipe(model_type="ARPG-XXL", num_steps=2, class_labels=[1], progress=False)
    assert pipe.model_type == "ARPG-XXL" and same_weights(pipe.model, models["ARPG-XXL"])
    with pytest.raises(ValueError, match=r"class_labels \[10\] not in \[0, 10\)"):
        pipe(class_labels=[1, 10], progress=False)
    with pytest.raises(ValueError, match="class_labels is empty"):
        pipe(class_labels=[], progress=False)
    with pytest.raises(ValueError, match="num_steps 17"):
        pipe(num_steps=17, class_labels=[1], progress=False)
    with pytest.raises(TypeError):
        pipe(guidance=3)  # not an argument of the original either
    with pytest.raises(ValueError, match="choose from ARPG-L, ARPG-XL, ARPG-XXL"):
        ARPGPipeline.from_pretrained(model_type="ARPG-M")


def test_diffusers_custom_pipeline(cache, tmp_path):
    """The original's quick start, `DiffusionPipeline.from_pretrained(..., custom_pipeline=...)`, with
    this project's pipeline file: the same grid as `ARPGPipeline`, and the original's own arguments."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is optional: the custom pipeline is tested "
                                                        "where it is installed")
    import json

    import numpy as np

    import arpg.diffusers_pipeline as arpg_diffusers

    repo = tmp_path / "ARPG"  # a local copy of the repository's model_index.json
    repo.mkdir()
    (repo / "model_index.json").write_text(json.dumps({"_class_name": "ARPGModel", "_diffusers_version": "0.32.2"}))
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(repo), custom_pipeline=arpg_diffusers.__file__,
                                                       trust_remote_code=True)
    assert type(pipe).__name__ == "ARPGModel" and isinstance(pipe, diffusers.DiffusionPipeline)
    kwargs = dict(seed=11, num_steps=4, class_labels=[3, 1, 4], cfg_scale=2.0, top_k=20, samples_per_row=2)
    image = pipe(model_type="ARPG-L", device="cpu", progress=False, **kwargs)
    want = ARPGPipeline.from_pretrained(model_type="ARPG-L", device="cpu")(progress=False, **kwargs).grid
    assert np.array_equal(np.asarray(image), np.asarray(want))
    # The original's file arguments: a published file by name, the published tokenizer by its file name.
    again = pipe(model_type="ARPG-L", model_filename="arpg_300m.pt", vae_filename="vq_ds16_c2i.pt",
                 repo_id="FoundationVision/LlamaGen", device="cpu", progress=False, **kwargs)
    assert np.array_equal(np.asarray(again), np.asarray(want))
    with pytest.raises(ValueError, match="model_filename 'nope.pt': give a local file or one of the published"):
        pipe(model_type="ARPG-L", model_filename="nope.pt", device="cpu")
    with pytest.raises(ValueError, match="repo_id 'me/other'"):
        pipe(model_type="ARPG-L", repo_id="me/other", device="cpu")


# ------------------------------------------------------------------------------------------------
# from_original


def stand_in(model: ARPG, prefix: str = "") -> torch.nn.Module:
    """A module with the original's parameter names (ours are the same) and its `config` (ModelArgs)."""
    root = torch.nn.Module()
    for name, p in model.state_dict().items():
        *path, leaf = (prefix + name).split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, torch.nn.Parameter(p.clone()))
    c = model.config
    root.config = types.SimpleNamespace(dim=c.dim, n_layer=c.n_layer, n_head=c.n_head, multiple_of=c.ffn_multiple_of,
                                        ffn_dim_multiplier=None, rope_base=c.rope_base, norm_eps=c.norm_eps,
                                        num_classes=c.num_classes, class_dropout_prob=0.1, vocab_size=c.vocab_size,
                                        block_size=c.seq_len)
    return root


def test_from_original_shares_the_weights_and_gives_the_same_logits(tmp_path, make_model):
    reference = make_model(seed=4)
    original = stand_in(reference)
    ours = from_original(original)
    params = dict(original.named_parameters())
    assert all(p is params[name] for name, p in ours.named_parameters())  # the same tensors, not copies
    torch.save({"state_dict": original.state_dict()}, tmp_path / "orig.pt")
    loaded = load_checkpoint(str(tmp_path / "orig.pt"), "ARPG-tiny")
    tokens = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    labels, orders = torch.tensor([1, 2, 3]), torch.rand(3, 16, generator=torch.Generator().manual_seed(1)).argsort(1)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens, labels, orders)[0], loaded(tokens, labels, orders)[0], rtol=0, atol=0)
    with torch.no_grad():
        params["embeddings.weight"].mul_(2)
    assert torch.equal(ours.embeddings.weight, params["embeddings.weight"])
    tokens_ours = generate(ours, torch.tensor([1, 2]), 3, seed=0)
    assert tokens_ours.shape == (2, 16)


def test_from_original_looks_through_wrappers_and_refuses_misfits(make_model):
    model = make_model(seed=5)
    wrapped = stand_in(model, prefix="module._orig_mod.")
    wrapped.config = stand_in(model).config
    assert same_weights(from_original(wrapped), model)
    bare = stand_in(model)
    del bare.config
    with pytest.raises(CheckpointError, match="no original-style `config`"):
        from_original(bare)
    assert same_weights(from_original(bare, config="ARPG-tiny"), model)
    wrong = stand_in(model)
    wrong.config.dim = 32  # the weights are of dim 64
    with pytest.raises(CheckpointError, match="wrong shape"):
        from_original(wrong)
    odd = stand_in(model)
    odd.config.ffn_dim_multiplier = 1.3
    with pytest.raises(CheckpointError, match="ffn_dim_multiplier"):
        from_original(odd)
