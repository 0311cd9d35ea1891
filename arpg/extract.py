"""`arpg extract-codes`: images of an ImageFolder tree through the VQ tokenizer into training codes.

As LlamaGen's `extract_codes_c2i.py`, which made the codes the original ARPG trains on: each image is
center-cropped (ADM's `center_crop_arr`: halve with a box filter while the short side is at least
twice the target, then bicubic to the target, then crop the middle) and encoded with its augmentations:

- `flip`: the crop and its horizontal mirror (n_aug 2, LlamaGen's default);
- `ten-crop`: a center crop to `int(1.1 * image_size)`, then torchvision's TenCrop at `image_size`:
  the four corners and the center, then the same five of the mirrored image (n_aug 10);
- `none`: the crop alone (n_aug 1).

The output is the original's layout, `<out>/<label>/<image stem>.npy` of int64 `[1, n_aug, L]`, labels
numbered as ImageFolder does (class folders sorted by name), or with `layout="packed"` that layout
packed by `arpg.data_codes.pack_codes` into `<out>` (the loose files go to `<out>.loose`). Under torchrun
rank r encodes images r, r + world, ...; every file is written under a temporary name and renamed, and
an image whose file exists is skipped, so a killed extraction resumes where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["IMAGE_EXTENSIONS", "AUGMENTATIONS", "list_images", "center_crop_arr", "augmented_crops",
           "extract_codes", "main"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
AUGMENTATIONS = {"none": 1, "flip": 2, "ten-crop": 10}
TEN_CROP_RANGE = 1.1  # LlamaGen's --crop-range


class ExtractError(ValueError):
    """An image tree, tokenizer or output that extract-codes cannot use."""


def list_images(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """ImageFolder's listing: (path, label) sorted by class folder then file name, and the class names."""
    if not os.path.isdir(root):
        raise ExtractError(f"{root}: no such image folder")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    items = []
    for label, name in enumerate(classes):
        stems = {}
        for dirpath, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    stem = os.path.splitext(f)[0]
                    if stem in stems:
                        raise ExtractError(f"{os.path.join(dirpath, f)} and {stems[stem]} would both be "
                                           f"{name}/{stem}.npy; rename one")
                    stems[stem] = os.path.join(dirpath, f)
                    items.append((os.path.join(dirpath, f), label))
    if not items:
        raise ExtractError(f"{root}: no images in class folders (<class>/<image>{IMAGE_EXTENSIONS[0]}, ...)")
    return items, classes


def center_crop_arr(pil_image, image_size: int):
    """ADM's (and LlamaGen's) center crop of a PIL image to image_size x image_size."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def _five_crops(arr: np.ndarray, size: int) -> list[np.ndarray]:
    """torchvision's five_crop order: top-left, top-right, bottom-left, bottom-right, center."""
    h, w = arr.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (top, left)]
    return [arr[r : r + size, c : c + size] for r, c in corners]


