"""Loading and saving ARPG (and raster baseline) weights: `.pt`/`.pth` and `.safetensors`.

`.pt` files are read with `torch.load(weights_only=True, map_location="cpu")`. The state dict sits
under one of `state_dict` (published ARPG files), `model` (training checkpoints, next to `ema`),
`module`, or `ema`, or is the file's top-level dict itself. `key="auto"` takes the first present of
`state_dict`, `model`, `module`, then `ema`, then the top level: the raw weights, never the EMA,
when both are there. Ask for `key="ema"` to get the EMA weights. A folder is an FSDP2 checkpoint of
`arpg train` (`torch.distributed.checkpoint` shards), read in one process, raw or EMA weights alike.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch

from .config import RASTER_CONFIGS, ARPGConfig, get_config
from .model import ARPG
from .raster import RasterLM

__all__ = ["load_checkpoint", "save_checkpoint", "load_state_dict_file", "from_original", "config_of_original",
           "CheckpointError", "AUTO_KEYS"]

AUTO_KEYS = ("state_dict", "model", "module", "ema")
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model (names or shapes), or that cannot be read."""


def _is_safetensors(path: str) -> bool:
    return str(path).endswith(".safetensors")


def _strip_prefixes(sd: dict) -> dict:
    out = {}
    for name, t in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if name.startswith(p):
                    name, changed = name[len(p) :], True
        out[name] = t
    return out


