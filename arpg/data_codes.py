"""Token-code datasets for training: the original's folder layout, a packed layout of our own, tensors.

Every dataset holds N samples of `n_aug` augmentations (flip, ten-crop, ...) of `seq_len` codes each,
and a class label per sample. `read(indices, picks)` returns the codes of one augmentation per sample
(augmentation `pick % n_aug_i`, so a sample with fewer augmentations still gets a valid one) as int64
[b, seq_len] and the labels as int64 [b].

- `CodeFolder`: the original's layout, read as is: `<root>/<class>/<name>.npy`, one file per image
  holding int codes `[1, n_aug, L]` (also accepted: `[n_aug, L]` or `[L]`), class folders named by
  their integer label. Files are listed once, sorted, so the sample order is the same on every rank.
- `PackedCodes`: `<root>/meta.json` plus shards `codes-00000.npy` (uint16 or int32 `[n, n_aug, L]`)
  and `labels-00000.npy` (int64 `[n]`), memory-mapped: a run opens a few files, not 1.28 million.
  `pack_codes(src, dst)` (command `arpg pack-codes`) writes it from a `CodeFolder`.
- `TensorCodes`: codes already in memory (the digits data).

`open_codes(path)` opens either layout. Bad input raises `CodeDataError` (a ValueError) naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["CodeDataError", "CodeFolder", "PackedCodes", "TensorCodes", "open_codes", "pack_codes"]

PACKED_FORMAT = "arpg-packed-codes-v1"


class CodeDataError(ValueError):
    """A code dataset that is missing, empty, or does not fit the model (lengths, labels, values)."""


def _as_aug_rows(arr: np.ndarray, path: str, seq_len: Optional[int]) -> np.ndarray:
    """One file's codes as [n_aug, L]."""
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    elif arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[0] < 1:
        raise CodeDataError(f"{path}: codes of shape {tuple(arr.shape)}; expected [1, n_aug, L], [n_aug, L] or [L]")
    if not np.issubdtype(arr.dtype, np.integer):
        raise CodeDataError(f"{path}: codes of dtype {arr.dtype}; expected integers")
    if seq_len is not None and arr.shape[1] != seq_len:
        raise CodeDataError(f"{path}: {arr.shape[1]} codes per image, the model expects {seq_len} "
                            f"(grid_size**2; another tokenizer or resolution?)")
    return arr


