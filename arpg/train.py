"""One trainer for every ARPG: one process, or many under torchrun with DDP or FSDP2 (`arpg train`).

The recipe is the original's `train_c2i.py` unless told otherwise: AdamW (betas 0.9/0.95, weight decay
0.05 on every matrix), lr 1e-4 per 256 of global batch, linear warmup then cosine to lr/10, gradient
clipping 1.0, EMA of the weights, class dropout 0.1, token/residual/FFN dropout 0.1, bf16 autocast on
GPUs. `arpg train-digits` runs the same trainer with the digits recipe (`arpg.digits`).

Determinism and world size. Every rank draws the same global batch: one sample permutation per epoch
from a data generator seeded by `seed`, then the per-sample randomness of the whole batch (augmentation
pick, input noise, class dropout, generation order) from a second generator. Rank r takes the r-th
contiguous share of it (split again into micro-batches with gradient accumulation), so a step is the
same computation on any number of processes, up to the order of float reductions. Dropout masks come
from each rank's own torch RNG (seeded by seed and rank), so with dropouts on, runs on different world
sizes differ in the masks only.

Run folder (`out`): `run.json` (model config and recipe), `log.csv` (one row per logged step),
`checkpoints/step-NNNNNNN.pt` (or a `torch.distributed.checkpoint` folder `step-NNNNNNN/` with FSDP2),
`checkpoints/latest` (the name of the newest complete checkpoint) and, at the end, `final.pt`
(`{"model": weights, "config", "arch"}`, the EMA weights when the run kept an EMA: the original's
published format, read by `arpg.load_checkpoint`). Checkpoints are written under a temporary name and
renamed when complete, so a crash while saving never replaces the last good one; `resume=True`
continues from `latest` exactly: weights, EMA, optimizer, schedule, data position and RNG states.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .config import CONFIGS, ARPGConfig
from .data_codes import CodeDataError, TensorCodes, open_codes, pack_codes
from .model import ARPG

__all__ = ["TrainConfig", "TrainError", "train", "launch", "latest_checkpoint", "export_weights", "Muon",
           "lr_at", "main", "pack_main", "export_main"]

CKPT_DIR = "checkpoints"
LOG_FIELDS = ["step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "images_per_s", "mem_mib", "wall_s"]


class TrainError(ValueError):
    """A training run that cannot start or resume as asked (nothing was written)."""


@dataclass
class TrainConfig:
    """The recipe of a run; the defaults are the original's `train_c2i.py`.

    lr: the peak learning rate at a global batch of `lr_ref_batch` (scaled linearly with the global
    batch; None: `lr` as is). warmup: steps of linear warmup, then cosine to `min_lr_ratio * lr`.
    micro_batch: samples per rank per forward (None: the rank's whole share; smaller gives gradient
    accumulation). ema: decay of the weights' moving average (0: none). optimizer: "adamw", or "muon"
    (`Muon` on the hidden matrices, AdamW without decay on the rest; not with FSDP2). input_noise: the
    fraction of context tokens replaced by random codes (the digits recipe). strategy: "ddp" or "fsdp"
    (FSDP2, `fully_shard` per layer) when the world has more than one process. precision: "auto" (bf16
    autocast on CUDA, float32 on CPU), "bf16" or "fp32". ckpt_every: steps between checkpoints (0: only
    the last); keep: how many checkpoints to keep (0: all).
    """

    model: ARPGConfig = field(default_factory=lambda: dataclasses.replace(
        CONFIGS["ARPG-L"], token_dropout=0.1, resid_dropout=0.1, ffn_dropout=0.1))
    steps: int = 1000
    global_batch: int = 256
    micro_batch: Optional[int] = None
    lr: float = 1e-4
    lr_ref_batch: Optional[int] = 256
    min_lr_ratio: float = 0.1
    warmup: int = 0
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    ema: float = 0.9999
    init_std: float = 0.02
    optimizer: str = "adamw"
    muon_lr: float = 0.02
    input_noise: float = 0.0
    seed: int = 0
    strategy: str = "ddp"
    precision: str = "auto"
    compile: bool = False
    ckpt_every: int = 0
    keep: int = 2
    log_every: int = 100

    def validate(self) -> None:
        def need(ok, what):
            if not ok:
                raise TrainError(what)

        need(isinstance(self.steps, int) and self.steps >= 1, f"steps must be a positive int, got {self.steps!r}")
        need(self.global_batch >= 1, f"global_batch must be >= 1, got {self.global_batch}")
        need(self.micro_batch is None or self.micro_batch >= 1, f"micro_batch must be >= 1, got {self.micro_batch}")
        need(self.lr > 0 and self.muon_lr > 0, f"lr and muon_lr must be > 0, got {self.lr}, {self.muon_lr}")
        need(self.lr_ref_batch is None or self.lr_ref_batch >= 1, f"lr_ref_batch must be >= 1, got {self.lr_ref_batch}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.warmup >= 0 and self.weight_decay >= 0 and self.grad_clip >= 0,
             f"warmup, weight_decay and grad_clip must be >= 0, got {self.warmup}, {self.weight_decay}, {self.grad_clip}")
        need(0 <= self.ema < 1, f"ema must be in [0, 1), got {self.ema}")
        need(0 <= self.input_noise < 1, f"input_noise must be in [0, 1), got {self.input_noise}")
        need(self.optimizer in ("adamw", "muon"), f"optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
        need(self.strategy in ("ddp", "fsdp"), f"strategy must be 'ddp' or 'fsdp', got {self.strategy!r}")
        need(self.precision in ("auto", "bf16", "fp32"), f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        need(self.ckpt_every >= 0 and self.keep >= 0 and self.log_every >= 0,
             "ckpt_every, keep and log_every must be >= 0")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["model"] = ARPGConfig.from_dict(d["model"])
        d["betas"] = tuple(d["betas"])
        return cls(**d)


# Fields that may change when a run resumes: they do not change the computation of a step.
# (Not steps: the cosine schedule's length is the run's step count.)
_RESUMABLE_CHANGES = ("ckpt_every", "keep", "log_every", "compile", "micro_batch", "strategy")


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup over `warmup` steps (lr (step + 1) / warmup), then half-cosine to min_ratio * lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# ----------------------------------------------------------------------------------------------------
# Optimizers


def _newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's quintic Newton-Schulz orthogonalization of a stack of matrices [..., A, B], in float32."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = g.shape[-2] > g.shape[-1]
    x = g.transpose(-1, -2) if tall else g
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        s = x @ x.transpose(-1, -2)
        x = a * x + (b * s + c * (s @ s)) @ x
    return x.transpose(-1, -2) if tall else x


class Muon(torch.optim.Optimizer):
    """Muon: SGD momentum (Nesterov) whose update of each weight matrix is orthogonalized by a
    Newton-Schulz iteration, scaled by sqrt(max(1, rows / cols)) (torch.optim.Muon's "original" rule).

    The same algorithm as torch.optim.Muon, but in float32 and batched over matrices of one shape:
    torch's version iterates in bfloat16, which is slow on most CPUs, and one matrix at a time (on the
    project's CPU, the 38 hidden matrices of the dim-96 digits model: 74 ms per step here, 1,162 ms there).
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            by_shape: dict = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() != 2:
                    raise ValueError("Muon takes 2D weight matrices only")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                by_shape.setdefault(tuple(p.shape), []).append((p, update))
            for (rows, cols), items in by_shape.items():
                ortho = _newton_schulz(torch.stack([u for _, u in items]).float(), group["ns_steps"])
                step_size = group["lr"] * max(1.0, rows / cols) ** 0.5
                for (p, _), o in zip(items, ortho):
                    p.add_(o.to(p.dtype), alpha=-step_size)


def _optimizers(model: torch.nn.Module, cfg: TrainConfig, lr: float) -> list:
    """AdamW with the original's groups (weight decay on every tensor of >= 2 dims, none on the norms), or
    `Muon` on the hidden matrices (lr `muon_lr`, no decay) and AdamW without decay on the embeddings, head
    and norms. Every param group carries `lr_scale` (its lr over the schedule's)."""
    named = list(model.named_parameters())
    fused = {"foreach": True} if any(p.is_cuda for _, p in named) else {}
    if cfg.optimizer == "muon":
        hidden = [p for n, p in named if p.dim() >= 2 and not n.startswith(("embeddings", "head"))]
        ids = {id(p) for p in hidden}
        rest = [p for _, p in named if id(p) not in ids]
        muon = Muon([{"params": hidden, "lr_scale": cfg.muon_lr / lr}], lr=cfg.muon_lr)
        adam = torch.optim.AdamW([{"params": rest, "lr_scale": 1.0}], lr=lr, betas=tuple(cfg.betas),
                                 weight_decay=0.0, **fused)
        return [muon, adam]
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    return [torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
         {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}],
        lr=lr, betas=tuple(cfg.betas), **fused)]


