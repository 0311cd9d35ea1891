"""Triton backend: the same functions, signatures and semantics as `arpg_kernels.reference`.

Inputs arrive validated and `scale` resolved. Without a GPU the kernels run on CPU tensors under
TRITON_INTERPRET=1, which must be set before triton is first imported.
"""

from .append_kv import append_kv, append_kv_rope
from .attention import MAX_HEAD_DIM, attention_backward, attention_forward
from .merge import merge_attention_states
from .paged_attention import paged_attention
from .sample import sample_tokens


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supports(op: str, *tensors) -> bool:
    """Whether the kernels handle these inputs (the first tensor is q, or k for append_kv, or out_a).

    Attention needs a power-of-two head_dim in [16, 128] (the tiles are chosen, spill-free, up to 128)
    and paged attention a power-of-two page size; the other ops take any size. `resolve_backend` falls
    back to the reference otherwise.
    """
    if op in ("paged_attention", "attention_forward", "attention_backward"):
        d = tensors[0].shape[-1]
        if not (_pow2(d) and 16 <= d <= MAX_HEAD_DIM):
            return False
    if op == "paged_attention":
        return _pow2(tensors[1].shape[1])
    return True


__all__ = [
    "supports",
    "paged_attention",
    "append_kv",
    "append_kv_rope",
    "attention_forward",
    "attention_backward",
    "merge_attention_states",
    "sample_tokens",
]
