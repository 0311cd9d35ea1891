"""ARPG: randomized parallel autoregressive image generation on paged attention kernels.

`ARPG` (weight-compatible with the published checkpoints) and the raster baseline `RasterLM`, their
configs, the paged decoding engine (`generate`, `Engine`), the eager oracle (`eager_generate`) and
checkpoint I/O.
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import CONFIGS, RASTER_CONFIGS, ARPGConfig, find_multiple, get_config
from .eager import eager_generate
from .engine import Engine, Step, draw_order, generate, make_plan
from .model import ARPG, PagedBatch, apply_rope, precompute_rope_2d
from .raster import RasterLM
from .sampling import cfg_scales, filter_logits, sample, token_schedule

__all__ = [
    "ARPG",
    "ARPGConfig",
    "CONFIGS",
    "CheckpointError",
    "Engine",
    "PagedBatch",
    "RASTER_CONFIGS",
    "RasterLM",
    "Step",
    "apply_rope",
    "cfg_scales",
    "draw_order",
    "eager_generate",
    "filter_logits",
    "find_multiple",
    "generate",
    "get_config",
    "load_checkpoint",
    "make_plan",
    "precompute_rope_2d",
    "sample",
    "save_checkpoint",
    "token_schedule",
]
