"""`arpg` command line: sample class-conditional images, inpaint and outpaint.

    arpg sample --ckpt arpg_l.pt --config ARPG-L --vq vq_ds16_c2i.pt --num-per-class 50 --npz out.npz
    arpg sample --ckpt digits --num-per-class 4 --png digits.png     (the shipped 8x8 digits model)
    torchrun --nproc_per_node 8 -m arpg.cli sample ...     (same images as one process)
    arpg inpaint --ckpt ... --vq ... --image in.png --box 4,4,12,12 --class 207 --png out.png
    arpg outpaint --ckpt ... --vq ... --image in.png --side right --class 207 --png out.png

Images go to a PNG grid and/or an `.npz` with `arr_0` uint8 [N, H, W, 3] (the ADM FID evaluator's
format) and `labels`; without a tokenizer (or with --tokens-only) the `.npz` holds the token grids
under `tokens` instead. A digits model (`arpg.digits`: its tokens are pixel values) needs no tokenizer:
its images are the pixels as grey levels (`arpg.digits.to_rgb`, [N, 8, 8, 3]), drawn 8x larger in the PNG.
Errors in the inputs (missing or mismatched checkpoint, bad image or mask, a device this machine lacks)
end with one line on stderr and exit status 2; --debug shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Optional

import numpy as np
import torch

from .checkpoint import CheckpointError, load_checkpoint
from .config import CONFIGS, RASTER_CONFIGS, get_config
from .digits import SHIPPED_CHECKPOINT, is_digits_config, save_grid, to_rgb
from . import hub
from .outputs import grid_columns, image_grid
from .vq import VQ_CONFIGS

__all__ = ["main", "build_parser", "CLIError"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CLIError(Exception):
    """A problem with the command's inputs, reported as one line (exit status 2)."""


# inputs ---------------------------------------------------------------------------------------


# Argument types: argparse reports their errors as "arpg <command>: error: argument --x: <message>".


def _int_list(n: Optional[int] = None):
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip() != ""]
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
        if n is not None and len(values) != n:
            raise argparse.ArgumentTypeError(f"needs {n} comma-separated integers, got {text!r}")
        return values

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def _device_name(text: str) -> str:
    """auto, cpu, cuda, cuda:N, ...: checked here, so a missing GPU is not reported as a bad checkpoint."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine; use --device cpu "
                                             "(or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            valid = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s); use {valid}")
    return text


def _checkpoint_file(expected: str):
    """A type that accepts an existing file whose first bytes are a torch file's (zip, or a legacy pickle)
    or, where `expected` names it, a safetensors file's (8-byte little-endian header length, then `{`)."""
    safetensors = ".safetensors" in expected

    def check(path: str) -> str:
        if not os.path.isfile(path):
            raise argparse.ArgumentTypeError(f"{path}: no such file (expected {expected})")
        with open(path, "rb") as f:
            head = f.read(9)
        torch_file = head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"
        safetensors_file = (safetensors and len(head) == 9 and head[8:] == b"{"
                            and 8 + int.from_bytes(head[:8], "little") <= os.path.getsize(path))
        if not (torch_file or safetensors_file):
            raise argparse.ArgumentTypeError(f"{path} is not a checkpoint (expected {expected})")
        return path

    return check


_model_file = _checkpoint_file("a torch .pt/.pth or .safetensors file, `digits`, or a published model: "
                               + ", ".join(hub.MODELS))


def _model_checkpoint(text: str) -> str:
    """A file, `digits`, or a published model name (fetched when the model is loaded)."""
    if text == "digits":
        return SHIPPED_CHECKPOINT
    found = None if os.path.exists(text) else hub.lookup(text, hub.MODELS)
    return found[0] if found else _model_file(text)


_vq_file = _checkpoint_file("a torch .pt/.pth file, or a published tokenizer: " + ", ".join(hub.TOKENIZERS))


def _vq_checkpoint(text: str) -> str:
    found = None if os.path.exists(text) else hub.lookup(text, hub.TOKENIZERS)
    return found[0] if found else _vq_file(text)


# Options whose value is a comma-separated list of integers; see _attach_negative_lists.
_INT_LIST_OPTIONS = ("--box", "--canvas", "--classes")


