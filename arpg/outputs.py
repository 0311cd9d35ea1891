"""What commands write: a new folder per run under `./arpg-results/` by default, and image grids.

The folder is ignored by git (`.gitignore`), so running `arpg-bench` or `arpg eval-digits` in a clone
leaves `git status` clean; committing a record is a deliberate `--out benchmarks/results/<device>`.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = ["RESULTS_ROOT", "grid_columns", "image_grid", "new_run_dir", "slug"]

RESULTS_ROOT = Path("arpg-results")


def slug(text: str) -> str:
    """'CPU x86_64 x2' -> 'cpu-x86-64-x2': lower case, runs of other characters made one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def new_run_dir(kind: str, root: Path | str | None = None) -> Path:
    """Create and return `<root>/<kind>-<UTC timestamp>/` (root: ./arpg-results), never an existing folder."""
    root = Path(RESULTS_ROOT if root is None else root)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = f"{slug(kind)}-{stamp}"
    for i in range(1000):
        path = root / (base if i == 0 else f"{base}-{i}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot make a new results folder under {root} (1000 named {base}* exist)")


def grid_columns(n: int, ncol: Optional[int] = None) -> int:
    """Columns of a grid of n images: ncol, else about square."""
    return ncol or max(1, math.ceil(math.sqrt(n)))


LABEL_BAND = 14  # pixels of text under each image when labels are written


def image_grid(images: np.ndarray, ncol: Optional[int] = None, pad: int = 2,
               labels: Optional[Sequence[object]] = None, background: int = 255):
    """uint8 [N, H, W, 3] -> one PIL image, `ncol` images a row with `pad` pixels between and around;
    with labels, each image's label (str() of it) is written in a band under it."""
    from PIL import Image, ImageDraw

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or not len(images):
        raise ValueError(f"expected uint8 images [N, H, W, 3] with N > 0, got {images.dtype} {list(images.shape)}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    n, h, w, _ = images.shape
    ncol = grid_columns(n, ncol)
    rows = math.ceil(n / ncol)
    cell_h = h + (LABEL_BAND if labels is not None else 0)
    grid = np.full((rows * (cell_h + pad) + pad, ncol * (w + pad) + pad, 3), background, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        y, x = pad + r * (cell_h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = im
    canvas = Image.fromarray(grid)
    if labels is not None:
        draw = ImageDraw.Draw(canvas)
        ink = (0, 0, 0) if background > 127 else (255, 255, 255)
        for i, label in enumerate(labels):
            r, c = divmod(i, ncol)
            draw.text((pad + c * (w + pad) + 2, pad + r * (cell_h + pad) + h + 1), str(label), fill=ink)
    return canvas