# ----------------------------------------------------------------------------------------------------
# Data order


class _Stream:
    """The global batches of a run: a permutation of the N samples per epoch, batches of B taken in
    order, the tail that does not fill a batch dropped. Its state is the data generator's state at the
    start of the epoch and the cursor, so a resumed run continues in the middle of an epoch."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch = n, batch
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self._new_epoch()

    def _new_epoch(self) -> None:
        self.epoch_state = self.gen.get_state()
        self.perm = torch.randperm(self.n, generator=self.gen)
        self.cursor = 0

    def next(self) -> torch.Tensor:
        if self.cursor + self.batch > self.n:
            self.epoch += 1
            self._new_epoch()
        idx = self.perm[self.cursor : self.cursor + self.batch]
        self.cursor += self.batch
        return idx

    def state(self) -> dict:
        return {"epoch_state": self.epoch_state, "epoch": self.epoch, "cursor": self.cursor}

    def load(self, st: dict) -> None:
        self.gen.set_state(st["epoch_state"])
        self._new_epoch()
        self.epoch, self.cursor = int(st["epoch"]), int(st["cursor"])


def _draw(gen: torch.Generator, cfg: TrainConfig, bsz: int, seq: int, n_aug: int) -> dict:
    """The per-sample randomness of one global batch, in a fixed order (the digits trainer's)."""
    out = {"picks": torch.randint(0, 2**62, (bsz,), generator=gen) if n_aug > 1 else None}
    if cfg.input_noise > 0:
        out["noise"] = torch.rand(bsz, seq, generator=gen) < cfg.input_noise
        out["noise_codes"] = torch.randint(0, cfg.model.vocab_size, (bsz, seq), generator=gen)
    out["drop"] = (torch.rand(bsz, generator=gen) < cfg.model.class_dropout if cfg.model.class_dropout > 0
                   else torch.zeros(bsz, dtype=torch.bool))
    out["orders"] = torch.rand(bsz, seq, generator=gen).argsort(dim=1)
    return out


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def latest_checkpoint(out: str) -> Optional[str]:
    """The newest complete checkpoint of the run folder `out` (named by `checkpoints/latest`), or None."""
    pointer = os.path.join(out, CKPT_DIR, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(out, CKPT_DIR, name)
    if not name or not os.path.exists(path):
        raise TrainError(f"{pointer} names {name!r}, which is not there")
    return path


def _write_atomic(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) then rename tmp to path: a crash part-way leaves path as it was."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _write_atomic(path, write)


def _torch_save(obj, path: str) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    _write_atomic(path, write)


def _step_of(name: str) -> int:
    return int(name[len("step-"):].split(".")[0])


def _checkpoint_names(root: str) -> list:
    return sorted((n for n in os.listdir(root) if n.startswith("step-") and ".tmp" not in n), key=_step_of)


def _remove(path: str) -> None:
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _prune(out: str, keep: int, latest: str) -> None:
    """Keep the `keep` newest checkpoints up to and including `latest` (never `latest` itself)."""
    if not keep:
        return
    root = os.path.join(out, CKPT_DIR)
    older = [n for n in _checkpoint_names(root) if _step_of(n) <= _step_of(latest)]
    for name in older[:-keep]:
        _remove(os.path.join(root, name))


def _drop_newer(out: str, step: int) -> None:
    """Remove what a killed run left newer than the checkpoint it resumes from: checkpoints saved after
    `latest` was last written (killed between the two renames) and half-written temporaries."""
    root = os.path.join(out, CKPT_DIR)
    for name in os.listdir(root):
        if name.startswith("step-") and (".tmp" in name or _step_of(name) > step):
            _remove(os.path.join(root, name))


def _rng_state(device: torch.device) -> dict:
    st = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict, device: torch.device) -> None:
    torch.set_rng_state(st["cpu"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def export_weights(checkpoint: str, out: str, weights: str = "ema") -> None:
    """Write `{"model": state dict, "config", "arch"}` (the original's format) from a training checkpoint
    (a `.pt` file or an FSDP2 folder) of `arpg train`; weights: "ema" (when the run kept one) or "raw"."""
    from .checkpoint import load_state_dict_file

    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    from .checkpoint import CheckpointError

    try:
        sd, meta = load_state_dict_file(checkpoint, key="ema" if weights == "ema" else "model")
    except CheckpointError as e:
        absent = "no state dict under 'ema'" in str(e) or "no 'ema' weights" in str(e)
        if weights != "ema" or not absent:
            raise
        sd, meta = load_state_dict_file(checkpoint, key="model")  # a run that kept no EMA
    _torch_save({"model": sd, "config": meta.get("config"), "arch": meta.get("arch", "arpg")}, out)


# ----------------------------------------------------------------------------------------------------
# The run


@dataclass
class _Ctx:
    rank: int
    world: int
    device: torch.device
    log: Optional[Callable[[str], None]]


def _context(device: Optional[str], log) -> _Ctx:
    from .distributed import init_distributed

    rank, world, dev = init_distributed(None if device in (None, "auto") else device)
    return _Ctx(rank, world, dev, log if rank == 0 else None)


def _check_dataset(data, cfg: TrainConfig):
    c = cfg.model
    try:
        data.check(c.seq_len, c.vocab_size, c.num_classes)
    except CodeDataError as e:
        raise TrainError(str(e)) from None
    if len(data) < cfg.global_batch:
        raise TrainError(f"{data.source}: {len(data)} samples, fewer than the global batch {cfg.global_batch}")


def _wrap(model: ARPG, cfg: TrainConfig, ctx: _Ctx) -> torch.nn.Module:
    if cfg.compile:
        model.compile()  # in place: parameter names and state dicts stay the plain module's
    if ctx.world == 1:
        return model
    if cfg.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for layer in [*model.layers.self_dec, *model.layers.cross_dec]:
        fully_shard(layer)
    fully_shard(model)
    return model


def _stored_run(out: str) -> Optional[dict]:
    path = os.path.join(out, "run.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _checkpoint_recipe(path: str) -> dict:
    """The TrainConfig dict a checkpoint of `train` was written with."""
    state_file = os.path.join(path, "trainer.pt") if os.path.isdir(path) else path
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True, mmap=True)
        return state["train_config"]
    except Exception as e:
        raise TrainError(f"{path}: not a checkpoint of arpg train ({type(e).__name__}: {e})") from None


def _check_resume(stored: dict, cfg: TrainConfig, source: str) -> None:
    now = cfg.to_dict()
    diff = []
    for k in now:
        if k in _RESUMABLE_CHANGES:
            continue
        if k == "model":
            for mk, mv in now["model"].items():
                if stored["model"].get(mk) != mv:
                    diff.append(f"model.{mk} {stored['model'].get(mk)} vs {mv}")
        elif stored.get(k) != now[k]:
            diff.append(f"{k} {stored.get(k)} vs {now[k]}")
    if diff:
        raise TrainError(f"{source} is a run of another config: {', '.join(diff)} (checkpoint vs now); "
                         "nothing was changed")


def train(
    cfg: TrainConfig,
    data,
    out: Optional[str] = None,
    resume: bool = False,
    device: Optional[str] = None,
    log: Optional[Callable[[str], None]] = print,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> tuple[ARPG, dict]:
    """Run `cfg` on `data` (a dataset of `arpg.data_codes`) in this process, as one rank of the world
    torchrun set up (or alone); returns (the model in eval mode, info). On every rank but 0 of an FSDP2
    run the model holds only its shards.

    out: the run folder (None: no files: no checkpoints, no log). resume: continue from its latest
    checkpoint (it must exist and be of the same recipe). on_step(step, loss): called on rank 0 after
    every step with the global mean loss of that step (the loss is reduced every step when given).
    The returned info holds `losses` ([step, loss] at every logged step), `log_rows` (the log's rows,
    with the steps and seconds each covers), the final running loss (`running_loss`, an exponential
    average over steps), wall time and tokens/s.
    """
    cfg.validate()
    ctx = _context(device, log)
    _check_dataset(data, cfg)
    world, rank = ctx.world, ctx.rank
    if cfg.global_batch % world:
        raise TrainError(f"global_batch {cfg.global_batch} must be a multiple of the world size {world}")
    share = cfg.global_batch // world
    micro = cfg.micro_batch or share
    if share % micro:
        raise TrainError(f"each rank's share of the batch ({share}) must be a multiple of micro_batch ({micro})")
    accum = share // micro
    if cfg.optimizer == "muon" and world > 1 and cfg.strategy == "fsdp":
        raise TrainError("muon needs whole matrices: use strategy 'ddp' or optimizer 'adamw' with fsdp")

    start_ckpt = None
    if out is not None:
        stored, latest = _stored_run(out), latest_checkpoint(out)
        if resume:
            if latest is None:
                raise TrainError(f"{out}: no checkpoint to resume from")
            _check_resume(_checkpoint_recipe(latest), cfg, latest)
            start_ckpt = latest
        elif stored is not None or latest is not None:
            raise TrainError(f"{out} already holds a run; pass resume=True (--resume) or another folder")
    elif resume:
        raise TrainError("resume needs the run folder (out)")
    if world > 1:
        dist.barrier()  # every rank has looked at the run folder before rank 0 writes into it

    # The same initial weights on every rank, then each rank's own dropout RNG.
    torch.manual_seed(cfg.seed)
    model = ARPG(cfg.model)
    model.reset_parameters(std=cfg.init_std)
    model = model.to(ctx.device).train()
    torch.manual_seed(cfg.seed * 1_000_003 + 7 + rank)
    if ctx.device.type == "cuda":
        torch.cuda.manual_seed(cfg.seed * 1_000_003 + 7 + rank)
    lr = cfg.lr * (cfg.global_batch / cfg.lr_ref_batch if cfg.lr_ref_batch else 1.0)
    net = _wrap(model, cfg, ctx)
    fsdp = world > 1 and cfg.strategy == "fsdp"
    params = list(model.parameters())
    opts = _optimizers(model, cfg, lr)
    ema = [p.detach().clone() for p in params] if cfg.ema > 0 else None
    names = [n for n, _ in model.named_parameters()]
    stream = _Stream(len(data), cfg.global_batch, cfg.seed)
    sample_gen = torch.Generator().manual_seed(cfg.seed * 1009 + 1)
    step0 = 0
    if start_ckpt is not None:
        step0 = _load_state(start_ckpt, model, opts, ema, names, stream, sample_gen, ctx, fsdp)
    if out is not None and rank == 0:
        os.makedirs(os.path.join(out, CKPT_DIR), exist_ok=True)
        if start_ckpt is not None:
            _drop_newer(out, step0)
        _write_text(os.path.join(out, "run.json"), json.dumps(cfg.to_dict(), indent=2))
        _trim_log(os.path.join(out, "log.csv"), step0)
    if world > 1:
        dist.barrier()  # the run folder exists before any rank writes a checkpoint into it
    if ctx.log:
        nparams = sum(p.numel() for p in params)  # a DTensor's numel is the whole tensor's
        ctx.log(f"training {nparams:,} parameters on {world} process(es) ({cfg.strategy if world > 1 else 'single'}, "
                f"{ctx.device.type}), global batch {cfg.global_batch} = {world} x {accum} x {micro}, lr {lr:.3g}, "
                f"{len(data):,} samples" + (f", resuming at step {step0}" if step0 else ""))

    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and ctx.device.type == "cuda")
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16)
    seq = cfg.model.seq_len
    # Loss statistics stay on the device between log lines (no host sync per step); `running` is an
    # exponential average over every step, reduced over the ranks at the end.
    running = interval = None
    losses, log_rows = [], []
    t_start = t_log = time.perf_counter()
    steps_since_log = 0
    for step in range(step0, cfg.steps):
        idx = stream.next()
        r = _draw(sample_gen, cfg, cfg.global_batch, seq, data.n_aug)
        mine = slice(rank * share, (rank + 1) * share)
        codes, labels = data.read(idx[mine].numpy(), None if r["picks"] is None else r["picks"][mine].numpy())
        labels = torch.where(r["drop"][mine], torch.full_like(labels, -1), labels)  # -1: the no-class id
        context = torch.where(r["noise"][mine], r["noise_codes"][mine], codes) if cfg.input_noise > 0 else None
        orders = r["orders"][mine]
        lr_now = lr_at(step, cfg.steps, lr, cfg.warmup, cfg.min_lr_ratio)
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = lr_now * g["lr_scale"]
        step_loss = torch.zeros((), device=ctx.device)
        for m in range(accum):
            sl = slice(m * micro, (m + 1) * micro)
            with _no_sync(net, fsdp, world, last=m == accum - 1), autocast:
                _, loss = net(codes[sl].to(ctx.device), labels[sl].to(ctx.device), orders=orders[sl].to(ctx.device),
                              context=None if context is None else context[sl].to(ctx.device), class_dropout=0.0)
            (loss / accum).backward()
            step_loss += loss.detach().float() / accum
        if cfg.grad_clip > 0:
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            gn = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema, params):
                    e.lerp_(p.detach(), 1 - cfg.ema)
        running = step_loss.clone() if running is None else running.mul_(0.95).add_(step_loss, alpha=0.05)
        interval = step_loss.clone() if interval is None else interval.add_(step_loss)
        steps_since_log += 1
        if on_step is not None:
            value = float(_mean_over_ranks(step_loss, world))
            if rank == 0:
                on_step(step + 1, value)
        if cfg.log_every and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            mean = float(_mean_over_ranks(interval, world)) / steps_since_log
            grad_norm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            now = time.perf_counter()
            rate = steps_since_log / max(now - t_log, 1e-9)
            row = {"step": step + 1, "epoch": stream.epoch, "loss": mean, "lr": lr_now, "grad_norm": grad_norm,
                   "tokens_per_s": rate * cfg.global_batch * seq, "images_per_s": rate * cfg.global_batch,
                   "mem_mib": _memory_mib(ctx.device), "wall_s": now - t_start}
            losses.append([step + 1, mean])
            log_rows.append({**row, "steps": steps_since_log, "seconds": now - t_log})
            if rank == 0 and out is not None:
                _append_log(os.path.join(out, "log.csv"), row)
            if ctx.log:
                ctx.log(f"step {step + 1}/{cfg.steps}  loss {mean:.4f}  lr {lr_now:.2e}  grad norm {grad_norm:.3f}  "
                        f"{row['tokens_per_s']:,.0f} tok/s  {row['images_per_s']:,.1f} img/s  "
                        f"{row['mem_mib']:,.0f} MiB  {row['wall_s']:.0f}s")
            interval, steps_since_log, t_log = None, 0, now
        if out is not None and (step + 1 == cfg.steps or (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0)):
            _save_state(out, step + 1, model, opts, ema, names, stream, sample_gen, cfg, ctx, fsdp)
    wall = time.perf_counter() - t_start
    if ema is not None:
        with torch.no_grad():
            for e, p in zip(ema, params):
                p.copy_(e)
    if out is not None:
        _export_final(out, model, cfg, ctx, fsdp)
    if world > 1:
        dist.barrier()
    steps_run = cfg.steps - step0
    info = {"steps": cfg.steps, "steps_run": steps_run, "world": world, "strategy": cfg.strategy if world > 1 else "single",
            "wall_s": wall, "tokens_per_s": steps_run * cfg.global_batch * seq / max(wall, 1e-9),
            "running_loss": None if running is None else float(_mean_over_ranks(running, world)), "losses": losses,
            "log_rows": log_rows}
    return model.eval(), info


def _mean_over_ranks(t: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / world


def _no_sync(net, fsdp: bool, world: int, last: bool):
    import contextlib

    if world == 1 or last:
        if fsdp:
            net.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if fsdp:
        net.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return net.no_sync()


def _memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (KiB on Linux)


def _append_log(path: str, row: dict) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in row.items()})