def _attach_negative_lists(argv: list[str]) -> list[str]:
    """`--box -1,0,4,4` -> `--box=-1,0,4,4`: argparse takes a value starting with '-' that is not a plain
    number for an option, and would report "expected one argument" instead of the range check's message."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in _INT_LIST_OPTIONS and i + 1 < len(argv) and re.match(r"-\d", argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _device(args) -> torch.device:
    if args.device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def _dtype(args, device: torch.device) -> torch.dtype:
    if args.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[args.dtype]


def _stored_config(path: str) -> Optional[dict]:
    """The config `save_checkpoint` stored in the file, read without loading the tensors (None if absent)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
            return json.loads(meta["config"]) if "config" in meta else None
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable here: load_checkpoint reports it
        return None
    config = obj.get("config") if isinstance(obj, dict) else None
    return config if isinstance(config, dict) else None


def _load_model(args, device, dtype):
    stored = _stored_config(args.ckpt) if args.config else None
    if stored is not None:
        # Sizes the weights do not show (grid_size, rope_base, ...) must agree too.
        want = get_config(args.config).architecture()
        diff = [f"{k} {stored[k]} vs {want[k]}" for k in want if k in stored and stored[k] != want[k]]
        if diff:
            raise CLIError(f"{args.ckpt} was saved with another config than --config {args.config}: "
                           f"{', '.join(diff)} (checkpoint vs --config)")
    try:
        return load_checkpoint(args.ckpt, args.config, dtype=dtype, device=device, revision=args.revision)
    except CheckpointError as e:
        hint = " (pass --config)" if "no config stored" in str(e) else ""
        raise CLIError(f"{e}{hint}") from e
    except Exception as e:  # torch.load of a damaged file raises almost anything
        raise CLIError(f"{args.ckpt}: cannot read the checkpoint ({type(e).__name__}: {e})") from e


def _load_vq(args, model, device):
    from .vq import VQCheckpointError, load_vq

    try:
        vq = load_vq(args.vq, VQ_CONFIGS[args.vq_config] if args.vq_config else None, device=device,
                     revision=args.revision)
    except hub.HubError as e:
        raise CLIError(str(e)) from e
    except VQCheckpointError as e:
        problems = "; ".join(line.strip() for line in str(e).splitlines()[1:]) or str(e)
        raise CLIError(f"{args.vq} does not fit --vq-config {args.vq_config or 'VQ-16'}: {problems}") from e
    except Exception as e:
        raise CLIError(f"{args.vq}: cannot read the tokenizer checkpoint ({type(e).__name__}: {e})") from e
    if vq.config.codebook_size != model.config.vocab_size:
        raise CLIError(
            f"the tokenizer's codebook has {vq.config.codebook_size} codes but the model's vocabulary has "
            f"{model.config.vocab_size}"
        )
    return vq


