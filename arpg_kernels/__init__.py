"""Fused attention ops for ARPG's randomized parallel decoding.

The ops are torch custom ops (`torch.ops.arpg.*`) with typed wrappers here; `PagedKVCache` owns
the paged K/V pools. Backends: `reference` (pure PyTorch, the CPU implementation), `triton`, and
`cuda` (the compiled `arpg_kernels._C`); see `set_backend`.
"""

from . import reference
from ._version import __version__
from .cache import CacheFullError, PagedKVCache, StepPlan
from .checks import set_checks, value_checks
from .ops import (
    BACKENDS,
    append_kv,
    append_kv_rope,
    attention,
    get_backend,
    merge_attention_states,
    paged_attention,
    resolve_backend,
    sample_tokens,
    set_backend,
    use_backend,
)

__all__ = [
    "BACKENDS",
    "__version__",
    "CacheFullError",
    "PagedKVCache",
    "StepPlan",
    "append_kv",
    "append_kv_rope",
    "attention",
    "get_backend",
    "merge_attention_states",
    "paged_attention",
    "reference",
    "resolve_backend",
    "sample_tokens",
    "set_backend",
    "set_checks",
    "use_backend",
    "value_checks",
]