def _trim_log(path: str, step: int) -> None:
    """Drop the rows a killed run logged after the checkpoint it resumes from."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            w.writeheader()
            w.writerows(rows)

    _write_atomic(path, write)


def _gather_rng(ctx: _Ctx) -> list:
    mine = _rng_state(ctx.device)
    if ctx.world == 1:
        return [mine]
    everyone = [None] * ctx.world
    dist.all_gather_object(everyone, mine)
    return everyone


def _trainer_state(step, stream, sample_gen, cfg, ctx) -> dict:
    return {"step": step, "data": {**stream.state(), "n": stream.n}, "sample_gen": sample_gen.get_state(),
            "rng": _gather_rng(ctx),
            "world": ctx.world, "train_config": cfg.to_dict(), "config": cfg.model.to_dict(), "arch": "arpg"}


def _save_state(out, step, model, opts, ema, names, stream, sample_gen, cfg, ctx, fsdp) -> None:
    name = f"step-{step:07d}"
    root = os.path.join(out, CKPT_DIR)
    state = _trainer_state(step, stream, sample_gen, cfg, ctx)
    if fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        tmp = os.path.join(root, name + ".tmp")
        if ctx.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opts[0])}
        if ema is not None:
            sd["ema"] = dict(zip(names, ema))
        dcp.save(sd, checkpoint_id=tmp)
        if ctx.rank == 0:
            _torch_save(state, os.path.join(tmp, "trainer.pt"))
            if os.path.exists(os.path.join(root, name)):  # left by a run killed before `latest` named it
                shutil.rmtree(os.path.join(root, name))
            os.replace(tmp, os.path.join(root, name))
    elif ctx.rank == 0:
        state["model"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if ema is not None:
            state["ema"] = {n: e.detach().cpu() for n, e in zip(names, ema)}
        state["optimizer"] = [o.state_dict() for o in opts]
        _torch_save(state, os.path.join(root, name + ".pt"))
        name += ".pt"
    if ctx.rank == 0:
        _write_text(os.path.join(root, "latest"), name + "\n")
        _prune(out, cfg.keep, name)
    if ctx.world > 1:
        dist.barrier()


def _load_state(path, model, opts, ema, names, stream, sample_gen, ctx, fsdp) -> int:
    if os.path.isdir(path):
        if not fsdp:
            raise TrainError(f"{path} is an FSDP2 checkpoint; resume it with strategy 'fsdp' on as many processes")
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opts[0])}
        if ema is not None:
            sd["ema"] = dict(zip(names, ema))
        dcp.load(sd, checkpoint_id=path)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opts[0], sd["optim"])
        state = torch.load(os.path.join(path, "trainer.pt"), map_location="cpu", weights_only=True)
    else:
        if fsdp:
            raise TrainError(f"{path} is a single-process or DDP checkpoint; resume it with strategy 'ddp'")
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # no copy per rank
        model.load_state_dict(state["model"])
        for o, s in zip(opts, state["optimizer"]):
            o.load_state_dict(s)
        if ema is not None:
            with torch.no_grad():
                for n, e in zip(names, ema):
                    e.copy_(state["ema"][n])
    if state["data"].get("n", stream.n) != stream.n:
        raise TrainError(f"{path} was written over a dataset of {state['data']['n']:,} samples, this one has "
                         f"{stream.n:,}: the data order would not continue; nothing was changed")
    stream.load(state["data"])
    sample_gen.set_state(state["sample_gen"])
    if len(state["rng"]) == ctx.world:
        _set_rng_state(state["rng"][ctx.rank], ctx.device)
    elif ctx.log:  # the data and the per-sample draws continue exactly; only dropout masks are reseeded
        ctx.log(f"resuming a run of {len(state['rng'])} process(es) on {ctx.world}: dropout RNGs reseeded")
    return int(state["step"])


def _export_final(out, model, cfg, ctx, fsdp) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if ctx.rank == 0:
        _torch_save({"model": sd, "config": cfg.model.to_dict(), "arch": "arpg"}, os.path.join(out, "final.pt"))


# ----------------------------------------------------------------------------------------------------
# Launching


def launch(argv: Sequence[str], procs: int) -> int:
    """Run `python -m arpg <argv>` on `procs` local processes under torchrun (gloo on CPU, NCCL on GPUs)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
           "-m", "arpg", *argv]
    return subprocess.call(cmd)


