"""A real, trained, small ARPG: scikit-learn's 8x8 handwritten digits, trained and judged on the CPU.

scikit-learn ships 1,797 handwritten digits of 8 x 8 pixels whose values are already integers 0..16,
labelled 0..9 (`sklearn.datasets.load_digits`, no download). That is a ready-made tokenization: 64
tokens per image, a vocabulary of 17 image tokens and 10 classes, so the embedding table of DESIGN.md
section 1 holds `17 + 10 + 3` rows (17 pixel values, [MASK] = 17, class c = 18 + c, the no-class id 28
and one unused row).

- `load_split()`: the fixed stratified 80/20 split (`train_test_split(random_state=0)`): 1,437 train
  and 360 test digits.
- `train()` / `train_main()` (`arpg train-digits`, `python -m arpg.digits train`): trains `digits_config()`
  with `arpg.train`, the trainer of the ImageNet models (the same random-order teacher-forced step: a
  permutation per sample, class dropout 0.1), on the recipe `digits_recipe()`, and writes the weights
  with their config (`save_checkpoint`).
- `Judge`: the independent judge, multinomial logistic regression fitted on the real training split's
  64 pixel values only (never on generated data). Its predictions give class-conditional accuracy;
  its 10 logits are the features of a Frechet distance (FD, the FID recipe on the judge's features).
- `evaluate()` / `eval_main()` (`arpg eval-digits`, `python -m arpg.digits eval`): accuracy of the
  judge per decoding steps x CFG scale, FD against held-out real digits with the real train-vs-test FD
  as the floor, zero-shot inpainting / outpainting (`arpg.edit`) against a trivial fill, and a
  resolution-expansion picture; prints the table and writes it, with PNG grids, to a new folder
  `arpg-results/eval-digits-<UTC time>/` (ignored by git; the committed record in
  `benchmarks/results/digits/` is rewritten only with `--out-dir benchmarks/results/digits`).

`SHIPPED_CHECKPOINT` is the checkpoint `train_main` made with its defaults, stored in float16 (it
loads to float32 with `load_digits_model()`); `arpg sample --ckpt digits --png grid.png` samples it
(`is_digits_config` tells the command that the tokens are pixel values, drawn by `to_rgb`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .config import ARPGConfig
from .engine import sample_seeds
from .data_codes import TensorCodes
from .model import ARPG

__all__ = [
    "GRID",
    "VOCAB",
    "NUM_CLASSES",
    "SHIPPED_CHECKPOINT",
    "RECOMMENDED_CFG",
    "DigitsSplit",
    "load_split",
    "digits_config",
    "digits_recipe",
    "train",
    "load_digits_model",
    "is_digits_config",
    "Judge",
    "frechet_distance",
    "generate_digits",
    "sample_seeds",
    "to_rgb",
    "save_grid",
    "default_out_dir",
    "evaluate",
    "train_main",
    "eval_main",
    "main",
]

GRID = 8
VOCAB = 17  # pixel values 0..16
NUM_CLASSES = 10
SHIPPED_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "digits_arpg.safetensors")
# The CFG scale of the edits, the pictures and the tests: with the shipped checkpoint at 16 steps it gives
# 0.927 class accuracy, near CFG 8's 0.945, at a lower FD (benchmarks/results/digits/results.md).
RECOMMENDED_CFG = 5.0


# ----------------------------------------------------------------------------------------------------
# Data


@dataclass
class DigitsSplit:
    """Token grids (int64 [N, 64], raster order, values 0..16) and labels (int64 [N])."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_split(test_size: float = 0.2, random_state: int = 0) -> DigitsSplit:
    """The fixed split: stratified `train_test_split(test_size=0.2, random_state=0)` of load_digits()."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.rint(d.data).astype(np.int64)
    y = d.target.astype(np.int64)
    if x.shape[1] != GRID * GRID or x.min() < 0 or x.max() >= VOCAB:
        raise RuntimeError("unexpected load_digits() data: expected 64 integer pixels in 0..16")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=random_state, stratify=y)
    t = torch.from_numpy
    return DigitsSplit(t(x_tr), t(y_tr), t(x_te), t(y_te))


def digits_config(dim: int = 96, n_layer: int = 6, n_head: int = 3, ffn_multiple_of: int = 32,
                  rope_base: float = 10000.0) -> ARPGConfig:
    """An ARPG config for 8x8 digits: 17 pixel values as image tokens, 10 classes (head_dim = dim / n_head)."""
    return ARPGConfig(
        rope_base=rope_base,
        dim=dim,
        n_layer=n_layer,
        n_head=n_head,
        vocab_size=VOCAB,
        num_classes=NUM_CLASSES,
        grid_size=GRID,
        ffn_multiple_of=ffn_multiple_of,
        class_dropout=0.1,
    )


# ----------------------------------------------------------------------------------------------------
# Training (the loop is `arpg.train`'s)


def digits_recipe(steps: int = 2000, batch_size: int = 32, lr: float = 5e-3, warmup: int = 50,
                  weight_decay: float = 0.05, dim: int = 96, n_layer: int = 6, n_head: int = 3, ema: float = 0.998,
                  init_std: float = 0.1, rope_base: float = 10000.0, optimizer: str = "muon", muon_lr: float = 0.03,
                  input_noise: float = 0.25, seed: int = 0, log_every: int = 250):
    """The `arpg.train.TrainConfig` of the shipped checkpoint (with these defaults): Muon on the hidden
    matrices + AdamW on the rest, lr not scaled by batch, warmup then cosine to lr/10, no dropouts but
    class dropout 0.1, a quarter of the context tokens replaced by random pixel values."""
    from .train import TrainConfig

    return TrainConfig(
        model=digits_config(dim=dim, n_layer=n_layer, n_head=n_head, rope_base=rope_base), steps=steps,
        global_batch=batch_size, lr=lr, lr_ref_batch=None, warmup=warmup, weight_decay=weight_decay, ema=ema,
        init_std=init_std, optimizer=optimizer, muon_lr=muon_lr, input_noise=input_noise, seed=seed,
        log_every=log_every)


def train(
    out: Optional[str] = None,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 5e-3,
    warmup: int = 50,
    weight_decay: float = 0.05,
    dim: int = 96,
    n_layer: int = 6,
    n_head: int = 3,
    ema: float = 0.998,
    init_std: float = 0.1,
    rope_base: float = 10000.0,
    optimizer: str = "muon",
    muon_lr: float = 0.03,
    input_noise: float = 0.25,
    seed: int = 0,
    procs: int = 1,
    threads: Optional[int] = 0,
    log_every: int = 250,
    storage_dtype: torch.dtype = torch.float16,
    log=print,
) -> tuple[ARPG, dict]:
    """Train an ARPG on the digits' training split with `arpg.train` (`digits_recipe`); returns (model
    in eval mode, info).

    The defaults are the recipe of the shipped checkpoint. One process uses `threads` torch threads (0 or
    None: leave torch's setting, by default every core, as the command line does; on the project's 2-core
    AMD EPYC two threads train 1.56x faster than one, 125 vs 195 ms a step). `procs` > 1 runs that many
    single-threaded processes under torchrun (data parallel over gloo); the result is the same as one
    process's up to the order of float reductions. The weights are written to `out` (if given) with their
    config, stored in `storage_dtype`, and the training facts next to them (`.json`). Inside a torchrun
    world (WORLD_SIZE set) this process is one rank of it, and rank 0 writes.
    """
    import resource
    import tempfile

    from . import train as T

    recipe = digits_recipe(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, weight_decay=weight_decay,
                           dim=dim, n_layer=n_layer, n_head=n_head, ema=ema, init_std=init_std, rope_base=rope_base,
                           optimizer=optimizer, muon_lr=muon_lr, input_noise=input_noise, seed=seed,
                           log_every=log_every)
    recipe.validate()
    if procs < 1 or batch_size % procs:
        raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of procs ({procs})")
    t0, c0 = time.perf_counter(), time.process_time()
    ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    in_world = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if procs > 1 and not in_world:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "digits.pt")
            argv = ["train-digits", "--out", path, "--fp32", "--procs", str(procs)]
            for k, v in dict(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, weight_decay=weight_decay,
                             dim=dim, n_layer=n_layer, n_head=n_head, ema=ema, init_std=init_std,
                             rope_base=rope_base, optimizer=optimizer, muon_lr=muon_lr, input_noise=input_noise,
                             seed=seed, log_every=log_every).items():
                argv += ["--" + k.replace("_", "-"), str(v)]
            code = T.launch(argv, procs)
            if code != 0:
                raise RuntimeError(f"the {procs} training processes failed (exit code {code})")
            model = load_checkpoint(path, dtype=torch.float32)
            with open(os.path.join(tmp, "digits.json")) as f:
                running = json.load(f)["final_train_loss_avg"]
    else:
        if threads and not in_world:
            torch.set_num_threads(int(threads))
        data = load_split()
        model, result = T.train(recipe, TensorCodes(data.x_train, data.y_train, source="digits"), log=log)
        running = result["running_loss"]
        if in_world and int(os.environ.get("RANK", "0")) != 0:
            return model, {}
    wall = time.perf_counter() - t0
    ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - c0 + (ch1.ru_utime - ch0.ru_utime) + (ch1.ru_stime - ch0.ru_stime)
    data = load_split()
    # Held-out loss (fixed orders, no class dropout in eval mode): a check that the model generalizes.
    with torch.no_grad():
        g = torch.Generator().manual_seed(1234)
        _, test_loss = model(data.x_test, data.y_test, generator=g)
    hp = {k: v for k, v in recipe.to_dict().items() if k in (
        "steps", "lr", "warmup", "weight_decay", "ema", "init_std", "optimizer", "muon_lr", "input_noise", "seed")}
    info = {
        **hp,
        "batch_size": batch_size,
        "procs": int(os.environ.get("WORLD_SIZE", procs)),
        "threads_per_proc": 1 if procs > 1 or in_world else torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
        "config": recipe.model.to_dict(),
        "train_wall_s": round(wall, 1),
        "train_cpu_s": round(cpu, 1),
        "final_train_loss_avg": round(running, 4),
        "test_loss": round(float(test_loss), 4),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
    }
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
        stored = ARPG(recipe.model)
        stored.load_state_dict(model.state_dict())
        save_checkpoint(stored.to(storage_dtype), out)
        with open(os.path.splitext(out)[0] + ".json", "w") as f:
            json.dump(info, f, indent=2)
    return model, info


def load_digits_model(path: Optional[str] = None) -> ARPG:
    """The digits ARPG from `path` (default: the shipped checkpoint), in float32 and eval mode."""
    return load_checkpoint(path or SHIPPED_CHECKPOINT, dtype=torch.float32)


def is_digits_config(config: ARPGConfig) -> bool:
    """Whether a model's tokens are these digits' pixels: 17 values, 10 classes, an 8x8 grid."""
    return (config.vocab_size, config.num_classes, config.grid_size) == (VOCAB, NUM_CLASSES, GRID)


# ----------------------------------------------------------------------------------------------------
# The judge and the Frechet distance


def _pixels(tokens) -> np.ndarray:
    """Token grids [N, ...] (values 0..16) -> float64 [N, H*W] in [0, 1]."""
    t = torch.as_tensor(tokens).detach().cpu()
    return t.reshape(t.shape[0], -1).numpy().astype(np.float64) / 16.0


class Judge:
    """The independent judge: multinomial logistic regression on the 64 pixel values (/16) of the real
    training split only (never generated data). `predict` gives its class, `features` its 10 logits
    (`decision_function`), on which `evaluate` computes the Frechet distance."""

    def __init__(self, split: Optional[DigitsSplit] = None, C: float = 1.0, max_iter: int = 5000):
        from sklearn.linear_model import LogisticRegression

        split = split or load_split()
        self.clf = LogisticRegression(C=C, max_iter=max_iter)
        self.clf.fit(_pixels(split.x_train), split.y_train.numpy())

    def predict(self, tokens) -> np.ndarray:
        return self.clf.predict(_pixels(tokens))

    def features(self, tokens) -> np.ndarray:
        return self.clf.decision_function(_pixels(tokens))

    def accuracy(self, tokens, labels) -> float:
        labels = torch.as_tensor(labels).cpu().numpy()
        return float((self.predict(tokens) == labels).mean())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [N, F] and b [M, F] (the FID formula):
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), computed with symmetric eigensolves."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, u = np.linalg.eigh(s_a)
    root_a = (u * np.sqrt(np.clip(w, 0, None))) @ u.T
    cross = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    tr_cross = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_cross)


# ----------------------------------------------------------------------------------------------------
# Generation and edits


def generate_digits(
    model: ARPG,
    labels,
    num_steps: int,
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    chunk: int = 500,
) -> torch.Tensor:
    """Class-conditional digits [N, 64] from the paged engine (`arpg.generate`), `chunk` at a time.

    Sample i has its own random order and draws, from seed `sample_seeds(seed, N)[i]`: a sample does not
    depend on the chunking or the rest of the batch, and an accuracy over N samples averages N orders
    (with one order per batch, as the original samples, it would hinge on a handful of orders)."""
    from .engine import generate

    labels = torch.as_tensor(labels).long().reshape(-1)
    seeds = sample_seeds(seed, labels.numel())
    outs = []
    for i in range(0, labels.numel(), chunk):
        outs.append(
            generate(model, labels[i : i + chunk], num_steps=num_steps, cfg_scale=cfg_scale, cfg_schedule=cfg_schedule,
                     temperature=temperature, top_k=top_k, top_p=top_p, seed=seeds[i : i + chunk])
        )
    return torch.cat(outs).cpu()


MASKS = ("center4x4", "right_half")


def known_mask(region: str) -> torch.Tensor:
    """bool [64]: True where a pixel is kept. `center4x4` hides rows/cols 2..5, `right_half` cols 4..7."""
    m = torch.ones(GRID, GRID, dtype=torch.bool)
    if region == "center4x4":
        m[2:6, 2:6] = False
    elif region == "right_half":
        m[:, GRID // 2 :] = False
    else:
        raise ValueError(f"region must be one of {MASKS}, got {region!r}")
    return m.reshape(-1)


def mean_fill(tokens: torch.Tensor, known: torch.Tensor, x_train: torch.Tensor) -> torch.Tensor:
    """The trivial fill: unknown pixels take the training split's (rounded) mean value at that position."""
    mean = x_train.double().mean(0).round().long()
    return torch.where(known, tokens, mean.expand_as(tokens))