class _Codes:
    seq_len: int
    n_aug: int
    num_classes: Optional[int]  # the labels' bound when the layout says it, else None

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, indices: np.ndarray, picks: Optional[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def check(self, seq_len: int, vocab_size: int, num_classes: int) -> None:
        """Refuse a dataset that does not fit the model: lengths, labels (and values, where cheap)."""
        if len(self) == 0:
            raise CodeDataError(f"{self.source}: no samples")
        if self.seq_len != seq_len:
            raise CodeDataError(f"{self.source}: {self.seq_len} codes per image, the model expects {seq_len} "
                                f"(grid_size**2; another tokenizer or resolution?)")
        lo, hi = self.label_range()
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise CodeDataError(f"{self.source}: label {bad} out of range for a model of {num_classes} classes")
        self.vocab_size = vocab_size

    def _check_values(self, codes: np.ndarray, where) -> None:
        vocab = getattr(self, "vocab_size", None)
        if vocab is not None and codes.size and (codes.min() < 0 or codes.max() >= vocab):
            bad = int(codes.min()) if codes.min() < 0 else int(codes.max())
            raise CodeDataError(f"{where}: code {bad} out of range for a vocabulary of {vocab}")


class TensorCodes(_Codes):
    """Codes int [N, L] or [N, n_aug, L] and labels int [N], in memory."""

    def __init__(self, codes: torch.Tensor, labels: torch.Tensor, source: str = "tensors"):
        codes = torch.as_tensor(codes)
        if codes.dim() == 2:
            codes = codes[:, None]
        if codes.dim() != 3 or labels.shape != (codes.shape[0],):
            raise CodeDataError(f"{source}: codes {tuple(codes.shape)} and labels {tuple(labels.shape)} "
                                "do not pair up ([N, L] or [N, n_aug, L] and [N])")
        self.codes, self.labels, self.source = codes.long(), torch.as_tensor(labels).long(), source
        self.seq_len, self.n_aug, self.num_classes = codes.shape[2], codes.shape[1], None

    def __len__(self) -> int:
        return self.codes.shape[0]

    def label_range(self) -> tuple[int, int]:
        return int(self.labels.min()), int(self.labels.max())

    def read(self, indices, picks):
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        aug = torch.zeros_like(idx) if picks is None else torch.as_tensor(np.asarray(picks) % self.n_aug)
        codes = self.codes[idx, aug]
        self._check_values(codes.numpy(), self.source)
        return codes, self.labels[idx]


class CodeFolder(_Codes):
    """The original's layout: `<root>/<class>/<name>.npy` (see the module docstring)."""

    def __init__(self, root: str):
        self.source = root
        if not os.path.isdir(root):
            raise CodeDataError(f"{root}: no such code folder" if not os.path.exists(root) else
                                f"{root}: not a folder of class folders")
        files, labels = [], []
        for name in sorted(os.listdir(root)):
            sub = os.path.join(root, name)
            if not os.path.isdir(sub):
                continue
            try:
                label = int(name)
            except ValueError:
                raise CodeDataError(f"{sub}: class folders must be named by their integer label") from None
            for dirpath, _, fnames in sorted(os.walk(sub, followlinks=True)):
                for f in sorted(fnames):
                    if f.endswith(".npy") and ".tmp" not in f:  # not a killed writer's leftover
                        files.append(os.path.join(dirpath, f))
                        labels.append(label)
        if not files:
            raise CodeDataError(f"{root}: no <class>/<name>.npy code files")
        self.files, self.labels = files, np.asarray(labels, dtype=np.int64)
        first = _as_aug_rows(np.load(files[0], mmap_mode="r"), files[0], None)
        self.seq_len, self.n_aug, self.num_classes = first.shape[1], first.shape[0], None

    def __len__(self) -> int:
        return len(self.files)

    def label_range(self) -> tuple[int, int]:
        return int(self.labels.min()), int(self.labels.max())

    def load(self, i: int) -> np.ndarray:
        """Sample i's codes [n_aug, L]."""
        path = self.files[i]
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise CodeDataError(f"{path}: cannot be read ({e})") from e
        return _as_aug_rows(arr, path, self.seq_len)

    def read(self, indices, picks):
        rows = []
        for j, i in enumerate(np.asarray(indices)):
            arr = self.load(int(i))
            row = np.asarray(arr[0 if picks is None else int(picks[j]) % arr.shape[0]], dtype=np.int64)
            self._check_values(row, self.files[int(i)])
            rows.append(row)
        return torch.from_numpy(np.stack(rows)), torch.from_numpy(self.labels[np.asarray(indices)])


class PackedCodes(_Codes):
    """Our packed layout (see the module docstring), memory-mapped."""

    def __init__(self, root: str):
        self.source = root
        meta_path = os.path.join(root, "meta.json")
        if not os.path.exists(meta_path):
            raise CodeDataError(f"{root}: no meta.json (not a packed code dataset)")
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != PACKED_FORMAT:
            raise CodeDataError(f"{meta_path}: format {meta.get('format')!r}, expected {PACKED_FORMAT!r}")
        self.seq_len, self.n_aug = int(meta["seq_len"]), int(meta["n_aug"])
        self.num_classes = meta.get("num_classes")
        self.codes, labels, self.offsets = [], [], [0]
        for shard in meta["shards"]:
            c = np.load(os.path.join(root, shard["codes"]), mmap_mode="r")
            lab = np.load(os.path.join(root, shard["labels"]))
            if c.ndim != 3 or c.shape[1:] != (self.n_aug, self.seq_len) or lab.shape != (c.shape[0],):
                raise CodeDataError(f"{os.path.join(root, shard['codes'])}: shape {tuple(c.shape)} with "
                                    f"{lab.shape[0]} labels; meta.json says [n, {self.n_aug}, {self.seq_len}]")
            self.codes.append(c)
            labels.append(lab.astype(np.int64))
            self.offsets.append(self.offsets[-1] + c.shape[0])
        self.labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        self.offsets = np.asarray(self.offsets)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def label_range(self) -> tuple[int, int]:
        return int(self.labels.min()), int(self.labels.max())

    def read(self, indices, picks):
        indices = np.asarray(indices)
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        aug = np.zeros_like(indices) if picks is None else np.asarray(picks) % self.n_aug
        rows = np.stack([self.codes[s][i - self.offsets[s], a] for s, i, a in zip(shard, indices, aug)])
        rows = rows.astype(np.int64)
        self._check_values(rows, self.source)
        return torch.from_numpy(rows), torch.from_numpy(self.labels[indices])


def open_codes(path: str) -> _Codes:
    """A `PackedCodes` when `path` holds meta.json, else a `CodeFolder`."""
    if os.path.exists(os.path.join(path, "meta.json")):
        return PackedCodes(path)
    return CodeFolder(path)


def pack_codes(src: str, dst: str, shard_size: int = 50_000, progress: bool = False) -> PackedCodes:
    """Write the packed layout of the code folder `src` into the new folder `dst`; returns it opened.

    Shards hold `shard_size` samples each (one shard in memory at a time), codes as uint16 when they fit,
    else int32.
    Every sample must have the same number of augmentations. The folder is written as `dst.tmp` and
    renamed when complete, so a crash never leaves a half-written `dst`.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if os.path.exists(dst):
        raise CodeDataError(f"{dst}: already exists; not overwriting it")
    folder = CodeFolder(src)
    tmp = dst.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(folder), unit="img", desc="packing", disable=None)
    try:
        shards = []
        for s, start in enumerate(range(0, len(folder), shard_size)):
            stop = min(start + shard_size, len(folder))
            block = np.empty((stop - start, folder.n_aug, folder.seq_len), np.int64)
            for i in range(start, stop):
                arr = folder.load(i)
                if arr.shape[0] != folder.n_aug:
                    raise CodeDataError(f"{folder.files[i]}: {arr.shape[0]} augmentations, the first file has "
                                        f"{folder.n_aug}; the packed layout needs the same number for all")
                block[i - start] = arr
                if bar is not None:
                    bar.update(1)
            if block.min() < 0 or block.max() >= 2**31:
                raise CodeDataError(f"{src}: codes outside 0..2**31-1 in samples {start}..{stop - 1}")
            names = {"codes": f"codes-{s:05d}.npy", "labels": f"labels-{s:05d}.npy"}
            # Each shard in the narrowest dtype that holds it (uint16 for any tokenizer of <= 65536 codes).
            np.save(os.path.join(tmp, names["codes"]), block.astype(np.uint16 if block.max() < 2**16 else np.int32))
            np.save(os.path.join(tmp, names["labels"]), folder.labels[start:stop])
            shards.append({**names, "count": stop - start})
            del block
        meta = {"format": PACKED_FORMAT, "seq_len": folder.seq_len, "n_aug": folder.n_aug,
                "num_samples": len(folder), "source": os.path.abspath(src), "shards": shards}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return PackedCodes(dst)
