"""Where commands write results by default: a new folder per run under `./arpg-results/`.

The folder is ignored by git (`.gitignore`), so running `arpg-bench` or `arpg eval-digits` in a clone
leaves `git status` clean; committing a record is a deliberate `--out benchmarks/results/<device>`.
"""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path

__all__ = ["RESULTS_ROOT", "new_run_dir", "slug"]

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