def inpaint_digits(model: ARPG, tokens, known, labels, num_steps: int = 8, cfg_scale: float = 1.0,
                   temperature: float = 1.0, seed: int = 0, chunk: int = 500) -> torch.Tensor:
    """Zero-shot inpainting (`arpg.edit.inpaint`) of digits [N, 64]; known bool [64] or [N, 64]."""
    from .edit import inpaint

    tokens = torch.as_tensor(tokens).long()
    labels = torch.as_tensor(labels).long().reshape(-1).expand(tokens.shape[0])
    known = known.expand(tokens.shape)
    seeds = sample_seeds(seed, tokens.shape[0])
    outs = []
    for i in range(0, tokens.shape[0], chunk):
        sl = slice(i, i + chunk)
        outs.append(inpaint(model, tokens[sl], known[sl], labels[sl], num_steps=num_steps, cfg_scale=cfg_scale,
                            temperature=temperature, seed=seeds[sl]))
    return torch.cat(outs).cpu()


def outpaint_digits(model: ARPG, tiles, canvas, offset, labels, num_steps: int = 8, cfg_scale: float = 1.0,
                    temperature: float = 1.0, seed: int = 0, chunk: int = 500) -> torch.Tensor:
    """Zero-shot outpainting (`arpg.edit.outpaint`): tiles [N, h, w] placed at `offset` of a `canvas`."""
    from .edit import outpaint

    tiles = torch.as_tensor(tiles).long()
    labels = torch.as_tensor(labels).long().reshape(-1).expand(tiles.shape[0])
    seeds = sample_seeds(seed, tiles.shape[0])
    outs = []
    for i in range(0, tiles.shape[0], chunk):
        sl = slice(i, i + chunk)
        outs.append(outpaint(model, tiles[sl], canvas=canvas, offset=offset, labels=labels[sl], num_steps=num_steps,
                             cfg_scale=cfg_scale, temperature=temperature, seed=seeds[sl]))
    return torch.cat(outs).cpu()