def augmented_crops(path: str, image_size: int, aug: str) -> np.ndarray:
    """The n_aug crops of one image, uint8 [n_aug, image_size, image_size, 3] (see the module docstring)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            pil = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ExtractError(f"{path}: cannot read the image ({e})") from None
    if aug == "ten-crop":
        big = center_crop_arr(pil, int(image_size * TEN_CROP_RANGE))
        five = _five_crops(big, image_size)
        return np.stack(five + _five_crops(np.ascontiguousarray(big[:, ::-1]), image_size))
    crop = center_crop_arr(pil, image_size)
    return np.stack([crop, crop[:, ::-1]]) if aug == "flip" else crop[None]


def _save_atomic(path: str, arr: np.ndarray) -> None:
    # The temporary name must not end in .npy: a killed run's leftover would read as a sample.
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def extract_codes(
    images: str,
    out: str,
    vq,
    image_size: int = 256,
    aug: str = "flip",
    layout: str = "folder",
    batch_size: int = 16,
    progress: bool = False,
) -> int:
    """Encode every image of the ImageFolder tree `images` with the tokenizer `vq` (an `arpg.vq.VQModel`)
    into `out`; returns the number of images this rank encoded (the others existed already).

    Runs as one rank of the current torch.distributed group, if any. `batch_size` images (times n_aug
    crops) go through the tokenizer at once.
    """
    import torch.distributed as dist

    from .vq import from_uint8

    if aug not in AUGMENTATIONS:
        raise ExtractError(f"aug must be one of {list(AUGMENTATIONS)}, got {aug!r}")
    if layout not in ("folder", "packed"):
        raise ExtractError(f"layout must be 'folder' or 'packed', got {layout!r}")
    f = vq.downsample_factor
    if image_size < f or image_size % f:
        raise ExtractError(f"image_size {image_size} must be a positive multiple of the tokenizer's {f} pixels")
    if batch_size < 1:
        raise ExtractError(f"batch_size must be >= 1, got {batch_size}")
    if layout == "packed" and os.path.exists(out):
        raise ExtractError(f"{out}: already exists; the packed layout is written into a new folder")
    items, classes = list_images(images)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    loose = out + ".loose" if layout == "packed" else out
    for label in range(len(classes)):
        os.makedirs(os.path.join(loose, str(label)), exist_ok=True)
    mine = [(p, lab, os.path.join(loose, str(lab), os.path.splitext(os.path.basename(p))[0] + ".npy"))
            for i, (p, lab) in enumerate(items) if i % world == rank]
    todo = [m for m in mine if not os.path.exists(m[2])]
    device = next(vq.parameters()).device
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="img", desc="extracting", disable=None)
    n_aug = AUGMENTATIONS[aug]
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            crops = np.concatenate([augmented_crops(p, image_size, aug) for p, _, _ in batch])
            with torch.no_grad():
                codes = vq.encode(from_uint8(crops, device=device)).reshape(len(batch), 1, n_aug, -1).cpu()
            for (_, _, dst), c in zip(batch, codes.numpy().astype(np.int64)):
                _save_atomic(dst, c)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    if world > 1:
        dist.barrier()
    if layout == "packed" and rank == 0:
        import shutil

        from .data_codes import pack_codes

        pack_codes(loose, out, progress=progress)
        shutil.rmtree(loose)
    if world > 1:
        dist.barrier()
    return len(todo)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .vq import VQ_CONFIGS, VQCheckpointError, load_vq

    p = argparse.ArgumentParser(prog="arpg extract-codes", description=(
        "Encode an ImageFolder tree (<class>/<image>) with the VQ tokenizer into training codes, with "
        "LlamaGen's augmentations (flip, ten-crop). Resumable; under torchrun each rank takes its share."))
    p.add_argument("--images", required=True, help="ImageFolder root: one folder per class")
    p.add_argument("--out", required=True, help="code folder (<label>/<stem>.npy) or, with --layout packed, a packed folder")
    p.add_argument("--vq", default="VQ-16", help="tokenizer checkpoint, or the name VQ-16 (default)")
    p.add_argument("--vq-config", choices=sorted(VQ_CONFIGS), default="VQ-16")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--aug", choices=list(AUGMENTATIONS), default="flip")
    p.add_argument("--layout", choices=["folder", "packed"], default="folder")
    p.add_argument("--batch", type=int, default=16, help="images per tokenizer call")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cuda or cpu")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    from .distributed import exit_distributed, init_distributed

    _, _, device = init_distributed(None if a.device == "auto" else a.device)
    try:
        vq = load_vq(a.vq, config=VQ_CONFIGS[a.vq_config], device=device)
        done = extract_codes(a.images, a.out, vq, a.image_size, a.aug, a.layout, a.batch, progress=not a.no_progress)
    except (ExtractError, VQCheckpointError, FileNotFoundError, ValueError) as e:
        print(f"arpg extract-codes: error: {e}", file=sys.stderr)
        return exit_distributed(2)
    print(f"encoded {done:,} images into {a.out}", file=sys.stderr)
    return exit_distributed(0)
