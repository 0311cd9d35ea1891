"""What the compiled extensions were built against, and whether this torch can load them.

A C++ extension links against one torch's C++ ABI: under another torch its import fails with an
undefined symbol, or worse, it loads and misbehaves. setup.py writes `_build.json` beside the
extensions it builds, `{"_cpu": {"torch": "2.14.1+cu130", ...}, "_C": {..., "cuda": "13.0"}}`; the
backends read it before importing an extension and, on a mismatch, say so in one line and fall back.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path
from typing import Optional

import torch

RECORD = Path(__file__).with_name("_build.json")
_warned: set[str] = set()


def built_for(ext: str) -> Optional[dict]:
    """The record of extension `ext` ("_C" or "_cpu"), or None (not built by setup.py, or unreadable)."""
    try:
        entry = json.loads(RECORD.read_text()).get(ext)
    except (OSError, ValueError, AttributeError):
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("torch"), str) else None


def _minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def mismatch(ext: str) -> Optional[str]:
    """Why this process's torch cannot load `ext` as built, or None. torch keeps its C++ ABI within a
    minor release (2.14.0 and 2.14.1 load each other's extensions), and the CUDA extension also needs
    the CUDA major it was built for."""
    entry = built_for(ext)
    if entry is None:
        return None
    built, here = entry["torch"], torch.__version__
    if _minor(built) != _minor(here):
        return f"arpg_kernels.{ext} was built for torch {built}, this is torch {here}"
    cuda = entry.get("cuda")
    if cuda and torch.version.cuda is None:
        return f"arpg_kernels.{ext} was built for CUDA {cuda}, this torch ({here}) is a CPU-only build"
    if cuda and cuda.split(".")[0] != torch.version.cuda.split(".")[0]:
        return f"arpg_kernels.{ext} was built for CUDA {cuda}, this torch ({here}) uses CUDA {torch.version.cuda}"
    return None


def warn_once(message: str) -> None:
    """One warning per distinct message and process (the backends' load and fallback messages)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def load_extension(ext: str, fallback: str) -> Optional[str]:
    """Import `arpg_kernels.<ext>` if it was built for this torch. Returns None, or why it is unusable;
    a library that is there but unusable is also said once as a warning, ending with `fallback`."""
    why = mismatch(ext)
    if why is None:
        try:
            importlib.import_module(f"arpg_kernels.{ext}")
            return None
        except ModuleNotFoundError:
            return f"arpg_kernels.{ext} is not built; build it with `pip install --no-build-isolation -e .`"
        except (ImportError, OSError) as exc:
            why = f"arpg_kernels.{ext} could not be loaded ({exc})"
    why = f"{why}; {fallback} (reinstall arpg-kernels against this torch to rebuild it)"
    warn_once(f"arpg: {why}")
    return why
