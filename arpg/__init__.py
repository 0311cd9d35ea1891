"""ARPG: randomized parallel autoregressive image generation on paged attention kernels.

`ARPG` (weight-compatible with the published checkpoints) and the raster baseline `RasterLM`, their
configs, the paged decoding engine (`generate`, `Engine`), editing on the same engine (`inpaint`,
`outpaint`, `expand`), many callers at once (`GenerationQueue`, continuous batching; `set_cache_budget`),
the eager oracle (`eager_generate`) and checkpoint I/O. The command line is
`arpg.cli` (multi-process sampling: `arpg.distributed`). Training: `arpg.train` (`arpg train`: one process
or torchrun, DDP or FSDP2), its datasets `arpg.data_codes`, and `arpg.extract` (`arpg extract-codes`).
"""

from arpg_kernels import __version__

from .checkpoint import CheckpointError, from_original, load_checkpoint, save_checkpoint
from .config import CONFIGS, RASTER_CONFIGS, ARPGConfig, find_multiple, get_config
from .eager import eager_generate
from .edit import expand, inpaint, outpaint
from .engine import CacheBudgetError, Engine, Step, draw_order, generate, make_plan, sample_seeds, set_cache_budget
from .model import ARPG, PagedBatch, apply_rope, precompute_rope_2d
from .pipeline import ARPGPipeline
from .raster import RasterLM
from .serving import GenerationQueue, QueueClosedError, QueueFullError, RequestError
from .sampling import cfg_scales, filter_logits, guide, sample, token_schedule

__all__ = [
    "ARPG",
    "ARPGConfig",
    "ARPGPipeline",
    "CONFIGS",
    "CacheBudgetError",
    "CheckpointError",
    "Engine",
    "GenerationQueue",
    "PagedBatch",
    "QueueClosedError",
    "QueueFullError",
    "RASTER_CONFIGS",
    "RasterLM",
    "RequestError",
    "__version__",
    "Step",
    "apply_rope",
    "cfg_scales",
    "guide",
    "draw_order",
    "eager_generate",
    "expand",
    "from_original",
    "filter_logits",
    "find_multiple",
    "generate",
    "get_config",
    "inpaint",
    "load_checkpoint",
    "make_plan",
    "outpaint",
    "precompute_rope_2d",
    "sample",
    "sample_seeds",
    "save_checkpoint",
    "set_cache_budget",
    "token_schedule",
]
