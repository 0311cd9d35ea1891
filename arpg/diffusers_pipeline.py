"""ARPG as a diffusers custom pipeline, on this project's engine (needs `diffusers`; `arpg.ARPGPipeline`
does not).

The original's quick start loads its pipeline code from the Hub; point `custom_pipeline` at this file
instead and the same call runs here:

    from diffusers import DiffusionPipeline
    import arpg.diffusers_pipeline as arpg_diffusers
    pipe = DiffusionPipeline.from_pretrained("hp-l33/ARPG", custom_pipeline=arpg_diffusers.__file__,
                                             trust_remote_code=True)   # recent diffusers ask for it
    image = pipe(model_type="ARPG-L", seed=0, num_steps=64, class_labels=[207, 360], cfg_scale=4)

The class keeps the original's name (`ARPGModel`, which the repository's model_index.json names) and
its call: keyword arguments with the original's names and defaults, returning the grid as one PIL
image. `model_filename` (a local file, or the published file of that name) and `vae_filename` choose
other weights, as in the original; `device` and `dtype` place the model (default: CUDA in bfloat16
when available, else the CPU in float32); every other keyword is `ARPGPipeline.__call__`'s. Models are
loaded on first use and kept for later calls. Unlike the original nothing is written unless
`output_dir` is given, and the progress bar shows unless `progress=False`.
"""

from __future__ import annotations

import os

try:
    from diffusers import DiffusionPipeline
except ImportError as e:  # pragma: no cover - exercised only without diffusers
    raise ImportError("arpg.diffusers_pipeline needs diffusers (pip install diffusers); "
                      "arpg.ARPGPipeline is the same pipeline without it") from e

from arpg import hub
from arpg.pipeline import ARPGPipeline

__all__ = ["ARPGModel"]


class ARPGModel(DiffusionPipeline):
    """The original ARPG custom pipeline's interface; see the module docstring."""

    def __init__(self):
        super().__init__()
        self._pipes: dict = {}

    def _pipeline(self, model_type, model_filename, vae_filename, device, dtype, revision) -> ARPGPipeline:
        key = (model_type, model_filename, vae_filename, str(device), str(dtype), revision)
        pipe = self._pipes.get(key)
        if pipe is None:
            vq = "VQ-16"
            if vae_filename is not None and vae_filename != hub.TOKENIZERS["VQ-16"].filename:
                if not os.path.isfile(vae_filename):
                    raise ValueError(f"vae_filename {vae_filename!r}: give a local file or "
                                     f"{hub.TOKENIZERS['VQ-16'].filename!r} (the published tokenizer)")
                vq = vae_filename
            checkpoint = None
            if model_filename is not None:
                published = {e.filename: n for n, e in hub.MODELS.items()}
                checkpoint = model_filename if os.path.isfile(model_filename) else published.get(model_filename)
                if checkpoint is None:
                    raise ValueError(f"model_filename {model_filename!r}: give a local file or one of the published "
                                     f"files {', '.join(sorted(published))}")
            pipe = ARPGPipeline.from_pretrained(model_type, checkpoint=checkpoint, vq=vq, device=device, dtype=dtype,
                                                revision=revision)
            self._pipes = {key: pipe}  # one model at a time: switching types frees the last one
        return pipe

    def __call__(self, *, model_type: str = "ARPG-XXL", model_filename=None, vae_filename=None, repo_id=None,
                 device=None, dtype=None, revision=None, **kwargs):
        """Sample the class labels' images and return their grid (a PIL image), as the original does."""
        if repo_id not in (None, hub.TOKENIZERS["VQ-16"].repo_id):
            raise ValueError(f"repo_id {repo_id!r}: the tokenizer comes from {hub.TOKENIZERS['VQ-16'].repo_id}; "
                             "pass a local vae_filename for another one")
        pipe = self._pipeline(model_type, model_filename, vae_filename, device, dtype, revision)
        return pipe(**kwargs).grid
