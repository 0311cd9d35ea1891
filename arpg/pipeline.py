"""`ARPGPipeline`: the original ARPG quick start (its diffusers custom pipeline) on this project's engine.

    pipe = arpg.ARPGPipeline.from_pretrained(model_type="ARPG-XL")
    out = pipe(seed=0, num_steps=64, class_labels=[207, 360, 388, 113], cfg_scale=4)
    out.show()            # the grid, as the original's return value; out.images: one PIL image per label

The call takes the original's arguments under the same names and with the same defaults (model_type
"ARPG-XXL", seed 6, 64 steps, CFG 4 constant, arccos, temperature 1, top-k 600, its eight class labels,
4 samples per row). Where it departs: nothing is written unless `output_dir` is given (the original
writes `../sampled_image.png`), and sample i draws from seed `sample_seeds(seed, N)[i]`, so its image
does not depend on the batch size or on the other labels. The weights come by name through the
Hugging Face cache (`arpg.hub`); steps run on the paged engine with CUDA graphs on a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from . import hub
from .checkpoint import load_checkpoint
from .engine import generate, sample_seeds
from .outputs import image_grid

__all__ = ["ARPGPipeline", "PipelineOutput", "DEFAULT_CLASS_LABELS"]

DEFAULT_CLASS_LABELS = (207, 360, 388, 113, 355, 980, 323, 979)  # the original pipeline's
GPU_BATCH, CPU_BATCH = 64, 8  # default images per engine call


@dataclass
class PipelineOutput:
    """images: one PIL image per label; grid: them in one image (what the original returns);
    tokens: int64 [N, g, g] when asked for; labels: the class labels."""

    images: list
    grid: object
    labels: list
    tokens: Optional[torch.Tensor] = None

    def show(self, *args, **kwargs):
        return self.grid.show(*args, **kwargs)

    def save(self, path, *args, **kwargs):
        return self.grid.save(path, *args, **kwargs)


class ARPGPipeline:
    """A model and its tokenizer; calling it samples class-conditional images."""

    def __init__(self, model, vq, model_type: Optional[str] = None):
        if vq.config.codebook_size != model.config.vocab_size:
            raise ValueError(f"the tokenizer has {vq.config.codebook_size} codes, the model's vocabulary "
                             f"{model.config.vocab_size}")
        self.model, self.vq, self.model_type = model, vq, model_type
        self._loaded: dict = {}

    @classmethod
    def from_pretrained(
        cls,
        model_type: str = "ARPG-XXL",
        *,
        checkpoint: Optional[str] = None,
        vq: str = "VQ-16",
        device: Union[str, torch.device, None] = None,
        dtype: Optional[torch.dtype] = None,
        revision: Optional[str] = None,
    ) -> "ARPGPipeline":
        """model_type: a name of `arpg.hub.MODELS`. checkpoint: a local file (or another published name) for
        that model type's weights instead of the published file (the original's `model_filename`).
        vq: a file or a published tokenizer name. device: default CUDA when available. dtype: default
        bfloat16 on CUDA, float32 on CPU. revision: the Hub revision of the published files."""
        found = hub.lookup(model_type, hub.MODELS)
        if found is None:
            raise ValueError(f"model_type {model_type!r}: choose from {', '.join(hub.MODELS)}")
        name, entry = found
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype if dtype is not None else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        from .vq import load_vq

        model = load_checkpoint(checkpoint or name, entry.config, dtype=dtype, device=device, revision=revision)
        tokenizer = load_vq(vq, device=device, revision=revision)
        pipe = cls(model, tokenizer, name)
        pipe._loaded = dict(device=device, dtype=dtype, revision=revision, vq=vq)
        return pipe

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def __call__(
        self,
        *,
        model_type: Optional[str] = None,
        seed: int = 6,
        num_steps: int = 64,
        class_labels: Sequence[int] = DEFAULT_CLASS_LABELS,
        cfg_scale: float = 4.0,
        cfg_schedule: str = "constant",
        sample_schedule: str = "arccos",
        temperature: float = 1.0,
        top_k: int = 600,
        top_p: float = 1.0,
        output_dir: Optional[str] = None,
        samples_per_row: int = 4,
        batch_size: Optional[int] = None,
        progress: bool = True,
        return_tokens: bool = False,
        write_labels: bool = False,
    ) -> PipelineOutput:
        """Sample one image per label. model_type: another published model loads it (as the original
        does per call). batch_size: images per engine call (default 64 on a GPU, 8 on a CPU); it does not
        change the images. output_dir: also write `sampled_image.png` (the grid) there. write_labels:
        the class label under each image of the grid."""
        if model_type is not None and model_type != self.model_type:
            if not self._loaded:
                raise ValueError(f"this pipeline holds {self.model_type or 'a model given to it'}; "
                                 f"build one with ARPGPipeline.from_pretrained(model_type={model_type!r})")
            other = ARPGPipeline.from_pretrained(model_type, **self._loaded)
            self.model, self.vq, self.model_type = other.model, other.vq, other.model_type
        config = self.model.config
        labels = [int(k) for k in class_labels]
        if not labels:
            raise ValueError("class_labels is empty")
        bad = [k for k in labels if not 0 <= k < config.num_classes]
        if bad:
            raise ValueError(f"class_labels {bad} not in [0, {config.num_classes})")
        if not 1 <= int(num_steps) <= config.seq_len:
            raise ValueError(f"num_steps {num_steps}: the {config.grid_size}x{config.grid_size} grid takes 1 to "
                             f"{config.seq_len} steps")
        if samples_per_row < 1:
            raise ValueError(f"samples_per_row must be >= 1, got {samples_per_row}")
        device = self.device
        batch = batch_size or (GPU_BATCH if device.type == "cuda" else CPU_BATCH)
        if batch < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        seeds = sample_seeds(seed, len(labels))
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(labels), unit="img", desc=f"ARPG {self.model_type or ''}".strip(), disable=None)
        tokens, images = [], []
        from .vq import to_uint8

        try:
            for start in range(0, len(labels), batch):
                chunk = torch.tensor(labels[start : start + batch], device=device)
                t = generate(self.model, chunk, int(num_steps), schedule=sample_schedule, cfg_scale=cfg_scale,
                             cfg_schedule=cfg_schedule, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=seeds[start : start + batch]).view(-1, config.grid_size, config.grid_size)
                tokens.append(t.cpu())
                images.append(to_uint8(self.vq.decode_codes(t).float()).cpu())
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        pixels = torch.cat(images).numpy()
        from PIL import Image

        grid = image_grid(pixels, samples_per_row, labels=labels if write_labels else None, background=0)
        if output_dir is not None:
            os.makedirs(output_dir, exist_ok=True)
            grid.save(os.path.join(output_dir, "sampled_image.png"))
        return PipelineOutput(images=[Image.fromarray(p) for p in pixels], grid=grid, labels=labels,
                              tokens=torch.cat(tokens) if return_tokens else None)
