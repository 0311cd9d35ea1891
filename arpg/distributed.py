"""Sampling many images on one or several processes (torchrun), with results independent of the world size.

The images to make are a list of labels in class order, cut into global batches of `batch_size`
(the last may be smaller). Global batch i runs on rank i % world_size with its own seed
`batch_seed(seed, i)`, and is the same computation whatever the number of processes: the images
depend on the seed and the batch size, never on the world size. Results are gathered to rank 0 round
by round (one batch per rank per round), so no rank holds more than a round of other ranks' results.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .engine import generate

__all__ = ["init_distributed", "exit_distributed", "batch_seed", "class_labels", "sample_distributed"]


def init_distributed(device=None) -> tuple[int, int, torch.device]:
    """Start torch.distributed when launched with WORLD_SIZE > 1 (torchrun); returns (rank, world, device).

    device: "cuda", "cpu" or None (CUDA when available). Under torchrun on CUDA each rank takes
    cuda:LOCAL_RANK and the NCCL backend; on CPU the gloo backend. A single process starts no group.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # A long timeout: rank 0 alone packs codes or writes a multi-GB checkpoint while the others wait
        # at a barrier, which can outlast the default 10 minutes of NCCL.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    return dist.get_rank(), dist.get_world_size(), device


def exit_distributed(code: int) -> int:
    """End a command that ran as one rank of a torchrun world: all ranks meet, the group is destroyed,
    and the process exits at once with `code` (its files are closed by then).

    Skipping the interpreter's teardown is deliberate: gloo's worker threads can still hold work objects
    that reference tensors, and freeing them during interpreter finalization aborts the process
    ("terminate called without an active exception"; pytorch/pytorch#179291), which turns a finished
    run into a failed one. A process without a group just returns `code`.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return code
    try:
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def batch_seed(seed: int, index: int) -> int:
    """The seed of global batch `index`: (seed, index) mixed by NumPy's SeedSequence, 63 bits."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def class_labels(
    classes: Sequence[int], num_per_class: Optional[int] = None, num_images: Optional[int] = None
) -> list[int]:
    """Labels in class order: each class num_per_class times, or num_images spread evenly over the classes
    (image i gets classes[i * K // num_images], K = len(classes))."""
    classes = list(classes)
    if num_images is not None:
        return [classes[i * len(classes) // num_images] for i in range(num_images)]
    return [c for c in classes for _ in range(1 if num_per_class is None else num_per_class)]


def sample_distributed(
    model: torch.nn.Module,
    labels: Sequence[int],
    num_steps: Optional[int],
    batch_size: int,
    seed: int = 0,
    decode: Optional[Callable[[torch.Tensor], np.ndarray]] = None,
    progress: bool = False,
    **generate_kwargs,
) -> Optional[np.ndarray]:
    """Generate one image per label, split over the processes of the current group (if any).

    labels: class labels in output order. progress: a tqdm bar on rank 0 (when stderr is a terminal). num_steps, **generate_kwargs: as in `generate` (cfg_scale,
    schedule, temperature, ...; no generator or seed). decode: tokens int64 [b, g, g] -> array
    [b, ...] (say, uint8 images [b, H, W, 3] from a tokenizer); None keeps the token grids.
    Returns the results stacked in label order on rank 0, None on the other ranks.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    labels = [int(x) for x in labels]
    num_batches = math.ceil(len(labels) / batch_size)
    grid = model.config.grid_size
    device = next(model.parameters()).device
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(labels), unit="img", desc="sampling", disable=None)  # off when not a terminal
    parts: dict[int, np.ndarray] = {}
    try:
        for first in range(0, num_batches, world):
            i = first + rank
            result = None
            if i < num_batches:
                batch = torch.tensor(labels[i * batch_size : (i + 1) * batch_size], device=device)
                tokens = generate(model, batch, num_steps, seed=batch_seed(seed, i), **generate_kwargs)
                tokens = tokens.view(-1, grid, grid)
                result = decode(tokens) if decode is not None else tokens.cpu().numpy()
            if world > 1:
                gathered = [None] * world if rank == 0 else None
                dist.gather_object((i, result), gathered, dst=0)
            else:
                gathered = [(i, result)]
            if rank == 0:
                for j, r in gathered:
                    if r is not None:
                        parts[j] = r
                        if bar is not None:
                            bar.update(len(r))
    finally:
        if bar is not None:
            bar.close()
    if rank != 0:
        return None
    return np.concatenate([parts[j] for j in range(num_batches)]) if parts else np.zeros((0, grid, grid), np.int64)