def load_state_dict_file(path: str, key: Optional[str] = "auto") -> tuple[dict, dict]:
    """Read a checkpoint file: returns (state dict with `module.` prefixes stripped, metadata).

    metadata holds `config` (a dict) and `arch` ("arpg" / "raster") when the file stored them.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    if os.path.isdir(path):
        return _read_distributed_checkpoint(path, key)
    try:
        return _read_state_dict_file(path, key)
    except CheckpointError:
        raise
    except Exception as exc:  # torch.load / safetensors of a damaged file raise almost anything
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {first}); "
                              "truncated, damaged or not a checkpoint?") from exc


def _read_distributed_checkpoint(path: str, key: Optional[str]) -> tuple[dict, dict]:
    """The weights of a `torch.distributed.checkpoint` folder written by `arpg train` with FSDP2
    (`trainer.pt` beside the shards holds the config), read in this one process."""
    trainer = os.path.join(path, "trainer.pt")
    if not (os.path.exists(os.path.join(path, ".metadata")) and os.path.exists(trainer)):
        raise CheckpointError(f"{path}: a folder, but not a checkpoint of arpg train (no .metadata and trainer.pt)")
    import torch.distributed.checkpoint as dcp

    state = torch.load(trainer, map_location="cpu", weights_only=True)
    meta = {"config": state["config"], "arch": state.get("arch", "arpg")}
    key = "model" if key in ("auto", None, "state_dict") else key
    if key not in ("model", "ema"):
        raise CheckpointError(f"{path}: holds 'model' and maybe 'ema' weights, not {key!r}")
    with torch.device("meta"):
        shapes = ARPG(ARPGConfig.from_dict(state["config"])).state_dict()
    sd = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in shapes.items()}
    import warnings

    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({key: sd}, checkpoint_id=path, no_dist=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: no {key!r} weights could be read ({type(exc).__name__}: {first})") from exc
    return sd, meta


def _read_state_dict_file(path: str, key: Optional[str]) -> tuple[dict, dict]:
    meta: dict = {}
    if _is_safetensors(path):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as f:
            raw_meta = f.metadata() or {}
        sd = load_file(path, device="cpu")
        if "config" in raw_meta:
            meta["config"] = json.loads(raw_meta["config"])
        if "arch" in raw_meta:
            meta["arch"] = raw_meta["arch"]
        return _strip_prefixes(sd), meta

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(obj).__name__}")
    for k in ("config", "arch"):
        if k in obj and not isinstance(obj[k], torch.Tensor):
            meta[k] = obj[k]
    if key == "auto":
        key = next((k for k in AUTO_KEYS if isinstance(obj.get(k), dict)), None)
    if key is None:
        sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if not sd:
            raise CheckpointError(f"{path}: no state dict found (looked for {list(AUTO_KEYS)} and top-level tensors)")
    else:
        if not isinstance(obj.get(key), dict):
            found = sorted(k for k, v in obj.items() if isinstance(v, dict))
            raise CheckpointError(f"{path}: no state dict under {key!r}; dict entries present: {found}")
        sd = obj[key]
    return _strip_prefixes(sd), meta


def _describe(names, limit: int = 20) -> str:
    names = sorted(names)
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check(model: torch.nn.Module, sd: dict, strict: bool, path: str) -> tuple[list[str], list[str]]:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
        for k in expected
        if k in sd and tuple(sd[k].shape) != expected[k]
    ]
    if wrong:
        raise CheckpointError(
            f"{path}: {len(wrong)} tensor(s) have the wrong shape for this config (wrong model size?):\n  "
            + "\n  ".join(wrong[:20])
            + (f"\n  ... (+{len(wrong) - 20} more)" if len(wrong) > 20 else "")
        )
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if strict and (missing or unexpected):
        lines = [f"{path}: the checkpoint does not match the model's parameter names"]
        if missing:
            lines.append(f"missing ({len(missing)}): {_describe(missing)}")
        if unexpected:
            lines.append(f"unexpected ({len(unexpected)}): {_describe(unexpected)}")
        raise CheckpointError("\n  ".join(lines))
    return missing, unexpected


def load_checkpoint(
    path: str,
    config_or_name: Union[ARPGConfig, str, None] = None,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device] = "cpu",
    strict: bool = True,
    key: Optional[str] = "auto",
    arch: Optional[str] = None,
    revision: Optional[str] = None,
) -> Union[ARPG, RasterLM]:
    """Build a model from a checkpoint file, or a published model by name, in eval mode.

    path: a file, or a name of `arpg.hub.MODELS` ("ARPG-L", "ARPG-XL", "ARPG-XXL"; an existing file of
    that name wins), fetched through the Hugging Face cache at `revision` (see `arpg.hub`).
    config_or_name: an `ARPGConfig` or a name from `CONFIGS`/`RASTER_CONFIGS`; None uses the config
    stored in the file by `save_checkpoint` (for a published name, that name's config). arch: "arpg" or "raster" (default: stored, else from the
    config name, else "arpg"). key: see the module docstring ("auto", a key, or None for a top-level
    state dict). Shape mismatches are always refused with the names and shapes; with strict (the
    default) missing and unexpected names are refused too, all listed in the error. dtype: cast the
    floating weights (default: as stored).
    """
    path = os.fspath(path)
    from . import hub

    path, entry = hub.resolve_name(path, hub.MODELS, "model", revision)
    if entry is not None and config_or_name is None:
        config_or_name = entry.config
    sd, meta = load_state_dict_file(path, key)
    if config_or_name is None:
        if "config" not in meta:
            raise CheckpointError(f"{path}: no config stored in the file; pass config_or_name")
        config = ARPGConfig.from_dict(meta["config"])
    else:
        config = get_config(config_or_name)
    if arch is None:
        if isinstance(config_or_name, str):
            arch = "raster" if config_or_name in RASTER_CONFIGS else "arpg"
        else:
            arch = meta.get("arch", "arpg")
    if arch not in ("arpg", "raster"):
        raise ValueError(f"arch must be 'arpg' or 'raster', got {arch!r}")
    cls = RasterLM if arch == "raster" else ARPG

    model = _build(cls, config, sd, strict, path)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.to(device=device).eval()


def _build(cls, config: ARPGConfig, sd: dict, strict: bool, source: str):
    """A model of `config` holding the tensors of `sd` themselves (no copy) after the name/shape check."""
    with torch.device("meta"):
        model = cls(config)
    missing, _ = _check(model, sd, strict, source)
    if missing:
        # Not strict: parameters absent from the file keep their fresh initialization.
        model = cls(config)
        model.load_state_dict(sd, strict=False)
    else:
        model.load_state_dict({k: sd[k] for k in model.state_dict()}, strict=True, assign=True)
    return model


def config_of_original(module: torch.nn.Module) -> ARPGConfig:
    """The `ARPGConfig` of a model of the original code, read from its `config` (the original's
    `ModelArgs`: dim, n_layer, n_head, vocab_size, num_classes, block_size, multiple_of, ...)."""
    args = getattr(module, "config", None)
    need = ("dim", "n_layer", "n_head", "vocab_size", "num_classes", "block_size")
    absent = [name for name in need if not hasattr(args, name)]
    if absent:
        raise CheckpointError(f"{type(module).__name__} has no original-style `config` with {absent}; "
                              "pass config= (an ARPGConfig or a config name)")
    if getattr(args, "ffn_dim_multiplier", None) is not None:
        raise CheckpointError(f"ffn_dim_multiplier={args.ffn_dim_multiplier}: the published models have None, "
                              "and this project's SwiGLU size assumes it")
    grid = int(round(args.block_size ** 0.5))
    if grid * grid != args.block_size:
        raise CheckpointError(f"block_size {args.block_size} is not a square grid of tokens")
    return ARPGConfig(
        dim=args.dim, n_layer=args.n_layer, n_head=args.n_head, vocab_size=args.vocab_size,
        num_classes=args.num_classes, grid_size=grid, rope_base=float(getattr(args, "rope_base", 10000.0)),
        norm_eps=float(getattr(args, "norm_eps", 1e-5)), class_dropout=float(getattr(args, "class_dropout_prob", 0.1)),
        ffn_multiple_of=int(getattr(args, "multiple_of", 256)),
    )


def from_original(module: torch.nn.Module, config: Union[ARPGConfig, str, None] = None) -> ARPG:
    """Our `ARPG` on the weights of a model of the original ARPG code (`models/arpg.py`'s Transformer),
    sharing them: the parameters are the module's tensors, not copies (so dtype and device are the
    module's, and a change to one shows in the other). A `module.` (DDP) or `_orig_mod.` (torch.compile)
    prefix is looked through. config: default read from the module (`config_of_original`). The names
    and shapes are checked strictly; the result is in eval mode and runs `generate`, `inpaint`, ...
    """
    config = config_of_original(module) if config is None else get_config(config)
    # keep_vars: the module's Parameter objects themselves, which load_state_dict(assign=True) adopts.
    sd = _strip_prefixes(module.state_dict(keep_vars=True))
    return _build(ARPG, config, sd, True, type(module).__name__).eval()


def save_checkpoint(model: Union[ARPG, RasterLM], path: str, key: str = "state_dict") -> None:
    """Write the weights and the config: `.safetensors` (config as JSON metadata) or `.pt` (a dict with
    the state dict under `key`, plus `config` and `arch`)."""
    arch = "raster" if isinstance(model, RasterLM) else "arpg"
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    if _is_safetensors(path):
        from safetensors.torch import save_file

        save_file(sd, path, metadata={"config": json.dumps(config), "arch": arch, "format": "pt"})
    else:
        torch.save({key: sd, "config": config, "arch": arch}, path)