def _strip_procs(argv: Sequence[str]) -> list:
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--procs":
            skip = True
            continue
        if a.startswith("--procs="):
            continue
        out.append(a)
    return out


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="arpg train", description=(
        "Train an ARPG on token codes: the original's <class>/<name>.npy folders or an `arpg pack-codes` folder. "
        "One process, or many under torchrun (or --procs N) with DDP or FSDP2. Defaults: the original's recipe."))
    p.add_argument("--data", required=True, help="code folder (<class>/<name>.npy), packed folder, or 'digits'")
    p.add_argument("--out", required=True, help="run folder: run.json, log.csv, checkpoints/, final.pt")
    p.add_argument("--config", default="ARPG-L",
                   help=f"model size: {', '.join(CONFIGS)}, or digits (default ARPG-L)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--procs", type=int, default=1, help="local processes to launch under torchrun (default 1)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--global-batch", type=int, default=d.global_batch)
    p.add_argument("--micro-batch", type=int, default=None, help="per rank per forward (gradient accumulation)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak lr at a global batch of --lr-ref-batch")
    p.add_argument("--lr-ref-batch", type=int, default=d.lr_ref_batch, help="0: use --lr as is")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--warmup", type=int, default=d.warmup, help="warmup steps")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--beta1", type=float, default=d.betas[0])
    p.add_argument("--beta2", type=float, default=d.betas[1])
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="0: off")
    p.add_argument("--ema", type=float, default=d.ema, help="EMA decay (0: off)")
    p.add_argument("--init-std", type=float, default=d.init_std)
    p.add_argument("--optimizer", choices=["adamw", "muon"], default=d.optimizer)
    p.add_argument("--muon-lr", type=float, default=d.muon_lr)
    p.add_argument("--input-noise", type=float, default=d.input_noise)
    p.add_argument("--class-dropout", type=float, default=0.1)
    p.add_argument("--token-dropout", type=float, default=0.1)
    p.add_argument("--resid-dropout", type=float, default=0.1)
    p.add_argument("--ffn-dropout", type=float, default=0.1)
    p.add_argument("--drop-path", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default=d.strategy)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=d.precision)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="steps between checkpoints (0: at the end)")
    p.add_argument("--keep", type=int, default=d.keep, help="checkpoints kept (0: all)")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    return p