def _decoder(vq):
    """tokens [b, h, w] -> uint8 images [b, f*h, f*w, 3] (numpy)."""
    from .vq import to_uint8

    def decode(tokens: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return to_uint8(vq.decode_codes(tokens)).cpu().numpy()

    return decode


def _read_image(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise CLIError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise CLIError(f"{path}: cannot read the image: {e}") from e


def _center_resize(arr: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    """Center-crop to the aspect of size (h, w), then resize to it."""
    from PIL import Image

    h, w = arr.shape[:2]
    th, tw = size
    scale = min(h / th, w / tw)
    ch, cw = round(th * scale), round(tw * scale)
    top, left = (h - ch) // 2, (w - cw) // 2
    im = Image.fromarray(arr[top : top + ch, left : left + cw])
    return np.asarray(im.resize((tw, th), resample))


def _save_png(images: np.ndarray, path: str, nrow: Optional[int] = None, labels=None) -> None:
    """uint8 [N, H, W, 3] -> one grid image, with the labels under the images when given."""
    _parent(path)
    image_grid(images, nrow, labels=labels).save(path)


def _parent(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)


def _gen_kwargs(args) -> dict:
    return dict(
        schedule=args.schedule,
        cfg_scale=args.cfg,
        cfg_schedule=args.cfg_schedule,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )


# commands -------------------------------------------------------------------------------------


def _cmd_sample(args) -> int:
    from .distributed import class_labels, exit_distributed, init_distributed, sample_distributed

    if not (args.png or args.npz):
        raise CLIError("nothing to write: give --png and/or --npz")
    if args.num_images is not None and args.num_per_class is not None:
        raise CLIError("give --num-per-class or --num-images, not both")
    if args.classes is None and args.num_images is None and args.num_per_class is None:
        raise CLIError("say what to sample: give --classes, --num-per-class and/or --num-images")
    _default_vq(args, required=False)
    rank, world, device = init_distributed(_device(args))
    try:
        model = _load_model(args, device, _dtype(args, device))
        c = model.config
        # A digits model's tokens are pixels: they are images without a tokenizer.
        digits = args.vq is None and not args.tokens_only and is_digits_config(c)
        tokens_only = args.tokens_only or (args.vq is None and not digits)
        if tokens_only and args.png:
            raise CLIError("--png needs images: give --vq (and drop --tokens-only)")
        classes = args.classes if args.classes is not None else list(range(c.num_classes))
        bad = [k for k in classes if not 0 <= k < c.num_classes]
        if bad:
            raise CLIError(f"--classes: {bad} not in [0, {c.num_classes})")
        labels = class_labels(classes, args.num_per_class, args.num_images)
        if not labels:
            raise CLIError("no images to sample")
        if digits:
            decode = to_rgb
        else:
            decode = None if tokens_only else _decoder(_load_vq(args, model, device))
        raster = getattr(model, "decode_order", "random") == "raster"
        if not raster and not 1 <= args.steps <= c.seq_len:
            raise CLIError(f"--steps {args.steps}: the model's {c.grid_size}x{c.grid_size} grid takes 1 to "
                           f"{c.seq_len} steps")
        result = sample_distributed(
            model,
            labels,
            None if raster else args.steps,
            args.batch,
            seed=args.seed,
            decode=decode,
            progress=not args.no_progress,
            **_gen_kwargs(args),
        )
        if rank == 0:
            _write(args, result, np.asarray(labels, dtype=np.int64), tokens_only, digits)
    except BaseException:
        if world > 1:
            torch.distributed.destroy_process_group()
        raise
    # Under torchrun every rank meets the others after rank 0 has written, tears gloo down and exits past the
    # interpreter's teardown, which gloo's threads can abort ("terminate called without an active exception":
    # a rank of test_two_gloo_processes_match_one aborted so in CI twice); alone, this returns 0.
    return exit_distributed(0)


def _write(args, result: np.ndarray, labels: np.ndarray, tokens_only: bool, digits: bool) -> None:
    if args.npz:
        _parent(args.npz)
        if tokens_only:
            np.savez(args.npz, tokens=result, labels=labels)
        else:
            np.savez(args.npz, arr_0=result, labels=labels)
        print(f"wrote {args.npz} ({len(result)} {'token grids' if tokens_only else 'images'})", file=sys.stderr)
    if args.png:
        if digits:  # 8x8-pixel images: drawn 8x larger, on grey, so the white paper of each digit shows
            cols = grid_columns(len(result), args.nrow)
            save_grid([list(result[i : i + cols]) for i in range(0, len(result), cols)], args.png, scale=8)
        else:
            _save_png(result, args.png, args.nrow, labels=None if args.no_labels else [int(k) for k in labels])
        print(f"wrote {args.png}", file=sys.stderr)


def _default_vq(args, required: bool) -> None:
    """A published model comes with its published tokenizer unless --vq says otherwise."""
    if args.vq is None and args.ckpt in hub.MODELS and not getattr(args, "tokens_only", False):
        args.vq = "VQ-16"
    if required and args.vq is None:
        raise CLIError(f"{args.command} needs the tokenizer: give --vq (a file, or {', '.join(hub.TOKENIZERS)})")


def _load_edit(args):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CLIError(f"{args.command} runs in one process; launch it without torchrun")
    _default_vq(args, required=True)
    if not (args.png or args.npz):
        raise CLIError("nothing to write: give --png and/or --npz")
    device = _device(args)
    model = _load_model(args, device, _dtype(args, device))
    from .model import ARPG

    if not isinstance(model, ARPG):
        raise CLIError(f"{args.command} needs an ARPG checkpoint (the raster model cannot fill arbitrary positions)")
    if not 0 <= args.label < model.config.num_classes and args.label != -1:
        raise CLIError(f"--class {args.label} not in [0, {model.config.num_classes}) (or -1: unconditional)")
    vq = _load_vq(args, model, device)
    return model, vq, device


def _encode(vq, arr: np.ndarray, device) -> torch.Tensor:
    from .vq import from_uint8

    with torch.no_grad():
        return vq.encode(from_uint8(arr, device=device))[0]


def _run_edit(args, vq, edit, known_shape) -> np.ndarray:
    """Run `edit(labels, seed)` for args.num samples in batches; returns uint8 images [num, H, W, 3]."""
    from tqdm import tqdm

    from .distributed import batch_seed

    decode = _decoder(vq)
    out = []
    with tqdm(total=args.num, desc=args.command, unit="img", disable=args.no_progress or None) as bar:
        for i, start in enumerate(range(0, args.num, args.batch)):
            n = min(args.batch, args.num - start)
            tokens = edit(torch.full((n,), args.label, dtype=torch.long), batch_seed(args.seed, i))
            out.append(decode(tokens.view(n, *known_shape)))
            bar.update(n)
    return np.concatenate(out)


def _cmd_inpaint(args) -> int:
    from .edit import inpaint

    model, vq, device = _load_edit(args)
    g, f = model.config.grid_size, vq.downsample_factor
    size = g * f
    image = _read_image(args.image)
    crop = image.shape[:2] != (size, size)
    if crop and not args.resize:
        raise CLIError(f"{args.image} is {image.shape[1]}x{image.shape[0]} pixels; the model makes {size}x{size} "
                       "(pass --resize to center-crop and resize it)")
    if crop:
        from PIL import Image

        image = _center_resize(image, (size, size), Image.BICUBIC)
    regen = _token_mask(args, image.shape[:2], g, f, crop)
    tokens = _encode(vq, image, device).reshape(1, -1)
    known = ~regen.reshape(-1).to(device)

    def edit(labels, seed):
        return inpaint(model, tokens.expand(len(labels), -1), known, labels, args.steps, seed=seed, **_gen_kwargs(args))

    result = _run_edit(args, vq, edit, (g, g))
    shown = image.copy()
    shown[np.kron(regen.numpy(), np.ones((f, f), dtype=bool))] //= 3  # darken the regenerated region
    _write_edit(args, shown, result)
    return 0


def _token_mask(args, image_hw: tuple[int, int], g: int, f: int, resized: bool) -> torch.Tensor:
    """bool [g, g]: the tokens to regenerate, from --mask or --box."""
    if (args.mask is None) == (args.box is None):
        raise CLIError("give exactly one of --mask and --box")
    if args.box is not None:
        r0, c0, r1, c1 = args.box
        limit = g if args.box_units == "tokens" else g * f
        if not (0 <= r0 < r1 <= limit and 0 <= c0 < c1 <= limit):
            raise CLIError(f"--box {r0},{c0},{r1},{c1}: need 0 <= r0 < r1 <= {limit} and 0 <= c0 < c1 <= {limit} "
                           f"({args.box_units})")
        if args.box_units == "pixels":  # every token the box touches
            r0, c0, r1, c1 = r0 // f, c0 // f, -(-r1 // f), -(-c1 // f)
        regen = torch.zeros(g, g, dtype=torch.bool)
        regen[r0:r1, c0:c1] = True
        return regen
    from PIL import Image

    if not os.path.isfile(args.mask):
        raise CLIError(f"mask not found: {args.mask}")
    try:
        with Image.open(args.mask) as im:
            mask = np.array(im.convert("L"))
    except OSError as e:
        raise CLIError(f"{args.mask}: cannot read the mask: {e}") from e
    if resized:
        mask = _center_resize(mask, image_hw, Image.NEAREST)
    if mask.shape != tuple(image_hw):
        raise CLIError(f"the mask is {mask.shape[1]}x{mask.shape[0]} pixels but the image is "
                       f"{image_hw[1]}x{image_hw[0]}")
    marked = torch.from_numpy(mask > 127)
    if not marked.any():
        raise CLIError(f"{args.mask} marks no pixel to regenerate (white = regenerate, black = keep)")
    return marked.view(g, f, g, f).any(dim=3).any(dim=1)


def _cmd_outpaint(args) -> int:
    from .edit import outpaint

    model, vq, device = _load_edit(args)
    g, f = model.config.grid_size, vq.downsample_factor
    image = _read_image(args.image)
    if args.resize:
        from PIL import Image

        image = _center_resize(image, (g * f, g * f), Image.BICUBIC)
    ih, iw = image.shape[:2]
    if ih % f or iw % f:
        raise CLIError(f"{args.image} is {iw}x{ih} pixels; outpainting needs sides that are multiples of {f} "
                       "(or pass --resize)")
    h, w = ih // f, iw // f
    default = {"left": (h, 2 * w), "right": (h, 2 * w), "top": (2 * h, w), "bottom": (2 * h, w), "center": (2 * h, 2 * w)}
    rows, cols = args.canvas if args.canvas is not None else default[args.side]
    if rows < h or cols < w:
        raise CLIError(f"--canvas {rows},{cols} is smaller than the {h}x{w}-token image")
    r, c = {
        "left": ((rows - h) // 2, cols - w),
        "right": ((rows - h) // 2, 0),
        "top": (rows - h, (cols - w) // 2),
        "bottom": (0, (cols - w) // 2),
        "center": ((rows - h) // 2, (cols - w) // 2),
    }[args.side]
    tile = _encode(vq, image, device)[None]

    def edit(labels, seed):
        return outpaint(model, tile.expand(len(labels), -1, -1), (rows, cols), (r, c), labels, args.steps, seed=seed,
                        **_gen_kwargs(args))

    result = _run_edit(args, vq, edit, (rows, cols))
    shown = np.zeros_like(result[0])
    shown[r * f : r * f + ih, c * f : c * f + iw] = image
    _write_edit(args, shown, result)
    return 0


def _write_edit(args, shown: np.ndarray, result: np.ndarray) -> None:
    """The npz holds the results; the PNG shows the input (what is kept) first, then the results."""
    if args.npz:
        _parent(args.npz)
        np.savez(args.npz, arr_0=result, labels=np.full(len(result), args.label, dtype=np.int64))
        print(f"wrote {args.npz} ({len(result)} images)", file=sys.stderr)
    if args.png:
        _save_png(np.concatenate([shown[None], result]), args.png, args.nrow)
        print(f"wrote {args.png}", file=sys.stderr)


# parser ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arpg", description="ARPG image generation, inpainting and outpainting.")
    sub = parser.add_subparsers(dest="command", required=True)
    configs = sorted(CONFIGS) + sorted(RASTER_CONFIGS)

    def common(p):
        p.add_argument("--ckpt", "--model", dest="ckpt", required=True, type=_model_checkpoint,
                       help="model checkpoint (.pt / .pth / .safetensors), `digits` (the shipped digits model), "
                            f"or a published model fetched through the Hugging Face cache: {', '.join(hub.MODELS)}")
        p.add_argument("--config", choices=configs, default=None, metavar="NAME",
                       help=f"model config: {', '.join(configs)} (default: the config stored in the checkpoint)")
        p.add_argument("--vq", default=None, type=_vq_checkpoint,
                       help="VQ tokenizer checkpoint (vq_ds16_c2i.pt), or VQ-16 (fetched; the default with a "
                            "published model)")
        p.add_argument("--revision", default=None,
                       help="Hub revision (branch, tag or commit) of a published model and tokenizer (default main)")
        p.add_argument("--vq-config", choices=sorted(VQ_CONFIGS), default=None,
                       help="tokenizer config (default VQ-16, LlamaGen's vq_ds16_c2i.pt; for a published tokenizer "
                            "name, that tokenizer's)")
        p.add_argument("--steps", type=_positive_int, default=64, help="decoding steps (default 64)")
        p.add_argument("--schedule", choices=["arccos", "cosine"], default="arccos")
        p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (1 = off; default 4)")
        p.add_argument("--cfg-schedule", choices=["constant", "linear"], default="constant")
        p.add_argument("--temperature", type=float, default=1.0)
        p.add_argument("--top-k", type=int, default=0, help="0 = off")
        p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
        p.add_argument("--seed", type=int, default=0,
                       help="images depend on the seed and --batch (batch i uses a seed derived from (seed, i))")
        p.add_argument("--batch", type=_positive_int, default=32, help="images per batch (default 32)")
        p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                       help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
        p.add_argument("--device", type=_device_name, default="auto",
                       help="auto (CUDA when available), cuda, cuda:1, cpu")
        p.add_argument("--png", default=None, help="write an image grid here")
        p.add_argument("--npz", default=None, help="write the images here (arr_0 uint8 [N, H, W, 3], labels)")
        p.add_argument("--nrow", type=_positive_int, default=None, help="images per row of the PNG grid")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")

    p = sub.add_parser("sample", help="class-conditional samples (torchrun-aware)",
                       description="Class-conditional samples. Say what to sample with at least one of --classes, "
                                   "--num-per-class and --num-images.")
    common(p)
    p.add_argument("--classes", type=_int_list(), default=None,
                   help="comma-separated class labels (default with --num-per-class or --num-images: all classes)")
    p.add_argument("--num-per-class", type=_positive_int, default=None,
                   help="images per class (default with --classes: 1)")
    p.add_argument("--num-images", type=_positive_int, default=None,
                   help="images in all, spread evenly over the classes")
    p.add_argument("--tokens-only", action="store_true", help="write token grids (npz key `tokens`), no images")
    p.add_argument("--no-labels", action="store_true", help="no class labels under the images of the PNG grid")
    p.set_defaults(func=_cmd_sample)

    def edit_common(p):
        common(p)
        p.add_argument("--image", required=True, help="input image (PNG, JPEG, ...)")
        p.add_argument("--class", dest="label", type=int, required=True, help="class label (-1: unconditional)")
        p.add_argument("--num", type=_positive_int, default=4, help="samples to make (default 4)")
        p.add_argument("--resize", action="store_true",
                       help="center-crop and resize the image to the model's resolution")

    p = sub.add_parser("inpaint", help="regenerate a region of an image")
    edit_common(p)
    p.add_argument("--mask", default=None, help="mask image of the input's size: white (> 127) = regenerate")
    p.add_argument("--box", type=_int_list(4), default=None,
                   help="r0,c0,r1,c1: regenerate rows r0..r1-1, columns c0..c1-1 (see --box-units)")
    p.add_argument("--box-units", choices=["tokens", "pixels"], default="tokens",
                   help="units of --box: tokens (default) or pixels (every token the box touches)")
    p.set_defaults(func=_cmd_inpaint)

    p = sub.add_parser("outpaint", help="extend an image beyond its borders")
    edit_common(p)
    p.add_argument("--side", choices=["left", "right", "top", "bottom", "center"], required=True,
                   help="where to add content (center: all around the image)")
    p.add_argument("--canvas", type=_int_list(2), default=None,
                   help="H,W of the result in tokens (default: twice the image along the side's axis)")
    p.set_defaults(func=_cmd_outpaint)

    # These have their own parsers (arpg.train, arpg.digits); `main` hands them the rest of the command line.
    sub.add_parser("train", add_help=False, help="train an ARPG on token codes (torchrun: DDP or FSDP2)")
    sub.add_parser("pack-codes", add_help=False, help="pack a code folder into memory-mapped shards")
    sub.add_parser("extract-codes", add_help=False, help="encode an ImageFolder tree into training codes")
    sub.add_parser("export-weights", add_help=False, help="write the original's {'model': ...} from a checkpoint")
    sub.add_parser("train-digits", add_help=False, help="train the small ARPG on scikit-learn's digits")
    sub.add_parser("eval-digits", add_help=False, help="measure the digits model against an independent judge")
    return parser


_OWN_PARSERS = {
    "train": ("train", "main"),
    "pack-codes": ("train", "pack_main"),
    "export-weights": ("train", "export_main"),
    "extract-codes": ("extract", "main"),
    "train-digits": ("digits", "train_main"),
    "eval-digits": ("digits", "eval_main"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _OWN_PARSERS:
        import importlib

        module, func = _OWN_PARSERS[argv[0]]
        return getattr(importlib.import_module(f"arpg.{module}"), func)(argv[1:])
    parser = build_parser()
    args = parser.parse_args(_attach_negative_lists(argv))
    try:
        return args.func(args)
    except (CLIError, ValueError) as e:
        if args.debug:
            raise
        parser.exit(2, f"arpg {args.command}: error: {_one_line(str(e) or type(e).__name__)}\n")


def _one_line(message: str, limit: int = 400) -> str:
    """A multi-line message (say, a list of mismatched tensors) joined into one line of at most ~limit chars."""
    line = "; ".join(part.strip() for part in message.strip().splitlines() if part.strip()).replace(":;", ":")
    return line if len(line) <= limit else line[:limit].rstrip() + " ... (--debug shows all)"

if __name__ == "__main__":
    sys.exit(main())
