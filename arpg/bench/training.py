"""Training: tokens/s and memory of `arpg.train`'s step, one process, on random codes.

The model learns nothing from random codes, but a step costs the same: the forward over a random order
per sample, the backward, AdamW, the EMA. The run takes `steps` steps; the first `warmup` (allocator,
caches, torch.compile if on) are left out, and tokens/s is the global batch's tokens over the later
steps' wall time, from the trainer's own log lines. Memory: the peak allocated on CUDA, the process's
peak RSS on the CPU. On a GPU: ARPG-L at batch 32 in bf16, eager and torch.compile'd.
"""

from __future__ import annotations

import torch

from arpg import train as T
from arpg.config import ARPGConfig
from arpg.data_codes import TensorCodes

from .common import Record
from .generation import _config

CPU_TRAINING = dict(model="cpu-tiny", batch=16, steps=30, warmup=10, compile=[False])
GPU_TRAINING = dict(model="ARPG-L", batch=32, steps=40, warmup=10, compile=[False, True])
SHORT_TRAINING = dict(GPU_TRAINING, steps=20, warmup=5, compile=[False])


def random_codes(config: ARPGConfig, n: int, seed: int = 0) -> TensorCodes:
    g = torch.Generator().manual_seed(seed)
    return TensorCodes(torch.randint(0, config.vocab_size, (n, 2, config.seq_len), generator=g),
                       torch.randint(0, config.num_classes, (n,), generator=g), source="random codes")


def bench_training(record: Record, device: torch.device, grid: dict) -> list[dict]:
    config, _ = _config(grid["model"])
    data = random_codes(config, max(4 * grid["batch"], 64))
    out = []
    for compile_ in grid["compile"]:
        recipe = T.TrainConfig(model=config, steps=grid["steps"], global_batch=grid["batch"], log_every=grid["warmup"],
                               compile=compile_)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _, info = T.train(recipe, data, device=str(device), log=None)
        # log rows every `warmup` steps: the first covers the warm-up; the rest are steady state
        rows = info["log_rows"][1:]
        seconds = sum(r["seconds"] for r in rows)
        steps = sum(r["steps"] for r in rows)
        tokens_s = steps * grid["batch"] * config.seq_len / seconds
        cfg = {"model": grid["model"], "batch": grid["batch"], "compile": compile_,
               "precision": "bf16" if device.type == "cuda" else "fp32", "steps": steps}
        provider = "arpg.train" + (" (compiled)" if compile_ else "")
        record.add("training", "step", provider, cfg, "tokens_per_s", "tok/s", tokens_s, n=steps)
        record.add("training", "step", provider, cfg, "images_per_s", "img/s", tokens_s / config.seq_len, n=steps)
        record.add("training", "step", provider, cfg, "peak_mib", "MiB", rows[-1]["mem_mib"])
        out.append({"compile": compile_, "tokens_per_s": tokens_s, "peak_mib": rows[-1]["mem_mib"]})
    return out