def config_from_args(a) -> TrainConfig:
    if a.config == "digits":
        from .digits import digits_config

        base = digits_config()
    elif a.config in CONFIGS:
        base = CONFIGS[a.config]
    else:
        raise TrainError(f"unknown --config {a.config!r}; known: {', '.join(CONFIGS)}, digits")
    model = dataclasses.replace(base, class_dropout=a.class_dropout, token_dropout=a.token_dropout,
                                resid_dropout=a.resid_dropout, ffn_dropout=a.ffn_dropout, drop_path=a.drop_path)
    return TrainConfig(model=model, steps=a.steps, global_batch=a.global_batch, micro_batch=a.micro_batch, lr=a.lr,
                       lr_ref_batch=a.lr_ref_batch or None, min_lr_ratio=a.min_lr_ratio, warmup=a.warmup,
                       weight_decay=a.weight_decay, betas=(a.beta1, a.beta2), grad_clip=a.grad_clip, ema=a.ema,
                       init_std=a.init_std, optimizer=a.optimizer, muon_lr=a.muon_lr, input_noise=a.input_noise,
                       seed=a.seed, strategy=a.strategy, precision=a.precision, compile=a.compile,
                       ckpt_every=a.ckpt_every, keep=a.keep, log_every=a.log_every)


def _open_data(path: str):
    if path == "digits":
        from .digits import load_split

        split = load_split()
        return TensorCodes(split.x_train, split.y_train, source="digits")
    try:
        return open_codes(path)
    except CodeDataError as e:
        raise TrainError(str(e)) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = _parser()
    a = p.parse_args(argv)
    if a.procs > 1 and "WORLD_SIZE" not in os.environ:
        return launch(["train", *_strip_procs(argv)], a.procs)
    from .distributed import exit_distributed

    try:
        cfg = config_from_args(a)
        train(cfg, _open_data(a.data), out=a.out, resume=a.resume, device=a.device)
    except (TrainError, CodeDataError) as e:
        if a.debug:
            raise
        print(f"arpg train: error: {e}", file=sys.stderr)
        return exit_distributed(2)
    return exit_distributed(0)