# ----------------------------------------------------------------------------------------------------
# Pictures


def to_rgb(tokens: torch.Tensor, known: Optional[torch.Tensor] = None) -> np.ndarray:
    """Pixel values 0..16 [..., H, W] -> uint8 RGB [..., H, W, 3], grey level round(255 * (1 - v / 16)):
    ink dark on white. With known (bool, one [H, W] grid only), cells with known False (hidden input)
    are drawn in light blue."""
    v = torch.as_tensor(tokens).cpu().double().numpy()
    g = (255.0 * (1.0 - v / 16.0)).round().astype(np.uint8)
    img = np.repeat(g[..., None], 3, axis=-1)
    if known is not None:
        hide = ~torch.as_tensor(known).cpu().numpy().reshape(v.shape)
        img[hide] = (170, 200, 255)
    return img


def save_grid(cells: Sequence[Sequence[np.ndarray]], path: str, scale: int = 6, pad: int = 2,
              row_labels: Optional[Sequence[str]] = None) -> str:
    """Write a grid of RGB tiles (each [H, W, 3], sizes may differ per column but not per row) as PNG."""
    from PIL import Image, ImageDraw

    rows = len(cells)
    cols = max(len(r) for r in cells)
    heights = [max(c.shape[0] for c in r) * scale for r in cells]
    widths = [max(r[j].shape[1] for r in cells if j < len(r)) * scale for j in range(cols)]
    left = 8 * max((len(s) for s in row_labels), default=0) + 4 if row_labels else 0
    canvas = Image.new("RGB", (left + sum(widths) + pad * (cols + 1), sum(heights) + pad * (rows + 1)), (128, 128, 128))
    draw = ImageDraw.Draw(canvas)
    y = pad
    for i, r in enumerate(cells):
        x = left + pad
        for j, c in enumerate(r):
            tile = Image.fromarray(c).resize((c.shape[1] * scale, c.shape[0] * scale), Image.NEAREST)
            canvas.paste(tile, (x, y))
            x += widths[j] + pad
        if row_labels:
            draw.text((2, y + heights[i] // 2 - 5), row_labels[i], fill=(255, 255, 255))
        y += heights[i] + pad
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    canvas.save(path)
    return path


# ----------------------------------------------------------------------------------------------------
# Evaluation


def _fmt_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def f(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(f(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([f"{v:.4f}" if isinstance(v, float) else v for v in r])


def _cpu_kernels() -> str:
    """Which paged-attention implementation serves CPU tensors here (named in the record)."""
    import arpg_kernels as ak

    x = torch.zeros(1, 1, 8)
    name = ak.ops.resolve_backend("paged_attention", x, torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, dtype=torch.int32))
    return "cpu C++ kernels" if name.__name__.endswith(".cpu") else "reference ops"


def evaluate(
    model: Optional[ARPG] = None,
    ckpt: Optional[str] = None,
    out_dir: Optional[str] = None,
    steps: Sequence[int] = (64, 32, 16, 8, 4),
    cfg_scales: Sequence[float] = (1.0, 3.0, 5.0, 8.0),
    n_per_class: int = 100,
    temperature: float = 1.0,
    edit_steps: int = 8,
    edit_cfg: float = RECOMMENDED_CFG,
    n_edit: Optional[int] = None,
    seed: int = 0,
    threads: Optional[int] = 1,
    log=print,
    progress: bool = False,
) -> dict:
    """Measure the digits ARPG against the judge; returns every number, and (with `out_dir`; the command
    line's default is `default_out_dir()`) writes `results.md`, `generation.csv`, `edits.csv`,
    `results.json` and PNG grids there.

    Generation: `n_per_class` digits per class for every (steps, CFG scale); the judge's accuracy
    against the requested class; FD on the judge's features (and on raw pixels) against the held-out
    test digits, with the real train-vs-test FD as the floor. Edits (zero-shot, `arpg.edit`) on every
    test digit: inpainting of the centre 4x4 and of the right half, outpainting of the left half into
    the 8x8 canvas, each with the true label (CFG `edit_cfg`) and with no class, against the trivial
    mean-pixel fill; plus an 8x16 resolution-expansion picture. `n_edit` limits the edits to the first
    test digits (default: all 360). progress: a tqdm bar over every image generated or edited, with
    images/s (on a terminal only).
    """
    if threads:
        torch.set_num_threads(int(threads))
    source = None  # the file the model came from (None: a model passed in)
    if model is None:
        source = ckpt or SHIPPED_CHECKPOINT
        model = load_digits_model(ckpt)
    model = model.float().eval()
    data = load_split()
    judge = Judge(data)
    t_start = time.perf_counter()
    res: dict = {"settings": {"steps": list(steps), "cfg_scales": list(cfg_scales), "n_per_class": n_per_class,
                              "temperature": temperature, "edit_steps": edit_steps, "edit_cfg": edit_cfg,
                              "n_edit": int(data.x_test[:n_edit].shape[0]) if n_edit else None,
                              "seed": seed, "threads": torch.get_num_threads(), "schedule": "arccos",
                              "checkpoint": source,
                              "judge": "LogisticRegression(C=1) on pixels/16, train split",
                              "kernels": _cpu_kernels(),
                              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"}}
    test_feat, test_pix = judge.features(data.x_test), _pixels(data.x_test)
    floor = {
        "judge_acc_test": judge.accuracy(data.x_test, data.y_test),
        "judge_acc_train": judge.accuracy(data.x_train, data.y_train),
        "fd_judge_train_vs_test": frechet_distance(judge.features(data.x_train), test_feat),
        "fd_pixels_train_vs_test": frechet_distance(_pixels(data.x_train), test_pix),
    }
    res["real"] = floor
    log(f"real digits: judge accuracy test {floor['judge_acc_test']:.3f} / train {floor['judge_acc_train']:.3f}; "
        f"FD train-vs-test: judge features {floor['fd_judge_train_vs_test']:.3f}, pixels {floor['fd_pixels_train_vs_test']:.3f}")

    labels = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    n_edits = int(data.x_test[:n_edit].shape[0]) * 2 * (len(MASKS) + 1)
    from tqdm import tqdm

    bar = tqdm(total=len(steps) * len(cfg_scales) * labels.numel() + n_edits, unit="img", desc="eval-digits",
               disable=None if progress else True)
    if progress:
        log = bar.write  # lines above the bar, not through it
    gen_rows, samples = [], {}
    for s in steps:
        for g in cfg_scales:
            t0 = time.perf_counter()
            toks = generate_digits(model, labels, s, cfg_scale=g, temperature=temperature, seed=seed)
            dt = time.perf_counter() - t0
            bar.update(labels.numel())
            samples[(s, g)] = toks
            feat = judge.features(toks)
            row = {
                "steps": s,
                "cfg": g,
                "accuracy": float((judge.clf.classes_[feat.argmax(1)] == labels.numpy()).mean()),
                "fd_judge": frechet_distance(feat, test_feat),
                "fd_pixels": frechet_distance(_pixels(toks), test_pix),
                "ms_per_image": 1000 * dt / labels.numel(),
            }
            gen_rows.append(row)
            log(f"steps {s:2d} cfg {g:.1f}: accuracy {row['accuracy']:.3f}  FD(judge) {row['fd_judge']:.3f}  "
                f"FD(pixels) {row['fd_pixels']:.3f}  {row['ms_per_image']:.1f} ms/image")
    res["generation"] = gen_rows

    # Zero-shot edits on every test digit.
    edit_rows, edit_pics = [], {}
    try:
        import importlib

        importlib.import_module(".edit", __package__)
        have_edit = True
    except ImportError as e:  # pragma: no cover - arpg.edit is part of the package
        log(f"edits skipped: {e}")
        have_edit = False
    if have_edit:
        x, y = data.x_test[:n_edit], data.y_test[:n_edit]
        tasks = [("inpaint", m) for m in MASKS] + [("outpaint", "left_half->8x8")]
        for task, region in tasks:
            known = known_mask("right_half" if task == "outpaint" else region)
            trivial = mean_fill(x, known, data.x_train)
            row = {"task": task, "region": region, "hidden_pixels": int((~known).sum()),
                   "trivial_fill_acc": judge.accuracy(trivial, y), "known_only_acc": None}
            for cond, lab, g in (("class", y, edit_cfg), ("no class", torch.full_like(y, -1), 1.0)):
                t0 = time.perf_counter()
                if task == "inpaint":
                    out = inpaint_digits(model, x, known, lab, num_steps=edit_steps, cfg_scale=g,
                                         temperature=temperature, seed=seed)
                else:
                    tiles = x.view(-1, GRID, GRID)[:, :, : GRID // 2]
                    out = outpaint_digits(model, tiles, (GRID, GRID), (0, 0), lab, num_steps=edit_steps, cfg_scale=g,
                                          temperature=temperature, seed=seed).reshape(-1, GRID * GRID)
                dt = time.perf_counter() - t0
                bar.update(x.shape[0])
                untouched = bool((out[:, known] == x[:, known]).all())
                key = "cond" if cond == "class" else "uncond"
                row[f"model_acc_{key}"] = judge.accuracy(out, y)
                row[f"cfg_{key}"] = g
                row[f"known_untouched_{key}"] = untouched
                row[f"ms_per_image_{key}"] = 1000 * dt / x.shape[0]
                edit_pics[(task, region, key)] = out
            del row["known_only_acc"]
            edit_rows.append(row)
            log(f"{task} {region}: judge accuracy, model fill with class (cfg {edit_cfg}) {row['model_acc_cond']:.3f}, "
                f"with no class {row['model_acc_uncond']:.3f}, trivial mean fill {row['trivial_fill_acc']:.3f}; "
                f"known pixels untouched: {row['known_untouched_cond'] and row['known_untouched_uncond']}")
    bar.close()
    res["edits"] = edit_rows
    res["eval_wall_s"] = round(time.perf_counter() - t_start, 1)

    if out_dir:
        _write_outputs(res, out_dir, model, data, samples, edit_pics, have_edit, temperature, seed, edit_steps)
    return res


def _write_outputs(res, out_dir, model, data, samples, edit_pics, have_edit, temperature, seed, edit_steps):
    os.makedirs(out_dir, exist_ok=True)
    floor = res["real"]
    g_header = ["steps", "cfg", "accuracy", "fd_judge", "fd_pixels", "ms_per_image"]
    g_rows = [[r[k] for k in g_header] for r in res["generation"]]
    _write_csv(os.path.join(out_dir, "generation.csv"), g_header, g_rows)
    e_header = ["task", "region", "hidden_pixels", "model_acc_cond", "cfg_cond", "model_acc_uncond",
                "trivial_fill_acc", "known_untouched_cond", "known_untouched_uncond"]
    e_rows = [[r[k] for k in e_header] for r in res["edits"]]
    if e_rows:
        _write_csv(os.path.join(out_dir, "edits.csv"), e_header, e_rows)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=2)

    # Accuracy and FD as steps x CFG matrices.
    steps_l = sorted({r["steps"] for r in res["generation"]}, reverse=True)
    cfg_l = sorted({r["cfg"] for r in res["generation"]})
    by = {(r["steps"], r["cfg"]): r for r in res["generation"]}

    def matrix(key):
        return _fmt_table(["steps"] + [f"CFG {g:g}" for g in cfg_l], [[s] + [by[(s, g)][key] for g in cfg_l] for s in steps_l])

    st = res["settings"]
    ckpt = st.get("checkpoint")
    if ckpt is None:
        made_by = "a model passed to `evaluate()`"
    elif os.path.abspath(ckpt) == os.path.abspath(SHIPPED_CHECKPOINT):
        made_by = "the shipped checkpoint `arpg/data/digits_arpg.safetensors` (made by `python -m arpg.digits train`)"
    else:
        made_by = f"the checkpoint `{ckpt}`"
    info_path = os.path.splitext(ckpt)[0] + ".json" if ckpt else ""  # train() writes the training facts there
    train_info = ""
    if info_path and os.path.exists(info_path):
        with open(info_path) as f:
            ti = json.load(f)
        c = ti["config"]
        train_info = (f"Model: dim {c['dim']}, {c['n_layer']} layers ({c['n_layer'] // 2} self + {c['n_layer'] // 2} cross), "
                      f"{c['n_head']} heads (head_dim {c['dim'] // c['n_head']}), {ti['params']:,} parameters; trained "
                      f"{ti['steps']} steps of batch {ti['batch_size']} in {ti['train_wall_s']} s wall "
                      f"({ti['train_cpu_s']} s CPU in all, {ti['procs']} single-threaded data-parallel process(es)) on "
                      f"{ti['machine']}; held-out loss "
                      f"{ti['test_loss']} nats/token.\n\n")
    md = [
        "# ARPG on scikit-learn's 8x8 digits",
        "",
        f"Produced by `python -m arpg.digits eval` (`arpg eval-digits`) with {made_by}.",
        "",
        train_info
        + f"Judge: {st['judge']}; it never sees generated data. Generation: arccos schedule, temperature "
        f"{st['temperature']}, constant CFG, {st['n_per_class']} digits per class, seed {st['seed']}, "
        f"{st['threads']} thread(s) on {st['machine']}.",
        "",
        "## Real digits (ceiling and floor)",
        "",
        _fmt_table(["measure", "value"], [
            ["judge accuracy, real test digits (ceiling)", floor["judge_acc_test"]],
            ["judge accuracy, real train digits", floor["judge_acc_train"]],
            ["FD on judge features, real train vs test (floor)", floor["fd_judge_train_vs_test"]],
            ["FD on pixels, real train vs test (floor)", floor["fd_pixels_train_vs_test"]],
        ]),
        "",
        "## Class-conditional accuracy (judge's label == requested class)",
        "",
        matrix("accuracy"),
        "",
        "## FD to the held-out test digits, judge features (floor: "
        f"{floor['fd_judge_train_vs_test']:.3f})",
        "",
        matrix("fd_judge"),
        "",
        f"## FD to the held-out test digits, raw pixels (floor: {floor['fd_pixels_train_vs_test']:.3f})",
        "",
        matrix("fd_pixels"),
        "",
        f"## Generation time, ms per image (batches of 500, CPU, {res['settings'].get('kernels', 'reference ops')})",
        "",
        matrix("ms_per_image"),
        "",
    ]
    if e_rows:
        md += [
            f"## Zero-shot edits of {data.x_test[:res['settings']['n_edit']].shape[0]} test digits ({edit_steps} steps, judge accuracy vs the true label)",
            "",
            _fmt_table(["task", "hidden region", "hidden pixels", "model fill, true class (CFG)", "model fill, no class",
                        "trivial mean fill", "known pixels untouched"],
                       [[r["task"], r["region"], r["hidden_pixels"], f"{r['model_acc_cond']:.3f} ({r['cfg_cond']:g})",
                         r["model_acc_uncond"], r["trivial_fill_acc"],
                         r["known_untouched_cond"] and r["known_untouched_uncond"]] for r in res["edits"]]),
            "",
            "\"no class\" is the honest completion test: the model sees only the known pixels. The trivial fill puts "
            "the training split's mean pixel value of each position into the hidden cells.",
            "",
        ]
    # Pictures.
    pics = []
    for (s, g), toks in samples.items():
        if s in (max(steps_l), 16, min(steps_l)) and g in (min(cfg_l), max(cfg_l)) or (s, g) == (16, RECOMMENDED_CFG):
            n = toks.shape[0] // NUM_CLASSES
            cells = [[to_rgb(toks[c * n + j].view(GRID, GRID)) for j in range(min(n, 12))] for c in range(NUM_CLASSES)]
            name = f"samples_steps{s}_cfg{g:g}.png"
            save_grid(cells, os.path.join(out_dir, name), row_labels=[str(c) for c in range(NUM_CLASSES)])
            pics.append(name)
    if have_edit and edit_pics:
        x = data.x_test
        idx = torch.arange(min(12, next(iter(edit_pics.values())).shape[0]))
        for task, region in sorted({(t, r) for t, r, _ in edit_pics}):
            known = known_mask("right_half" if task == "outpaint" else region)
            trivial = mean_fill(x, known, data.x_train)
            rows = [
                [to_rgb(x[i].view(GRID, GRID)) for i in idx],
                [to_rgb(x[i].view(GRID, GRID), known) for i in idx],
                [to_rgb(edit_pics[(task, region, "cond")][i].view(GRID, GRID)) for i in idx],
                [to_rgb(edit_pics[(task, region, "uncond")][i].view(GRID, GRID)) for i in idx],
                [to_rgb(trivial[i].view(GRID, GRID)) for i in idx],
            ]
            name = f"{task}_{region.split('->')[0]}.png"
            save_grid(rows, os.path.join(out_dir, name), row_labels=["real", "input", "class", "no cls", "mean"])
            pics.append(name)
        from .edit import expand, outpaint

        lab = torch.arange(NUM_CLASSES).repeat_interleave(3)
        wide = expand(model, lab, grid=(GRID, 2 * GRID), num_steps=16, cfg_scale=RECOMMENDED_CFG, temperature=temperature,
                      seed=sample_seeds(seed, lab.numel()))
        cells = [[to_rgb(wide[c * 3 + j]) for j in range(3)] for c in range(NUM_CLASSES)]
        save_grid(cells, os.path.join(out_dir, "expand_8x16.png"), row_labels=[str(c) for c in range(NUM_CLASSES)])
        pics.append("expand_8x16.png")
        # A real test digit continued to the right on an 8x16 canvas.
        tiles = x[:10].view(-1, GRID, GRID)
        ext = outpaint(model, tiles, canvas=(GRID, 2 * GRID), offset=(0, 0), labels=data.y_test[:10], num_steps=16,
                       cfg_scale=RECOMMENDED_CFG, temperature=temperature, seed=sample_seeds(seed, 10))
        cells = [[to_rgb(tiles[i]), to_rgb(ext[i])] for i in range(10)]
        save_grid(cells, os.path.join(out_dir, "outpaint_8x16.png"),
                  row_labels=[str(int(v)) for v in data.y_test[:10]])
        pics.append("outpaint_8x16.png")
        md += [
            f"Resolution expansion: `expand_8x16.png` (class-conditional 8x16 grids, 16 steps, CFG {RECOMMENDED_CFG:g}, the 2D RoPE "
            "of the 8x16 grid; the model was trained on 8x8 only) and `outpaint_8x16.png` (a real test digit "
            "continued onto an 8x16 canvas).",
            "",
        ]
    md += ["Pictures: " + ", ".join(f"`{p}`" for p in sorted(pics)) + ".", ""]
    md += [f"Evaluation wall time: {res['eval_wall_s']} s.", ""]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(md))
    res["pictures"] = sorted(pics)


# ----------------------------------------------------------------------------------------------------
# Command line


def _train_parser(prog: str = "arpg train-digits") -> argparse.ArgumentParser:
    import inspect

    d = {k: v.default for k, v in inspect.signature(train).parameters.items()}  # one source of defaults
    p = argparse.ArgumentParser(prog=prog, description="Train a small ARPG on scikit-learn's 8x8 digits (CPU). "
                                "The defaults reproduce the shipped checkpoint.")
    p.add_argument("--out", default="digits_arpg.safetensors",
                   help="checkpoint to write (.safetensors or .pt); the shipped one is " + SHIPPED_CHECKPOINT)
    for name in ("steps", "batch_size", "warmup", "dim", "n_layer", "n_head", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=d[name])
    for name in ("lr", "weight_decay", "rope_base"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=d[name])
    p.add_argument("--ema", type=float, default=d["ema"], help="EMA decay of the saved weights (0: off)")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default=d["optimizer"])
    p.add_argument("--muon-lr", type=float, default=d["muon_lr"], help="lr of the hidden matrices with muon")
    p.add_argument("--init-std", type=float, default=d["init_std"], help="std of the normal init of linears/embeddings")
    p.add_argument("--input-noise", type=float, default=d["input_noise"],
                   help="fraction of context tokens replaced by random values while training")
    p.add_argument("--procs", type=int, default=d["procs"],
                   help="data-parallel processes, one thread each, launched under torchrun")
    p.add_argument("--threads", type=int, default=d["threads"],
                   help="torch threads when --procs 1 (0: torch's default, every core)")
    p.add_argument("--log-every", type=int, default=d["log_every"])
    p.add_argument("--fp32", action="store_true", help="store float32 weights (default float16)")
    return p


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    a = _train_parser().parse_args(argv)
    _, info = train(out=a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup,
                    weight_decay=a.weight_decay, dim=a.dim, n_layer=a.n_layer, n_head=a.n_head, ema=a.ema,
                    init_std=a.init_std, rope_base=a.rope_base, optimizer=a.optimizer, muon_lr=a.muon_lr, input_noise=a.input_noise,
                    seed=a.seed, procs=a.procs, threads=a.threads, log_every=a.log_every,
                    storage_dtype=torch.float32 if a.fp32 else torch.float16)
    from .distributed import exit_distributed

    if info:  # rank 0 (or a single process)
        print(json.dumps(info, indent=2))
        print(f"wrote {a.out}")
    return exit_distributed(0)


def default_out_dir() -> str:
    """A new folder `./arpg-results/eval-digits-<UTC time>/` (ignored by git), created now."""
    from .outputs import new_run_dir

    return str(new_run_dir("eval-digits"))


def _eval_parser(prog: str = "arpg eval-digits") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Judge a digits ARPG: accuracy, FD, zero-shot edits.")
    p.add_argument("--ckpt", default=None, help="checkpoint (default: the shipped one)")
    p.add_argument("--out-dir", default=None,
                   help="where the table and PNGs go (default: a new folder arpg-results/eval-digits-<UTC time>/, "
                        "ignored by git; committing a record is a deliberate --out-dir benchmarks/results/digits; "
                        "'' writes nothing)")
    p.add_argument("--steps", type=int, nargs="+", default=[64, 32, 16, 8, 4])
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0, 5.0, 8.0])
    p.add_argument("--n-per-class", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--edit-steps", type=int, default=8)
    p.add_argument("--edit-cfg", type=float, default=RECOMMENDED_CFG)
    p.add_argument("--n-edit", type=int, default=None, help="edit only the first N test digits (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal)")
    return p


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
    a = _eval_parser().parse_args(argv)
    out_dir = default_out_dir() if a.out_dir is None else a.out_dir or None
    res = evaluate(ckpt=a.ckpt, out_dir=out_dir, steps=a.steps, cfg_scales=a.cfg, n_per_class=a.n_per_class,
                   temperature=a.temperature, edit_steps=a.edit_steps, edit_cfg=a.edit_cfg, n_edit=a.n_edit, seed=a.seed,
                   threads=a.threads, progress=not a.no_progress)
    if out_dir:
        with open(os.path.join(out_dir, "results.md")) as f:
            print(f.read())
        print(f"wrote the results to {out_dir}", file=sys.stderr)
    else:
        print(json.dumps(res, indent=2, default=str))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "eval"):
        print("usage: python -m arpg.digits {train,eval} [options]  (see --help of each)", file=sys.stderr)
        return 2
    return (train_main if argv[0] == "train" else eval_main)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