def export_main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="arpg export-weights", description=(
        "Write {'model': weights, 'config', 'arch'} (the original's format) from a checkpoint of arpg train."))
    p.add_argument("checkpoint", help="a checkpoints/step-NNNNNNN.pt file or FSDP2 folder")
    p.add_argument("out", help="the .pt file to write (must not exist)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="EMA (default, when kept) or raw")
    a = p.parse_args(argv)
    from .checkpoint import CheckpointError

    if os.path.exists(a.out):
        p.exit(2, f"arpg export-weights: error: {a.out} already exists; not overwriting it\n")
    try:
        export_weights(a.checkpoint, a.out, a.weights)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        p.exit(2, f"arpg export-weights: error: {e}\n")
    print(f"wrote {a.out}")
    return 0


def pack_main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="arpg pack-codes", description=(
        "Pack a code folder (<class>/<name>.npy, as `arpg extract-codes` or the original write it) into "
        "memory-mapped shards that `arpg train --data` reads without opening a file per image."))
    p.add_argument("src", help="code folder")
    p.add_argument("dst", help="new packed folder (must not exist)")
    p.add_argument("--shard-size", type=int, default=50_000, help="samples per shard (default 50,000)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        packed = pack_codes(a.src, a.dst, a.shard_size, progress=not a.no_progress)
    except (CodeDataError, ValueError) as e:
        p.exit(2, f"arpg pack-codes: error: {e}\n")
    print(f"wrote {len(packed):,} samples of {packed.n_aug} x {packed.seq_len} codes to {a.dst}")
    return 0
